"""Who runs at the next step: waiting, prefilling and running sequences, the shared prefix cache, and the plan.

:meth:`Scheduler.schedule` returns a :class:`SchedulerOutput`: every running sequence decodes one token, and the
prefill group (sequences that join together, each on the longest cached prefix of its prompt) advances by one chunk
of at most ``max_prefill_tokens`` padded tokens, fewer while rows decode if the
:class:`~chatstream.engine.prefill_pacer.PrefillPacer` finds that a full chunk would slow their step more than
``max_decode_slowdown`` allows, or more when more users wait for a first token than stream
(:meth:`Scheduler.observe` shows it each step's wall time). A long prompt is so prefilled over several steps while
the running streams keep decoding; when its last chunk runs, its sequences get their first token and join the batch.
The plan also carries the rows that left the batch and the prefix-cache operations (KV to copy out of a row into the
cache, cached KV to free) for the model runner to carry out first.

The model runner returns a :class:`ModelOutput` (one sampled token per scheduled sequence, or why it failed);
:meth:`Scheduler.update_from_output` appends the tokens, decides the stops, and hands finished and freshly prefilled
sequences to the prefix cache.

Pure Python: no tensors, no model; the prefix cache holds token ids, the runner holds the KV. The engine thread is the
only user, so nothing here is locked.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from chatstream.config import EngineConfig
from chatstream.engine.base import FinishReason
from chatstream.engine.prefill_pacer import PrefillPacer
from chatstream.engine.prefix_cache import PrefixMatch, RadixPrefixCache, common_prefix_len
from chatstream.engine.sequence import Sequence, SequenceStatus, stop_reason

logger = logging.getLogger(__name__)

SHARED_PREFIX_DEFER_TOKENS = 32
"""A waiting sequence that shares at least this many more prompt tokens with a sequence of the forming prefill group
than the prefix cache holds waits for the next group: that one reuses the shared part once it is cached."""


@dataclass(frozen=True)
class ScheduledPrefill:
    """A sequence of a new prefill group: the first ``prefix.num_tokens`` prompt tokens reuse cached KV."""

    seq: Sequence
    prefix: PrefixMatch = field(default_factory=PrefixMatch)

    @property
    def num_cached_tokens(self) -> int:
        return self.prefix.num_tokens


@dataclass(frozen=True)
class PrefillChunk:
    """Columns ``[start, end)`` of the prefill group's ``width`` new columns, in each of its ``rows`` rows; the last
    chunk samples first tokens."""

    start: int
    end: int
    width: int
    rows: int = 1

    @property
    def final(self) -> bool:
        return self.end >= self.width


@dataclass(frozen=True)
class KeepKV:
    """Copy the KV of tokens ``[start, end)`` of sequence ``seq_id``'s batch row into the prefix cache as node
    ``node_id``."""

    node_id: int
    seq_id: int
    start: int
    end: int


@dataclass(frozen=True)
class FreeKV:
    """The prefix cache dropped node ``node_id``: free its KV."""

    node_id: int


CacheOp = KeepKV | FreeKV


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step, carried out in this order: ``cache_ops``, ``releases`` (seq ids whose rows leave the
    batch), a cancelled or new prefill ``group``, then one forward: a decode of ``decodes`` and the ``chunk``."""

    group: tuple[ScheduledPrefill, ...] = ()
    chunk: PrefillChunk | None = None
    decodes: tuple[Sequence, ...] = ()
    prefilled: tuple[Sequence, ...] = ()
    """The group's sequences that get their first token from this step's chunk (its last)."""
    releases: tuple[int, ...] = ()
    cache_ops: tuple[CacheOp, ...] = ()
    cancel_group: bool = False

    @property
    def scheduled(self) -> list[Sequence]:
        """The sequences that get a token from this step."""
        return [*self.decodes, *self.prefilled]


