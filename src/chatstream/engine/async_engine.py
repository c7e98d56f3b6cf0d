"""The engine behind the event loop: an :class:`~chatstream.engine.llm_engine.LLMEngine` stepped in a thread of its
own, fed through a thread-safe inbox, its deltas delivered to the requests' asyncio streams.

The event loop only calls :meth:`TransformersEngine.add_request`, :meth:`~TransformersEngine.abort` and
:meth:`~TransformersEngine.stats`; they hand work to the engine thread through the inbox and a wake-up event. The
thread sleeps while there is nothing to do; woken from idle, it waits briefly for the rest of a burst of requests so
that they are prefilled together. After every step it posts the deltas to their event loops, waking each loop at
most once until it has taken what was posted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any, NamedTuple

from chatstream.config import EngineConfig
from chatstream.engine.base import Delta, EngineError, EngineStats, GenerationRequest, RequestStream
from chatstream.engine.cpu import runtime
from chatstream.engine.grammar import GrammarSpec
from chatstream.engine.llm_engine import LLMEngine, RequestOutput

logger = logging.getLogger(__name__)

BURST_POLL_S = 0.003
"""After idling, the engine waits this long for more requests before its first prefill (see ``_await_burst``)."""

BURST_MAX_S = 0.025
"""The longest the engine waits for a burst of requests to finish arriving."""


class _Client(NamedTuple):
    """Where a request's deltas go."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop


class TransformersEngine:
    """Continuous batching on a transformers model in a thread of its own (implements
    :class:`chatstream.engine.base.Engine`).

    Args:
        model: a causal LM (eval mode; on the device it should run on).
        tokenizer: its tokenizer (``encode``/``decode``, ``eos_token_id``).
        config: batch size, context length, prefill budget, prefix-cache budget, fused decoder.
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
        self.config = config or EngineConfig()
        self.num_threads = num_threads
        self.llm = LLMEngine(model, tokenizer, self.config, pack_weights=pack_weights)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active_ids: set[str] = set()  # guarded by _lock
        self._num_inbox = 0  # guarded by _lock
        self._clients: dict[str, _Client] = {}  # engine thread only
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}  # engine thread only

    # ---- event-loop side -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            if self.llm.model_runner.device.type == "cpu":
                runtime.release_thread_pool()  # this thread's idle OpenMP workers would slow the engine's
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

    def prepare_grammars(self) -> None:
        """Build the grammar compiler's token table now (blocking, and holding the GIL: seconds on a large
        vocabulary); the service does it at start-up, before the server takes requests."""
        self.llm.grammars.build()

    def validate_grammar(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` or raise ValueError naming its field (blocking: call it in a worker thread)."""
        self.llm.validate_grammar(spec)

    def check_health(self) -> None:
        """Raise EngineError when this engine cannot serve: not started, stopped, or its thread died."""
        thread = self._thread
        if thread is None or self._stopping:
            raise EngineError("the engine is not running")
        if not thread.is_alive():
            raise EngineError("the engine thread died")

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
        self._inbox.put(("add", (request, _Client(stream, asyncio.get_running_loop()))))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Drop the request at the next step (its stream ends with ABORT); unknown ids are ignored."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def describe(self) -> dict[str, Any]:
        """What /get_load, /get_resource_usage and /v1/models show of this engine."""
        config = getattr(self.llm.model_runner.model, "config", None)
        return {
            "engine": "transformers",
            "model": getattr(config, "name_or_path", None) or None,
            "max_model_len": self.config.context_len,
        }

    def stats(self) -> EngineStats:
        """A snapshot of the load (approximate while the engine thread is mid-step)."""
        with self._lock:
            num_inbox = self._num_inbox
        stats = self.llm.stats()
        return dataclasses.replace(stats, num_waiting=stats.num_waiting + num_inbox)

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        threads = runtime.configure_threads(self.num_threads)
        if self.llm.model_runner.device.type == "cpu" and runtime.keep_freed_memory():
            runtime.reserve_memory(self.llm.kv_reserve_bytes)
        logger.info("engine thread started (max_batch_size=%d, threads=%d)", self.config.max_batch_size, threads)
        while not self._stopping:
            self._wake.clear()
            self._drain_inbox()
            if self.llm.has_work():
                self._deliver(self._step())
            else:
                self._wake.wait()
                self._await_burst()
        self._drain_inbox()
        self._deliver(self.llm.abort_all())
        logger.info("engine thread stopped")

    def _step(self) -> list[RequestOutput]:
        try:
            return self.llm.step()
        except Exception as exc:  # a bug in the step itself: fail what is in flight, keep serving
            logger.exception("engine step failed")
            return self.llm.fail_running(f"engine step failed: {exc}")

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
        outputs: list[RequestOutput] = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._lock:
                    self._num_inbox -= 1
                request, client = payload
                self._clients[request.request_id] = client
                outputs += self.llm.add_request(request)
            else:
                outputs += self.llm.abort_request(payload)
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand the deltas to their event loops (usually one loop: one post per step, not one per delta); a request
        whose last delta this is leaves, and its id may be used again."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Delta]]] = defaultdict(list)
        for request_id, delta in outputs:
            client = self._clients[request_id]
            if delta.finished:
                del self._clients[request_id]
                with self._lock:
                    self._active_ids.discard(request_id)
            by_loop[client.loop].append((client.stream, delta))
        for loop, items in by_loop.items():
            box = self._outboxes.get(loop)
            if box is None:
                for closed in [lp for lp in self._outboxes if lp.is_closed()]:
                    del self._outboxes[closed]
                box = self._outboxes[loop] = _Outbox(loop)
            box.post(items)


class _Outbox:
    """Deltas waiting for one event loop. The loop is woken (a thread-safe call, i.e. a syscall) only when it has
    drained the previous ones, so a busy loop takes several steps' deltas in one go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[RequestStream, Delta]] = []

    def post(self, items: list[tuple[RequestStream, Delta]]) -> None:
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
        for stream, delta in items:
            stream.put_nowait(delta)
