"""Constrained decoding: per-row token masks that keep a sequence inside a grammar (any JSON object, a JSON schema,
or a Lark grammar such as a model family's tool-call format), computed with llguidance.

One :class:`GrammarCompiler` per tokenizer: building its token table takes seconds on a 262k vocabulary and holds the
GIL all along (llguidance's constructor does not release it), so the engine builds it once, through
:class:`LazyGrammarCompiler`: the service builds it while the app starts, before the server accepts requests (a
background thread would freeze the event loop just the same). It validates and caches grammars by their
canonical text and hands out one :class:`GrammarMatcher` per constrained sequence. Each decode step
:func:`apply_masks` sets the logits of the tokens a row's grammar forbids to ``-inf`` (rows without a matcher are left
alone), the sampler picks, and the engine calls ``matcher.accept(token_id)``. The stop tokens given to the compiler
are allowed exactly where the grammar may end; once the grammar is complete they are the only tokens allowed.

A grammar bounds the *shape* of the output, not its length: a model (or the random test model) may keep a string open
until ``max_tokens`` cuts it. The answer then ends with finish reason ``length`` and a JSON prefix, as OpenAI's does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from chatstream.engine.grammar import GrammarKind, GrammarSpec, response_format_grammar

logger = logging.getLogger(__name__)

__all__ = [
    "GrammarCompiler",
    "GrammarKind",
    "GrammarMatcher",
    "GrammarSpec",
    "LazyGrammarCompiler",
    "allocate_bitmask",
    "apply_bitmask",
    "apply_masks",
    "bitmask_to_bool",
    "response_format_grammar",
]

MAX_CACHED_GRAMMARS = 64
"""Compiled grammars kept per tokenizer (least recently used dropped first)."""


DENSE_MASK_MAX_ELEMENTS = 1 << 20
"""On the CPU, masks over more logits than this (rows × vocabulary) are applied row by row (see
:func:`_mask_rows_by_row`); below it one masked fill is cheaper than a Python loop."""

FEW_ALLOWED_FRACTION = 16
"""A row allowing at most 1/16 of the vocabulary is rebuilt from its allowed logits instead of masked."""


class GrammarCompiler:
    """Grammars for one tokenizer: validated once, cached by their text, a fresh matcher per sequence.

    Args:
        tokenizer: a Hugging Face fast tokenizer (``PreTrainedTokenizerFast``).
        vocab_size: the width of the model's logits (may exceed the tokenizer's size; the extra ids are never allowed).
        stop_token_ids: the ids that end a sequence (EOS, end-of-turn); allowed only where the grammar may end.
        max_cached: how many compiled grammars to keep.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], *, max_cached: int = MAX_CACHED_GRAMMARS
    ) -> None:
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token (EOS)")
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.max_cached = max_cached
        self._tokenizer = _llg_tokenizer(tokenizer, vocab_size, list(stop_token_ids))
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # the server validates in a worker thread while the engine thread compiles

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A matcher at the start of ``spec``; ValueError naming ``spec.field`` when the grammar is invalid."""
        with self._lock:
            return GrammarMatcher(self._template(spec).deep_copy(), self.vocab_size)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of one token (None for special tokens and ids outside the tokenizer)."""
        if not 0 <= token_id < self._tokenizer.vocab_size or self._tokenizer.is_special_token(token_id):
            return None
        return bytes(self._tokenizer.decode_bytes([token_id]))

    def validate(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` (cached) or raise ValueError: for the server, before the request is queued."""
        with self._lock:
            self._template(spec)

    def _template(self, spec: GrammarSpec) -> Any:
        import llguidance

        key = f"{spec.kind.value}:{spec.text}"
        template = self._templates.get(key)
        if template is not None:
            self._templates.move_to_end(key)
            return template
        try:
            template = llguidance.LLMatcher(self._tokenizer, spec.grammar_text())
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(f"{spec.field}: {exc}") from None
        if template.is_error():
            raise ValueError(f"{spec.field}: {_one_line(template.get_error())}")
        self._templates[key] = template
        if len(self._templates) > self.max_cached:
            self._templates.popitem(last=False)
        return template


def _llg_tokenizer(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """llguidance's token table. ``llguidance.hf.from_tokenizer`` first copies the Rust tokenizer (to turn padding
    and truncation off), which costs as much as the rest on a 262k vocabulary; without them the copy is skipped."""
    import llguidance
    import llguidance.hf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.padding is not None or backend.truncation is not None:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=stop_token_ids)


class LazyGrammarCompiler:
    """The :class:`GrammarCompiler` of one tokenizer, built once on first use (or by :meth:`build`) in whatever
    thread asks first; other threads wait for it. A failed build is remembered: every later use raises the same
    ValueError (the server answers 400: this model cannot constrain its output).

    Args:
        tokenizer, vocab_size, stop_token_ids: as for :class:`GrammarCompiler`.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._args = (tokenizer, vocab_size, tuple(stop_token_ids))
        self._lock = threading.Lock()
        self._compiler: GrammarCompiler | None = None
        self._error: str | None = None

    @property
    def is_built(self) -> bool:
        return self._compiler is not None or self._error is not None

    def build(self) -> None:
        """Build the compiler now (blocking, seconds on a large vocabulary; idempotent); errors are kept for later."""
        with self._lock:
            if self.is_built:
                return
            tokenizer, vocab_size, stops = self._args
            started = time.perf_counter()
            try:
                self._compiler = GrammarCompiler(tokenizer, vocab_size, stops)
            except Exception as exc:  # not a fast tokenizer, no EOS, llguidance missing ...
                logger.warning("constrained decoding is not available for this tokenizer: %s", exc)
                self._error = f"constrained decoding is not available for this model's tokenizer ({exc})"
                return
            logger.info("grammar token table of %d tokens built in %.1f s", vocab_size, time.perf_counter() - started)

    def get(self) -> GrammarCompiler:
        """The compiler (built now if need be); ValueError when it can not be built."""
        self.build()
        if self._compiler is None:
            raise ValueError(self._error or "constrained decoding is not available")
        return self._compiler

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of one token, once the compiler is built (None before, or for special tokens)."""
        compiler = self._compiler
        return None if compiler is None else compiler.token_bytes(token_id)

    def validate(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` or raise ValueError naming its field."""
        try:
            compiler = self.get()
        except ValueError as exc:
            raise ValueError(f"{spec.field}: {exc}") from None
        compiler.validate(spec)

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for ``spec``; ValueError naming its field."""
        self.validate(spec)
        return self.get().matcher(spec)


class GrammarMatcher:
    """The grammar state of one sequence: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens into ``bitmask[row]`` (int32 ``[R, ceil(V / 32)]`` on the CPU, bit i = token i)."""
        target = bitmask[row]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not target.is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def allowed(self) -> torch.Tensor:
        """The allowed next tokens as a bool ``[V]`` mask."""
        bitmask = allocate_bitmask(1, self.vocab_size)
        self.fill_bitmask(bitmask, 0)
        return bitmask_to_bool(bitmask, self.vocab_size)[0]

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and :attr:`error` set) when the grammar forbids it."""
        return bool(self._matcher.consume_token(int(token_id)))

    @property
    def can_end(self) -> bool:
        """The output so far is complete: a stop token is allowed now."""
        return bool(self._matcher.is_accepting())

    @property
    def is_finished(self) -> bool:
        """Nothing but a stop token may follow (the grammar is complete), or a forbidden token was accepted."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        """Why the last :meth:`accept` failed, else None."""
        return _one_line(self._matcher.get_error()) if self._matcher.is_error() else None


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 ``[rows, ceil(V / 32)]`` bitmask, every token allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack an int32 ``[R, W]`` bitmask to a bool ``[R, V]`` mask (True = allowed), in one vectorised pass."""
    # int32 words are little-endian in memory: byte j of word w holds tokens 32w + 8j .. 32w + 8j + 7, lowest bit first
    as_bytes = bitmask.contiguous().numpy().view(np.uint8)  # [R, 4W]
    bits = np.unpackbits(as_bytes, axis=1, count=vocab_size, bitorder="little")  # [R, V] uint8
    return torch.from_numpy(bits).view(torch.bool)


