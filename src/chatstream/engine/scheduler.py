"""Who runs at the next step: waiting and running sequences, the per-conversation prefix cache, and the plan.

:meth:`Scheduler.schedule` returns a :class:`SchedulerOutput`: the sequences to prefill (plainly or on top of their
conversation's cached KV, with the number of reused tokens), or the sequences to decode, plus the rows that left the
batch since the last plan and the cached prefixes that were dropped. The model runner carries the plan out and
returns a :class:`ModelOutput` (one sampled token per sequence, or why it failed); :meth:`Scheduler.update_from_output`
appends the tokens, decides the stops and moves finished sequences out.

A prefill step and a decode step alternate while sequences wait: every sequence decodes at least every other step,
and a sequence that joins gets its first token from the prefill and its second from the decode right after.

Pure Python: no tensors, no model; the prefix cache holds token ids and sizes, the runner holds the KV itself. The
engine thread is the only user, so nothing here is locked.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

from chatstream.config import EngineConfig
from chatstream.engine.base import FinishReason
from chatstream.engine.sequence import Sequence, SequenceStatus, stop_reason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledPrefill:
    """A sequence to prefill: plainly (``prefix_owner`` None), or on the KV kept from sequence ``prefix_owner``,
    whose first ``num_cached_tokens`` columns are reused (the rest of the prompt is computed)."""

    seq: Sequence
    prefix_owner: int | None = None
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class Release:
    """A row that leaves the batch; ``keep``: the runner keeps its KV under its ``seq_id`` for the prefix cache."""

    seq_id: int
    keep: bool


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step: prefills or decodes (never both), after the releases and the freed prefixes."""

    prefills: tuple[ScheduledPrefill, ...] = ()
    decodes: tuple[Sequence, ...] = ()
    releases: tuple[Release, ...] = ()
    freed_prefixes: tuple[int, ...] = ()
    """Owners (seq ids) of kept KV that the prefix cache no longer holds; the runner frees it after the releases."""

    @property
    def scheduled(self) -> list[Sequence]:
        """The sequences that get a token from this step."""
        return [p.seq for p in self.prefills] + list(self.decodes)


@dataclass
class ModelOutput:
    """What the model runner returns for a plan: a token for every scheduled sequence, or why it failed (a failed
    sequence has no row in the batch any more)."""

    sampled: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefixEntry:
    """A conversation's KV kept after its last request: ``token_ids[i]`` is the token of column ``i``; the KV itself
    is held by the runner under ``owner`` (the seq id of the sequence that computed it)."""

    token_ids: tuple[int, ...]
    owner: int
    num_bytes: int


class PrefixCache:
    """Which conversation has which KV kept, least recently used evicted first, bounded by ``max_bytes`` (0
    disables). Returns the owners it drops so that the runner can free their KV."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, conversation_id: str, entry: PrefixEntry) -> list[int]:
        """Keep ``entry`` for the conversation; returns the owners dropped (its previous entry, the evicted ones,
        or ``entry`` itself when it alone exceeds the budget)."""
        dropped = self._drop(conversation_id)
        if entry.num_bytes > self.max_bytes:
            logger.debug("prefix cache: %s (%d bytes) exceeds the budget", conversation_id, entry.num_bytes)
            return [*dropped, entry.owner]
        self._entries[conversation_id] = entry
        self.num_bytes += entry.num_bytes
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.num_bytes
            dropped.append(evicted.owner)
        return dropped

    def peek(self, conversation_id: str) -> PrefixEntry | None:
        return self._entries.get(conversation_id)

    def pop(self, conversation_id: str) -> PrefixEntry | None:
        """Take the conversation's entry out of the cache (the next request owns it)."""
        entry = self._entries.pop(conversation_id, None)
        if entry is not None:
            self.num_bytes -= entry.num_bytes
        return entry

    def clear(self) -> list[int]:
        """Drop every entry; returns their owners."""
        owners = [entry.owner for entry in self._entries.values()]
        self._entries.clear()
        self.num_bytes = 0
        return owners

    def _drop(self, conversation_id: str) -> list[int]:
        entry = self.pop(conversation_id)
        return [] if entry is None else [entry.owner]