@dataclass
class ModelOutput:
    """What the model runner returns for a plan: a token for every scheduled sequence, or why it failed (a failed
    sequence has no row in the batch any more; a failed chunk fails the whole group)."""

    sampled: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class Scheduler:
    """Waiting sequences (FIFO), the prefill group, running ones, the prefix cache, and the plan of each step.

    Args:
        config: ``max_batch_size`` bounds the prefilling and running sequences, ``max_prefill_tokens`` the padded
            tokens prefilled in one step (``max_decode_slowdown`` fewer while rows decode), ``prefix_cache_bytes``
            the cached KV.
        kv_bytes_per_token: the size of one token's keys and values over all layers (the prefix cache's unit; 0
            disables the prefix cache).
    """

    def __init__(self, config: EngineConfig, kv_bytes_per_token: int = 0) -> None:
        self.max_batch_size = config.max_batch_size
        self.max_prefill_tokens = config.max_prefill_tokens
        self.pacer = PrefillPacer(config.max_prefill_tokens, config.max_decode_slowdown)
        self.prefix_cache = RadixPrefixCache(config.prefix_cache_bytes, kv_bytes_per_token)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._width = 0
        self._done = 0
        self._releases: list[int] = []
        self._ops: list[CacheOp] = []
        self.num_prompt_tokens_total = 0
        self.num_cached_tokens_total = 0
        self.num_generated_tokens_total = 0
        self.num_prefix_queries_total = 0
        self.num_prefix_hits_total = 0
        self.num_prefill_chunks_total = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Something to run, or rows and cached KV to release."""
        return bool(self.waiting or self.prefilling or self.running or self._releases or self._ops)

    # ---- planning ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step: every running sequence decodes; the prefill group (a new one if none) runs one chunk."""
        cancel = bool(self.prefilling) and all(seq.is_finished for seq in self.prefilling)
        if cancel:
            self.prefilling = []
        group = self._admit() if not self.prefilling and self.waiting else ()
        chunk = self._next_chunk() if self.prefilling else None
        prefilled = tuple(s for s in self.prefilling if not s.is_finished) if chunk and chunk.final else ()
        releases, ops = tuple(self._releases), tuple(self._ops)
        self._releases, self._ops = [], []
        return SchedulerOutput(group, chunk, tuple(self.running), prefilled, releases, ops, cancel)

    def _next_chunk(self) -> PrefillChunk:
        rows = len(self.prefilling)
        # the users waiting for a first token: the group's, and the queue's that the batch has room for after it
        room = max(0, self.max_batch_size - len(self.running) - rows)
        per_step = max(1, self.pacer.budget(len(self.running), rows + min(room, len(self.waiting))) // rows)
        return PrefillChunk(self._done, min(self._width, self._done + per_step), self._width, rows)

    def observe(self, plan: SchedulerOutput, seconds: float) -> None:
        """The model ran ``plan`` in ``seconds`` (the pacer learns the cost of a decode step and of a prompt
        token from it)."""
        tokens = 0 if plan.chunk is None else plan.chunk.rows * (plan.chunk.end - plan.chunk.start)
        self.pacer.observe(len(plan.decodes), tokens, seconds)

    def _admit(self) -> tuple[ScheduledPrefill, ...]:
        """Pop the sequences that form the next prefill group, in arrival order: the first always; more while the
        group still prefills in one step with at most as much padding as work, and none would rather wait for a
        prefix that a sequence already in the group is about to cache."""
        picked: list[tuple[Sequence, PrefixMatch]] = []
        while self.waiting and len(self.running) + len(picked) < self.max_batch_size:
            seq = self.waiting[0]
            match = self._match(seq)
            if picked and not self._joins(picked, seq, match):
                break
            self.waiting.popleft()
            picked.append((seq, match))
        return self._start_group(picked)

    def _match(self, seq: Sequence) -> PrefixMatch:
        """The longest cached prefix of the prompt, short of its last token (whose logits give the first output)."""
        if not self.prefix_cache.enabled:
            return PrefixMatch()
        return self.prefix_cache.match(seq.prompt_ids).truncated(len(seq.prompt_ids) - 1)

    def _joins(self, picked: list[tuple[Sequence, PrefixMatch]], seq: Sequence, match: PrefixMatch) -> bool:
        rows = [*picked, (seq, match)]
        uncached = [len(s.prompt_ids) - m.num_tokens for s, m in rows]
        width = max(uncached)
        padded = len(uncached) * width
        if padded > self.max_prefill_tokens or padded > 2 * sum(uncached):
            return False
        # Every row computes ``width`` columns: a row with a cache hit recomputes the tail of its cached prefix. One
        # that would recompute more than half of it (a next turn beside longer new prompts) waits for the next group.
        if any(2 * max(0, len(s.prompt_ids) - width) < m.num_tokens for s, m in rows):
            return False
        if not self.prefix_cache.enabled:
            return True
        limit = len(seq.prompt_ids) - 1
        shared = max(min(common_prefix_len(s.prompt_ids, seq.prompt_ids), limit) for s, _ in picked)
        return shared < match.num_tokens + SHARED_PREFIX_DEFER_TOKENS

    def _start_group(self, picked: list[tuple[Sequence, PrefixMatch]]) -> tuple[ScheduledPrefill, ...]:
        """The new group. Every row computes ``width`` new columns (the longest uncached part): a row with a shorter
        uncached part recomputes the tail of its cached part instead of taking padding in the middle, so every row
        stays contiguous and reuses ``len(prompt) - width`` tokens."""
        if not picked:
            return ()
        width = max(len(seq.prompt_ids) - match.num_tokens for seq, match in picked)
        group = []
        for seq, match in picked:
            prefill = ScheduledPrefill(seq, match.truncated(len(seq.prompt_ids) - width))
            seq.num_cached_tokens = prefill.num_cached_tokens
            seq.status = SequenceStatus.PREFILLING
            group.append(prefill)
        self.prefilling = [seq for seq, _ in picked]
        self._width, self._done = width, 0
        return tuple(group)

    # ---- after the model ran -----------------------------------------------------------------------------------

    def update_from_output(self, plan: SchedulerOutput, output: ModelOutput) -> list[Sequence]:
        """Append each scheduled sequence's token and decide its stop; returns the sequences whose deltas are ready
        (finished ones out of the running list)."""
        updated: list[Sequence] = []
        for seq in plan.decodes:
            error = output.errors.get(seq.seq_id)
            if error is not None:
                self._finish(seq, FinishReason.ERROR, error=error, in_batch=False)
            else:
                self._append(seq, output.sampled[seq.seq_id])
            updated.append(seq)
        if plan.chunk is not None:
            self.num_prefill_chunks_total += 1
            self._done = plan.chunk.end
            if plan.chunk.final or any(seq.seq_id in output.errors for seq in self.prefilling):
                updated += self._end_group(output)
        if any(seq.is_finished for seq in updated):
            self.running = [seq for seq in self.running if not seq.is_finished]
        return updated

    def _end_group(self, output: ModelOutput) -> list[Sequence]:
        """The group's prefill ended: its sequences run (their prompts go to the prefix cache) or failed."""
        updated = []
        for seq in self.prefilling:
            error = output.errors.get(seq.seq_id)
            if error is not None:
                if not seq.is_finished:
                    seq.finish(FinishReason.ERROR, error)
                    updated.append(seq)
                continue
            if seq.is_finished:  # aborted while it was prefilled: its row leaves at once
                self._releases.append(seq.seq_id)
                continue
            self._count_prefill(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._cache(seq, seq.prompt_ids, None)
            self._append(seq, output.sampled[seq.seq_id])
            updated.append(seq)
        self.prefilling = []
        return updated

    def _count_prefill(self, seq: Sequence) -> None:
        self.num_prompt_tokens_total += len(seq.prompt_ids)
        self.num_cached_tokens_total += seq.num_cached_tokens
        if self.prefix_cache.enabled:
            self.num_prefix_queries_total += 1
            self.num_prefix_hits_total += seq.num_cached_tokens > 0

    def _append(self, seq: Sequence, token_id: int) -> None:
        self.num_generated_tokens_total += 1
        try:
            seq.append_token(token_id)
        except Exception as exc:
            logger.exception("detokenization failed for request %s", seq.request_id)
            self._finish(seq, FinishReason.ERROR, error=f"detokenization failed: {exc}")
            return
        reason = stop_reason(seq, token_id)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None, in_batch: bool = True) -> None:
        """Finish ``seq``; a row in the batch is released, its KV (prompt and answer) cached unless it failed."""
        seq.finish(reason, error)
        if not in_batch:
            return
        if reason is not FinishReason.ERROR:
            self._cache(seq, seq.kv_token_ids, seq.conversation_id)
        self._releases.append(seq.seq_id)

    def _cache(self, seq: Sequence, token_ids: list[int], conversation_id: str | None) -> None:
        """Hand ``token_ids`` (whose KV is in ``seq``'s row) to the prefix cache; queue the copies and frees."""
        if not self.prefix_cache.enabled:
            return
        spans, evicted = self.prefix_cache.insert(token_ids, conversation_id)
        self._ops += [KeepKV(span.node_id, seq.seq_id, span.start, span.end) for span in spans]
        self._ops += [FreeKV(node_id) for node_id in evicted]

    # ---- requests leaving early --------------------------------------------------------------------------------

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request's sequence with ABORT (a running row leaves the batch at the next step, its KV cached;
        a prefilling one leaves when its group is done); None if no unfinished sequence has that request id."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish(FinishReason.ABORT)
                return seq
        for seq in self.prefilling:
            if seq.request_id == request_id and not seq.is_finished:
                seq.finish(FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        return None

    def finish_all(self, reason: FinishReason, error: str | None = None, *, waiting: bool = True) -> list[Sequence]:
        """Finish every running and prefilling sequence (and every waiting one when ``waiting``) with ``reason``,
        forget the pending releases and clear the prefix cache: the caller resets the runner, which drops the batch,
        the prefill group and the cached KV."""
        prefilling = [seq for seq in self.prefilling if not seq.is_finished]
        seqs = [*self.running, *prefilling, *(self.waiting if waiting else ())]
        for seq in seqs:
            seq.finish(reason, error)
        self.running, self.prefilling = [], []
        if waiting:
            self.waiting.clear()
        self._releases, self._ops = [], []
        self.prefix_cache.clear()
        return seqs
