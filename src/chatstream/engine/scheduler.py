"""Per-request state (:class:`Sequence`), admission of waiting sequences into the batch, and stop checks.

Pure Python: no tensors, no model. The engine thread is the only user, so nothing here is locked.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any

from chatstream.engine.base import FinishReason, GenerationRequest, RequestStream

logger = logging.getLogger(__name__)


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, its detokenizer and sampling state, and its stream."""

    request: GenerationRequest
    stream: RequestStream
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    aborted: bool = False
    detokenizer: Any = None
    generator: Any = None
    stop_token_ids: frozenset[int] = frozenset()
    loop: Any = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


def truncate_prompt(prompt_ids: SequenceABC[int], max_new_tokens: int, context_len: int) -> tuple[list[int], int]:
    """Cut the prompt from the left so that it leaves room for ``max_new_tokens`` (at least one prompt token stays).

    Returns the kept prompt ids and the number of tokens that may still be generated within ``context_len``.
    """
    budget = max(1, context_len - max_new_tokens)
    kept = list(prompt_ids[-budget:]) if len(prompt_ids) > budget else list(prompt_ids)
    return kept, max(1, min(max_new_tokens, context_len - len(kept)))


def stop_reason(seq: Sequence, token_id: int) -> FinishReason | None:
    """Why ``seq`` stops after sampling ``token_id`` (already appended), or None to keep going."""
    if token_id in seq.stop_token_ids:
        return FinishReason.STOP
    if seq.detokenizer is not None and seq.detokenizer.stopped:
        return FinishReason.STOP
    if len(seq.output_ids) >= seq.max_new_tokens:
        return FinishReason.LENGTH
    return None


def stop_token_ids(sampling_stop_ids: Iterable[int], eos_ids: Iterable[int], ignore_eos: bool) -> frozenset[int]:
    """The token ids that end a request: its own ``stop_token_ids`` plus the EOS ids unless ``ignore_eos``."""
    ids = set(sampling_stop_ids)
    if not ignore_eos:
        ids.update(eos_ids)
    return frozenset(ids)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS id and the model's generation-config EOS ids (Gemma has several)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), _generation_eos(model)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _generation_eos(model: Any) -> Any:
    generation_config = getattr(model, "generation_config", None)
    return getattr(generation_config, "eos_token_id", None)


class Scheduler:
    """Waiting sequences (FIFO) and the choice of who joins the batch at the next step."""

    def __init__(self, max_batch_size: int, max_prefill_tokens: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove_aborted(self) -> list[Sequence]:
        """Take the aborted sequences out of the waiting queue."""
        aborted = [s for s in self.waiting if s.aborted]
        if aborted:
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        return aborted

    def admit(self, num_running: int, cost: Any) -> list[Sequence]:
        """Pop the sequences that join now: as many as fit in the batch, while the padded prefill stays within
        ``max_prefill_tokens`` (the first one always joins). ``cost(seq)`` gives the tokens it would prefill."""
        joiners: list[Sequence] = []
        longest = 0
        while self.waiting and num_running + len(joiners) < self.max_batch_size:
            longest_if_joined = max(longest, cost(self.waiting[0]))
            if joiners and longest_if_joined * (len(joiners) + 1) > self.max_prefill_tokens:
                break
            longest = longest_if_joined
            joiners.append(self.waiting.popleft())
        return joiners
