"""A continuous-batching engine on a transformers causal LM, its loop in one dedicated thread.

The event loop only calls :meth:`TransformersEngine.add_request`, :meth:`abort` and :meth:`stats`; they hand work to
the engine thread through a thread-safe inbox and a wake-up event. The thread sleeps while there is nothing to do.
Each step: drop aborted rows, prefill the sequences that join, decode one token for every running row, sample,
detokenize, check stops and push one :class:`Delta` per row to its stream.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from chatstream.config import EngineConfig
from chatstream.engine import sampler
from chatstream.engine.base import Delta, EngineError, EngineStats, FinishReason, GenerationRequest, RequestStream
from chatstream.engine.cpu import runtime as cpu_runtime
from chatstream.engine.detokenizer import IncrementalDetokenizer
from chatstream.engine.kv_cache import DecodeBatch, PrefixCache, PrefixEntry, common_prefix_len
from chatstream.engine.model_runner import ModelRunner
from chatstream.engine.scheduler import (
    Scheduler,
    Sequence,
    SequenceStatus,
    eos_token_ids,
    stop_reason,
    stop_token_ids,
    truncate_prompt,
)

logger = logging.getLogger(__name__)

_Delivery = list[tuple[Sequence, Delta]]

BURST_POLL_S = 0.003
"""After idling, the engine waits this long for more requests before its first prefill (see ``_await_burst``)."""

BURST_MAX_S = 0.025
"""The longest the engine waits for a burst of requests to finish arriving."""


class TransformersEngine:
    """Continuous batching on a transformers model (implements :class:`chatstream.engine.base.Engine`).

    Args:
        model: a causal LM (eval mode; on the device it should run on).
        tokenizer: its tokenizer (``encode``/``decode``, ``eos_token_id``).
        config: batch size, context length, prefill budget, prefix-cache budget.
        num_threads: torch compute threads, set when the engine thread starts (None: ``$CHATSTREAM_NUM_THREADS``,
            else one per physical core; see :mod:`chatstream.engine.cpu.runtime`). The setting is process-wide.
        pack_weights: on the CPU, run the linear layers on oneDNN-prepacked weights where this CPU supports their
            dtype, and transformers' RMSNorms in one kernel (faster; one more copy of the linear weights in memory;
            see :mod:`chatstream.engine.cpu.fast_path`). False keeps the weights as they are. Whether supported
            families run through the fused decoder is ``config.fused_decoder``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig | None = None,
        *,
        num_threads: int | None = None,
        pack_weights: bool = True,
    ) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.num_threads = num_threads
        self._runner = ModelRunner(model, pack_weights=pack_weights, fused_decoder=self.config.fused_decoder)
        self._scheduler = Scheduler(self.config.max_batch_size, self.config.max_prefill_tokens)
        self._prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self._eos_ids = eos_token_ids(model, tokenizer)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active_ids: set[str] = set()  # guarded by _lock
        self._num_inbox = 0  # guarded by _lock
        self._running: list[Sequence] = []
        self._batch: DecodeBatch | None = None
        self._counters = {"generated": 0, "prompt": 0, "cached": 0}
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}  # engine thread only

    # ---- event-loop side -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            if self._runner.device.type == "cpu":
                cpu_runtime.release_thread_pool()  # this thread's idle OpenMP workers would slow the engine's
            self._thread = threading.Thread(target=self._run, name="chatstream-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Abort every request and join the engine thread (idempotent)."""
        with self._lock:
            thread, self._stopping = self._thread, True
        if thread is None:
            return
        self._wake.set()
        thread.join()
        with self._lock:
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and not self._stopping

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request``; returns its stream. Must be called on the event loop."""
        stream = RequestStream(request.request_id)
        with self._lock:
            if self._thread is None or self._stopping:
                raise EngineError("the engine is not running")
            if request.request_id in self._active_ids:
                raise EngineError(f"request_id {request.request_id!r} is already in use")
            self._active_ids.add(request.request_id)
            self._num_inbox += 1
        self._inbox.put(("add", (request, stream, asyncio.get_running_loop())))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Drop the request at the next step (its stream ends with ABORT); unknown ids are ignored."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        """A snapshot of the load (approximate while the engine thread is mid-step)."""
        with self._lock:
            num_inbox = self._num_inbox
        return EngineStats(
            num_running=len(self._running),
            num_waiting=num_inbox + len(self._scheduler.waiting),
            num_generated_tokens_total=self._counters["generated"],
            num_prompt_tokens_total=self._counters["prompt"],
            num_cached_tokens_total=self._counters["cached"],
            prefix_cache_bytes=self._prefix_cache.num_bytes,
            prefix_cache_entries=len(self._prefix_cache),
        )

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        threads = cpu_runtime.configure_threads(self.num_threads)
        if self._runner.device.type == "cpu":
            cpu_runtime.keep_freed_memory()
        logger.info("engine thread started (max_batch_size=%d, threads=%d)", self.config.max_batch_size, threads)
        with torch.inference_mode():
            while not self._stopping:
                self._wake.clear()
                self._drain_inbox()
                if not self._running and not self._scheduler.waiting:
                    self._wake.wait()
                    self._await_burst()
                    continue
                try:
                    self._step()
                except Exception as exc:  # a bug in the step itself: fail what is in flight, keep serving
                    logger.exception("engine step failed")
                    self._fail_all(f"engine step failed: {exc}")
            self._drain_inbox()
            self._abort_everything()
        logger.info("engine thread stopped")

    def _await_burst(self) -> None:
        """Woken from idle: while requests keep arriving (at most BURST_POLL_S apart, for at most BURST_MAX_S), wait
        for them, so that a burst of simultaneous requests is prefilled as one batch instead of one row first and the
        rest a whole prefill later. A lone request waits BURST_POLL_S."""
        deadline = time.monotonic() + BURST_MAX_S
        with self._lock:
            seen = self._num_inbox
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(BURST_POLL_S)
            with self._lock:
                arrived, seen = self._num_inbox - seen, self._num_inbox
            if arrived <= 0:
                return

    def _drain_inbox(self) -> None:
        deliveries: _Delivery = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._lock:
                    self._num_inbox -= 1
                request, stream, loop = payload
                self._accept(request, stream, loop, deliveries)
            else:
                self._mark_aborted(payload)
        self._deliver(deliveries)

    def _accept(
        self, request: GenerationRequest, stream: RequestStream, loop: asyncio.AbstractEventLoop, out: _Delivery
    ) -> None:
        seq = Sequence(request=request, stream=stream, loop=loop)
        try:
            self._prepare(seq)
        except Exception as exc:
            logger.warning("request %s rejected: %s", request.request_id, exc)
            self._finish(seq, FinishReason.ERROR, out, error=str(exc))
            return
        self._scheduler.add(seq)

    def _prepare(self, seq: Sequence) -> None:
        """Tokenize, truncate and validate the prompt; set up the detokenizer, generator and stop ids."""
        request, params = seq.request, seq.request.sampling
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            ids = self._encode(request.prompt, request.add_special_tokens)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self._runner.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self._runner.vocab_size})")
        seq.prompt_ids, seq.max_new_tokens = truncate_prompt(ids, params.max_new_tokens, self.config.context_len)
        seq.stop_token_ids = stop_token_ids(params.stop_token_ids, self._eos_ids, params.ignore_eos)
        seq.generator = sampler.make_generator(params.seed)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_ids, stop=params.stop, replacements=request.output_replacements
        )

    def _encode(self, prompt: str, add_special_tokens: bool | None) -> list[int]:
        special = self.config.add_special_tokens if add_special_tokens is None else add_special_tokens
        kwargs = {} if special is None else {"add_special_tokens": special}
        ids = list(self.tokenizer.encode(prompt, **kwargs))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return ids or ([bos] if bos is not None else [])

    def _mark_aborted(self, request_id: str) -> None:
        for seq in (*self._running, *self._scheduler.waiting):
            if seq.request_id == request_id:
                seq.aborted = True

    def _step(self) -> None:
        out: _Delivery = []
        try:
            self._drop_aborted(out)
            joiners = self._scheduler.admit(len(self._running), self._prefill_cost)
            if joiners:
                self._prefill(joiners, out)
            if self._running:
                self._decode(out)
        finally:
            self._deliver(out)

    def _drop_aborted(self, out: _Delivery) -> None:
        for seq in self._scheduler.remove_aborted():
            self._finish(seq, FinishReason.ABORT, out)
        if any(s.aborted for s in self._running):
            assert self._batch is not None
            for row, seq in enumerate(self._running):
                if seq.aborted:
                    self._finish(seq, FinishReason.ABORT, out, self._batch, row)
            self._keep_unfinished()

    def _prefill_cost(self, seq: Sequence) -> int:
        return len(seq.prompt_ids) - self._reusable(seq)[1]

    def _reusable(self, seq: Sequence) -> tuple[PrefixEntry | None, int]:
        """The conversation's cached entry (not taken out yet) and how many prompt tokens it covers."""
        conv = seq.request.conversation_id
        if conv is None or not self._prefix_cache.enabled:
            return None, 0
        entry = self._prefix_cache.peek(conv)
        if entry is None:
            return None, 0
        # the last prompt token is always run, so that its logits give the first output token
        return entry, min(common_prefix_len(entry.token_ids, seq.prompt_ids), len(seq.prompt_ids) - 1)

    def _prefill(self, joiners: list[Sequence], out: _Delivery) -> None:
        plain: list[Sequence] = []
        hits: list[tuple[Sequence, PrefixEntry, int]] = []
        for seq in joiners:
            entry, reuse = self._reusable(seq)
            if seq.request.conversation_id is not None:
                self._prefix_cache.pop(seq.request.conversation_id)
            if entry is not None and reuse > 0:
                hits.append((seq, entry, reuse))
            else:
                plain.append(seq)
        if hits:
            self._run_prefill([seq for seq, _, _ in hits], out, hits=[(entry, reuse) for _, entry, reuse in hits])
        if plain:
            self._run_prefill(plain, out)

    def _run_prefill(
        self, seqs: list[Sequence], out: _Delivery, hits: list[tuple[PrefixEntry, int]] | None = None
    ) -> None:
        """Prefill ``seqs`` as one batch; with ``hits`` (one per sequence) on top of their cached KV."""
        started = time.perf_counter()
        try:
            if hits is not None:
                rows = [(entry.kv, reuse, seq.prompt_ids) for seq, (entry, reuse) in zip(seqs, hits, strict=True)]
                batch, logits, used = self._runner.prefill_on_prefixes(rows)
                for seq, n in zip(seqs, used, strict=True):
                    seq.num_cached_tokens = n
            else:
                batch, logits = self._runner.prefill([s.prompt_ids for s in seqs])
            tokens = self._sample(seqs, logits)
        except Exception as exc:
            if len(seqs) > 1:  # find the culprit: retry one by one
                logger.warning("batched prefill failed (%s); retrying the %d sequences one by one", exc, len(seqs))
                for i, seq in enumerate(seqs):
                    self._run_prefill([seq], out, None if hits is None else [hits[i]])
                return
            logger.exception("prefill failed for request %s", seqs[0].request_id)
            self._finish(seqs[0], FinishReason.ERROR, out, error=f"prefill failed: {exc}")
            return
        prefilled = time.perf_counter()
        for seq in seqs:
            seq.status = SequenceStatus.RUNNING
            self._counters["prompt"] += len(seq.prompt_ids)
            self._counters["cached"] += seq.num_cached_tokens
        keep = self._postprocess(seqs, batch, tokens, out)
        if keep:
            if len(keep) < len(seqs):
                batch.filter(keep)
            self._running.extend(seqs[i] for i in keep)
            self._batch = batch if self._batch is None else DecodeBatch.concatenate([self._batch, batch])
        logger.debug(
            "prefill of %d rows (%d prompt tokens, %d from the prefix cache, %d columns): %.0f ms, joining %.0f ms",
            len(seqs),
            sum(len(s.prompt_ids) for s in seqs),
            sum(s.num_cached_tokens for s in seqs),
            int(batch.attention_mask.shape[1]),
            (prefilled - started) * 1e3,
            (time.perf_counter() - prefilled) * 1e3,
        )

    def _decode(self, out: _Delivery) -> None:
        assert self._batch is not None
        try:
            logits = self._runner.decode(self._batch)
            tokens = self._sample(self._running, logits)
        except Exception as exc:
            logger.exception("decode step failed; failing the %d running requests", len(self._running))
            self._fail_all(f"decode failed: {exc}", out)
            return
        keep = self._postprocess(self._running, self._batch, tokens, out)
        if len(keep) < len(self._running):
            self._keep_unfinished()

    def _sample(self, seqs: SequenceABC[Sequence], logits: torch.Tensor) -> torch.Tensor:
        return sampler.sample(
            logits,
            [s.request.sampling for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
            [s.generator for s in seqs],
        )

    def _postprocess(self, seqs: list[Sequence], batch: DecodeBatch, tokens: torch.Tensor, out: _Delivery) -> list[int]:
        """Append each row's token, stream its text, finish it if it stops; returns the rows that go on."""
        batch.next_tokens = tokens
        keep: list[int] = []
        for row, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            try:
                seq.output_ids.append(token)
                self._counters["generated"] += 1
                reason = stop_reason(seq, token)
                text = "" if token in seq.stop_token_ids else seq.detokenizer.add_tokens((token,))
                if seq.detokenizer.stopped:
                    reason = FinishReason.STOP
            except Exception as exc:
                logger.exception("postprocessing failed for request %s", seq.request_id)
                self._finish(seq, FinishReason.ERROR, out, error=f"detokenization failed: {exc}")
                continue
            if reason is not None:
                self._finish(seq, reason, out, batch, row, text=text, token=token)
            else:
                out.append((seq, self._delta(seq, text, (token,))))
                keep.append(row)
        return keep

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        out: _Delivery,
        batch: DecodeBatch | None = None,
        row: int = -1,
        *,
        text: str = "",
        token: int | None = None,
        error: str | None = None,
    ) -> None:
        """Send the last delta of ``seq``; keep its KV for the conversation when it ended normally."""
        seq.status = SequenceStatus.FINISHED
        if reason is not FinishReason.ERROR and seq.detokenizer is not None:
            text += seq.detokenizer.flush()
        token_ids = (token,) if token is not None else ()
        out.append((seq, self._delta(seq, text, token_ids, reason, error)))
        with self._lock:
            self._active_ids.discard(seq.request_id)
        conv = seq.request.conversation_id
        if batch is not None and conv is not None and self._prefix_cache.enabled and reason is not FinishReason.ERROR:
            kv = batch.cache.extract_row(row, batch.num_padding(row))
            self._prefix_cache.put(conv, PrefixEntry(tuple(seq.prompt_ids + seq.output_ids[:-1]), kv))

    def _deliver(self, deliveries: _Delivery) -> None:
        """Hand the step's deltas to their event loops (usually one loop: one post per step, not one per delta)."""
        by_loop: dict[asyncio.AbstractEventLoop, _Delivery] = defaultdict(list)
        for seq, delta in deliveries:
            by_loop[seq.loop].append((seq, delta))
        for loop, items in by_loop.items():
            box = self._outboxes.get(loop)
            if box is None:
                for closed in [lp for lp in self._outboxes if lp.is_closed()]:
                    del self._outboxes[closed]
                box = self._outboxes[loop] = _Outbox(loop)
            box.post(items)

    def _delta(
        self,
        seq: Sequence,
        text: str,
        token_ids: tuple[int, ...],
        reason: FinishReason | None = None,
        error: str | None = None,
    ) -> Delta:
        return Delta(
            text=text,
            token_ids=token_ids,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_generated_tokens=len(seq.output_ids),
            num_cached_tokens=seq.num_cached_tokens,
            error=error,
        )

    def _keep_unfinished(self) -> None:
        keep = [row for row, seq in enumerate(self._running) if not seq.is_finished]
        self._running = [self._running[row] for row in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.filter(keep)

    def _fail_all(self, message: str, out: _Delivery | None = None) -> None:
        deliveries: _Delivery = [] if out is None else out
        for seq in self._running:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ERROR, deliveries, error=message)
        self._running, self._batch = [], None
        if out is None:
            self._deliver(deliveries)

    def _abort_everything(self) -> None:
        out: _Delivery = []
        for seq in (*self._running, *self._scheduler.waiting):
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT, out)
        self._running, self._batch = [], None
        self._scheduler.waiting.clear()
        self._prefix_cache.clear()
        self._deliver(out)


class _Outbox:
    """Deltas waiting for one event loop. The loop is woken (a thread-safe call, i.e. a syscall) only when it has
    drained the previous ones, so a busy loop takes several steps' deltas in one go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: _Delivery = []

    def post(self, items: _Delivery) -> None:
        with self._lock:
            wake = not self._items
            self._items.extend(items)
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:
                pass  # that loop is closed: nobody is listening any more

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for seq, delta in items:
            seq.stream.put_nowait(delta)