def common_prefix_len(a: SequenceABC[int], b: SequenceABC[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Waiting sequences (FIFO), running ones, the prefix cache, and the plan of each step.

    Args:
        config: ``max_batch_size`` bounds the running sequences, ``max_prefill_tokens`` the padded tokens of one
            prefill (the first joiner always fits), ``prefix_cache_bytes`` the kept KV.
        kv_bytes_per_token: the size of one token's keys and values over all layers (the prefix cache's unit; 0
            disables the prefix cache).
    """

    def __init__(self, config: EngineConfig, kv_bytes_per_token: int = 0) -> None:
        self.max_batch_size = config.max_batch_size
        self.max_prefill_tokens = config.max_prefill_tokens
        self.kv_bytes_per_token = kv_bytes_per_token
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes if kv_bytes_per_token > 0 else 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._releases: list[Release] = []
        self._freed: list[int] = []
        self._prefilled_last = False
        self.num_prompt_tokens_total = 0
        self.num_cached_tokens_total = 0
        self.num_generated_tokens_total = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Something to run, or rows and prefixes to release."""
        return bool(self.waiting or self.running or self._releases or self._freed)

    # ---- planning ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step: a prefill of the sequences that join (unless the last step was one and rows are running),
        else a decode of every running sequence."""
        prefills: list[ScheduledPrefill] = []
        if self.waiting and not (self._prefilled_last and self.running):
            prefills = self._admit()
        self._prefilled_last = bool(prefills)
        decodes = () if prefills else tuple(self.running)
        releases, freed = tuple(self._releases), tuple(self._freed)
        self._releases, self._freed = [], []
        return SchedulerOutput(tuple(prefills), decodes, releases, freed)

    def _admit(self) -> list[ScheduledPrefill]:
        """Pop the sequences that join now: as many as fit in the batch, while the padded prefill (the longest
        uncached prompt part times the rows) stays within ``max_prefill_tokens``."""
        hits: list[tuple[Sequence, PrefixEntry, int]] = []
        plain: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.running) + len(hits) + len(plain) < self.max_batch_size:
            seq = self.waiting[0]
            entry, reusable = self._reusable(seq)
            longest_if_joined = max(longest, len(seq.prompt_ids) - reusable)
            if (hits or plain) and longest_if_joined * (len(hits) + len(plain) + 1) > self.max_prefill_tokens:
                break
            longest = longest_if_joined
            self.waiting.popleft()
            if seq.conversation_id is not None:
                self.prefix_cache.pop(seq.conversation_id)  # the new request owns the conversation's entry
            if entry is not None and reusable > 0:
                hits.append((seq, entry, reusable))
            else:
                plain.append(seq)
                if entry is not None:
                    self._freed.append(entry.owner)
        return self._start(hits, plain)

    def _reusable(self, seq: Sequence) -> tuple[PrefixEntry | None, int]:
        """The conversation's cached entry and how many prompt tokens it covers."""
        conv = seq.conversation_id
        entry = None if conv is None else self.prefix_cache.peek(conv)
        if entry is None:
            return None, 0
        # the last prompt token is always run, so that its logits give the first output token
        return entry, min(common_prefix_len(entry.token_ids, seq.prompt_ids), len(seq.prompt_ids) - 1)

    def _start(self, hits: list[tuple[Sequence, PrefixEntry, int]], plain: list[Sequence]) -> list[ScheduledPrefill]:
        """The prefills, hits first, and the sequences now running. The hits run as one batch of ``width`` new
        tokens each (the longest uncached part): a row with a shorter uncached part recomputes the tail of its cached
        part instead of taking padding in the middle, so every row stays contiguous and reuses
        ``len(prompt) - width`` tokens."""
        width = max((len(seq.prompt_ids) - reusable for seq, _, reusable in hits), default=0)
        plan = [ScheduledPrefill(seq, entry.owner, max(len(seq.prompt_ids) - width, 0)) for seq, entry, _ in hits]
        plan += [ScheduledPrefill(seq) for seq in plain]
        for prefill in plan:
            prefill.seq.num_cached_tokens = prefill.num_cached_tokens
            prefill.seq.status = SequenceStatus.RUNNING
            self.running.append(prefill.seq)
        return plan

    # ---- after the model ran -----------------------------------------------------------------------------------

    def update_from_output(self, plan: SchedulerOutput, output: ModelOutput) -> list[Sequence]:
        """Append each scheduled sequence's token and decide its stop; returns the scheduled sequences (their
        deltas are ready), finished ones out of the running list."""
        for prefill in plan.prefills:
            if prefill.seq.seq_id in output.sampled:
                self.num_prompt_tokens_total += len(prefill.seq.prompt_ids)
                self.num_cached_tokens_total += prefill.num_cached_tokens
        scheduled = plan.scheduled
        for seq in scheduled:
            error = output.errors.get(seq.seq_id)
            if error is not None:
                self._finish(seq, FinishReason.ERROR, error=error, in_batch=False)
            else:
                self._append(seq, output.sampled[seq.seq_id])
        if any(seq.is_finished for seq in scheduled):
            self.running = [seq for seq in self.running if not seq.is_finished]
        return scheduled

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
        """Finish ``seq``; a row in the batch is released, its KV kept for the conversation unless it failed."""
        seq.finish(reason, error)
        if not in_batch:
            return
        conv = seq.conversation_id
        keep = conv is not None and self.prefix_cache.enabled and reason is not FinishReason.ERROR
        if conv is not None and keep:
            token_ids = tuple(seq.kv_token_ids)
            entry = PrefixEntry(token_ids, seq.seq_id, len(token_ids) * self.kv_bytes_per_token)
            self._freed.extend(self.prefix_cache.put(conv, entry))
        self._releases.append(Release(seq.seq_id, keep))

    # ---- requests leaving early --------------------------------------------------------------------------------

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request's sequence with ABORT (its row leaves the batch at the next step, its KV kept for
        the conversation); None if no unfinished sequence has that request id."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish(FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        return None

    def finish_all(self, reason: FinishReason, error: str | None = None, *, waiting: bool = True) -> list[Sequence]:
        """Finish every running sequence (and every waiting one when ``waiting``) with ``reason``, forget the
        pending releases and clear the prefix cache: the caller resets the runner, which drops the batch and the
        kept KV."""
        seqs = [*self.running, *(self.waiting if waiting else ())]
        for seq in seqs:
            seq.finish(reason, error)
        self.running = []
        if waiting:
            self.waiting.clear()
        self._releases, self._freed = [], []
        self.prefix_cache.clear()
        return seqs
