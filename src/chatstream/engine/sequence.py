"""One request inside the engine (:class:`Sequence`) and the pure functions that decide its prompt and its stop.

Pure Python: no tensors, no model. Only the engine thread touches a sequence, so nothing here is locked.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from chatstream.config import SamplingParams
from chatstream.engine.base import Delta, FinishReason, GenerationRequest, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    import torch

    from chatstream.engine.sampler import RowLogprobs
    from chatstream.engine.structured import GrammarMatcher


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer(Protocol):
    """What a sequence needs from its detokenizer (:class:`~chatstream.engine.detokenizer.IncrementalDetokenizer`)."""

    @property
    def stopped(self) -> bool:
        """A stop string appeared in the output."""

    def add_tokens(self, token_ids: SequenceABC[int]) -> str:
        """Take new tokens; return the text that may be sent now."""

    def flush(self) -> str:
        """Return what was held back, at the end of the request."""


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, its stop conditions, its detokenizer and sampling state, and the
    output not yet reported (taken with :meth:`take_delta`).

    ``seq_id`` is unique for the engine's lifetime (a request id may be reused once its request has finished), so
    the scheduler, the model runner and the prefix cache name sequences by it.

    A constrained sequence has a ``matcher`` (its grammar's state): the model runner masks its logits with it before
    sampling, :meth:`append_token` advances it. A sequence that asked for logprobs gets them from the runner
    (:attr:`sampled_logprobs`, set with each sampled token) and names the tokens with ``token_piece`` (text, bytes).
    """

    request: GenerationRequest
    prompt_ids: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    detokenizer: Detokenizer | None = None
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    matcher: GrammarMatcher | None = None
    token_piece: Callable[[int], tuple[str, bytes]] | None = None
    sampled_logprobs: RowLogprobs | None = field(default=None, init=False, repr=False)
    _new_token_ids: list[int] = field(default_factory=list, init=False, repr=False)
    _new_text: str = field(default="", init=False, repr=False)
    _new_logprobs: list[TokenLogprob] = field(default_factory=list, init=False, repr=False)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def conversation_id(self) -> str | None:
        return self.request.conversation_id

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives per token the request wants (None: no logprobs)."""
        return self.request.logprobs

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def kv_token_ids(self) -> list[int]:
        """The tokens whose keys and values the model has computed: all but the last sampled one."""
        return (self.prompt_ids + self.output_ids)[: max(self.num_tokens - 1, 0)]

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and the text it releases (a stop token releases none); advance the grammar.

        Raises RuntimeError when the grammar refuses the token (the runner masks what it forbids, so only a bug or
        a vocabulary mismatch gets here)."""
        self.output_ids.append(token_id)
        self._new_token_ids.append(token_id)
        if self.sampled_logprobs is not None:
            self._new_logprobs.append(self._logprob_of(token_id, self.sampled_logprobs))
            self.sampled_logprobs = None
        if self.matcher is not None and not self.matcher.accept(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self.matcher.error}")
        if token_id not in self.stop_token_ids and self.detokenizer is not None:
            self._new_text += self.detokenizer.add_tokens((token_id,))

    def _logprob_of(self, token_id: int, row: RowLogprobs) -> TokenLogprob:
        piece = self.token_piece or _plain_piece
        chosen, top = row
        alternatives = []
        for alternative, value in top:
            text, raw = piece(alternative)
            alternatives.append(TopLogprob(alternative, text, value, raw))
        text, raw = piece(token_id)
        return TokenLogprob(token_id, text, chosen, tuple(alternatives), raw)

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        """End the sequence; the text held back is released unless it failed."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.error = reason, error
        if reason is not FinishReason.ERROR and self.detokenizer is not None:
            self._new_text += self.detokenizer.flush()

    def take_delta(self) -> Delta:
        """What happened since the last call, as the request's next delta."""
        delta = Delta(
            text=self._new_text,
            token_ids=tuple(self._new_token_ids),
            finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt_ids),
            num_generated_tokens=len(self.output_ids),
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
            logprobs=tuple(self._new_logprobs),
        )
        self._new_text, self._new_token_ids, self._new_logprobs = "", [], []
        return delta


def _plain_piece(token_id: int) -> tuple[str, bytes]:
    return str(token_id), str(token_id).encode()


def stop_reason(seq: Sequence, token_id: int) -> FinishReason | None:
    """Why ``seq`` stops after ``token_id`` was appended (and detokenized), or None to keep going. The only place
    where a stop is decided."""
    if token_id in seq.stop_token_ids:
        return FinishReason.STOP
    if seq.detokenizer is not None and seq.detokenizer.stopped:
        return FinishReason.STOP
    if seq.matcher is not None and seq.matcher.is_finished:
        return FinishReason.STOP  # the grammar is complete: only a stop token could follow
    if len(seq.output_ids) >= seq.max_new_tokens:
        return FinishReason.LENGTH
    return None


def truncate_prompt(prompt_ids: SequenceABC[int], max_new_tokens: int, context_len: int) -> tuple[list[int], int]:
    """Cut the prompt from the left so that it leaves room for ``max_new_tokens`` (at least one prompt token stays).

    Returns the kept prompt ids and the number of tokens that may still be generated within ``context_len``.
    """
    budget = max(1, context_len - max_new_tokens)
    kept = list(prompt_ids[-budget:]) if len(prompt_ids) > budget else list(prompt_ids)
    return kept, max(1, min(max_new_tokens, context_len - len(kept)))


def stop_token_ids(sampling_stop_ids: Iterable[int], eos_ids: Iterable[int], ignore_eos: bool) -> frozenset[int]:
    """The token ids that end a request: its own ``stop_token_ids`` plus the EOS ids unless ``ignore_eos``."""
    ids = set(sampling_stop_ids)
    if not ignore_eos:
        ids.update(eos_ids)
    return frozenset(ids)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS id and the model's generation-config EOS ids (Gemma has several)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