def apply_masks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
    """Set the logits of forbidden tokens to ``-inf`` in the rows that have a matcher; ``logits`` changes in place.

    Call it on the raw logits of a decode step, before penalties and temperature (see :mod:`chatstream.engine.sampler`).
    Rows whose matcher is None are not touched.
    """
    # logits: [B, V] (any float dtype, any device); matchers: [B]
    if len(matchers) != logits.shape[0]:
        raise ValueError(f"{len(matchers)} matchers for {logits.shape[0]} rows of logits")
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    vocab_size = logits.shape[-1]
    sizes = {m.vocab_size for m in matchers if m is not None}
    if sizes != {vocab_size}:
        raise ValueError(f"matchers built for vocabularies {sorted(sizes)}, logits have {vocab_size} columns")
    bitmask = allocate_bitmask(len(rows), vocab_size)  # [R, W]
    for index, row in enumerate(rows):
        matcher = matchers[row]
        assert matcher is not None
        matcher.fill_bitmask(bitmask, index)
    apply_bitmask(logits, rows, bitmask)


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set ``logits[rows[i], t]`` to ``-inf`` where bit ``t`` of ``bitmask[i]`` is 0; in place.

    ``bitmask`` is int32 ``[len(rows), ceil(V / 32)]`` on the CPU, filled by :meth:`GrammarMatcher.fill_bitmask`.
    """
    # logits: [B, V]; bitmask: [R, W]
    vocab_size = logits.shape[-1]
    if vocab_size % 32:
        bitmask[:, -1] &= (1 << (vocab_size % 32)) - 1  # the padding bits of the last word: never allowed
    if logits.device.type == "cpu" and len(rows) * vocab_size > DENSE_MASK_MAX_ELEMENTS:
        _mask_rows_by_row(logits, rows, bitmask)
    else:
        _mask_rows_dense(logits, rows, bitmask)


def _mask_rows_dense(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """One masked fill over all constrained rows: the accelerator path, and the CPU one for small vocabularies."""
    # logits: [B, V]; bitmask: [R, W] int32
    forbidden = ~bitmask_to_bool(bitmask, logits.shape[-1]).to(logits.device)  # [R, V]
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


def _mask_rows_by_row(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """The CPU path for large vocabularies, row by row, in place. A grammar row allows either a few tokens (JSON
    punctuation, an enum, a key) or nearly all of them (inside a string): a row that allows all needs nothing; a row
    that allows few keeps its allowed logits by index over a ``-inf`` row; the others get one branch-free select."""
    # logits: [B, V]; bitmask: [R, W] int32
    vocab_size = logits.shape[-1]
    allowed_counts = np.bitwise_count(bitmask.numpy().view(np.uint32)).sum(axis=1)  # [R]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab_size, bitorder="little")  # [R, V]
    allowed = torch.from_numpy(bits).view(torch.bool)  # [R, V], shares memory with bits
    minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype)
    for index, row in enumerate(rows):
        count = int(allowed_counts[index])
        if count == vocab_size:
            continue
        if count <= vocab_size // FEW_ALLOWED_FRACTION:
            keep = torch.from_numpy(np.flatnonzero(bits[index]))  # [K]
            kept = logits[row, keep]
            logits[row].fill_(float("-inf"))
            logits[row, keep] = kept
        else:
            torch.where(allowed[index], logits[row], minus_inf, out=logits[row])


def _one_line(message: str, limit: int = 300) -> str:
    """llguidance's messages span lines (a regex error draws a caret); an HTTP error wants one short line."""
    text = " ".join(message.split())
    return (text[: limit - 3] + "...") if len(text) > limit else (text or "invalid grammar")
