"""ChatService: the core that every protocol shares (native, OpenAI, console), with no HTTP in it.

It holds the engine (one now; a pool behind the same methods later), admission control and its metrics, the default
sampling, the prompt factory and the locale, and offers what a chat turn needs, in order: ``new_chat_prompt``,
``requests.build_request`` (its :class:`~chatstream.request_builder.RequestBuilder`), ``acquire_slot`` (the one
admission wait, polling for a disconnect), ``generate`` or ``collect``, and the lifecycle (``startup``, ``shutdown``
with a drain). server/ and sessions/ depend on it; it depends on neither.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatstream.admission.admission import DEFAULT_USER, AdmissionController, QueueFull, Slot, Ticket
from chatstream.admission.generation import GenerationOutcome, GenerationStream, run_generation
from chatstream.admission.metrics import ChatStreamMetrics
from chatstream.admission.tasks import (
    IsDisconnected,
    await_unless_disconnected,
    merge_streams,
    run_unless_disconnected,
)
from chatstream.config import EngineConfig, MockConfig, SamplingParams, ServiceConfig
from chatstream.engine.base import Delta, Engine, GenerationRequest, GrammarEngine, engine_workers
from chatstream.engine.factory import EngineKind, EngineSpec
from chatstream.engine.factory import create_engine as build_engine
from chatstream.engine.grammar import GrammarSpec
from chatstream.i18n import message
from chatstream.request_builder import RequestBuilder

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

STARTUP_LOG_INTERVAL_SEC = 15.0
"""While the engine loads, a log line says so this often."""

ConsoleItem = tuple[str, str, str]
"""One console update: (answer so far, new text, "begin" | "mid" | "end")."""


@dataclass(frozen=True)
class PromptFactory:
    """Makes the chat histories of one service: the configured prompt class with the tokenizer attached."""

    prompt_class: type[AbstractChatPrompt]
    tokenizer: Any = None

    def create(self) -> AbstractChatPrompt:
        """An empty history (the original's ``create_chat_prompt``)."""
        chat_prompt = self.prompt_class()
        chat_prompt.set_tokenizer(self.tokenizer)
        return chat_prompt

    def new_chat_prompt(self) -> AbstractChatPrompt:
        """An empty history with its initial prompt built, ready for the first turn."""
        chat_prompt = self.create()
        chat_prompt.build_initial_prompt(chat_prompt)
        return chat_prompt


def default_prompt_class(tokenizer: Any, mock: bool) -> type[AbstractChatPrompt]:
    """``ChatTemplatePrompt`` when the tokenizer has a chat template, else the plain User/Assistant preset."""
    from chatstream.prompts.chat_template import ChatTemplatePrompt
    from chatstream.prompts.presets import ChatPromptPlainUserAssistant

    if not mock and getattr(tokenizer, "chat_template", None):
        return ChatTemplatePrompt
    return ChatPromptPlainUserAssistant


def create_engine(model: Any, tokenizer: Any, config: EngineConfig, mock: MockConfig | None = None) -> Engine:
    """The mock engine (``mock`` given), else the transformers engine on ``model`` and ``tokenizer`` (other engines:
    :func:`chatstream.engine.factory.create_engine`)."""
    spec = EngineSpec(EngineKind.MOCK, mock) if mock is not None else EngineSpec()
    return build_engine(spec, model, tokenizer, config)


def freeze_gc_heap(log: logging.Logger = logger) -> bool:
    """Collect the garbage, then freeze every object alive out of the collector's passes (``gc.freeze()``), unless
    this process already froze its heap. True when it froze.

    A server's heap is mostly what it loaded at startup (torch, transformers, vLLM, the model: 0.4 million objects
    and more), and a full collection walks all of it while holding the GIL: 0.25-0.6 s measured on a 2-core CPU,
    every stream paused. Frozen objects are skipped by the collector and still freed by reference counting; only
    a reference cycle among them that later becomes garbage is kept.
    """
    if gc.get_freeze_count():
        return False
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    elapsed_ms = 1000 * (time.perf_counter() - started)
    log.info("froze %d startup objects out of the garbage collector (%.0f ms)", gc.get_freeze_count(), elapsed_ms)
    return True


class ChatService:
    """One model behind admission control: what the native API, the OpenAI API and the console all use.

    Args:
        config: name, model id, locale, admission limits, default sampling, device information.
        engine: the engine that generates (see :func:`create_engine`).
        prompts: makes the chat histories.
        logger: where lifecycle messages go (default: this module's logger).
    """

    def __init__(
        self, config: ServiceConfig, engine: Engine, prompts: PromptFactory, logger: logging.Logger | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.prompts = prompts
        self.logger = logger or logging.getLogger(__name__)
        self._admission: AdmissionController | None = None
        self._metrics: ChatStreamMetrics | None = None
        self.requests = RequestBuilder(config, engine, prompts.tokenizer, self.logger)
        """Builds the engine requests: sampling, stops, the prompt fitted into the context, what the engine can do."""
        self._starting: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def locale(self) -> str:
        return self.config.locale

    @property
    def default_sampling(self) -> SamplingParams:
        return self.config.sampling

    @property
    def admission(self) -> AdmissionController:
        """The admission controller (created on first use, inside the running event loop)."""
        if self._admission is None:
            self._admission = AdmissionController(self.config.admission)
        return self._admission

    @property
    def metrics(self) -> ChatStreamMetrics:
        """This service's Prometheus metrics."""
        if self._metrics is None:
            self._metrics = ChatStreamMetrics(
                running=lambda: self.admission.num_running,
                waiting=lambda: self.admission.num_waiting,
                engine_stats=self.engine.stats,
                workers=lambda: engine_workers(self.engine),
            )
        return self._metrics

    def engine_info(self) -> dict[str, Any]:
        """What the engine says about itself (its ``describe()``: kind, model, context length, upstream URL) and its
        current load, for /get_load, /get_resource_usage and /v1/models."""
        describe = getattr(self.engine, "describe", None)
        info: dict[str, Any] = dict(describe()) if callable(describe) else {}
        info.setdefault("engine", type(self.engine).__name__)
        stats = self.engine.stats()
        info.update(num_running=stats.num_running, num_waiting=stats.num_waiting)
        return info

    # ----- what a request starts from (its engine request: ``self.requests``) -----

    def new_chat_prompt(self) -> AbstractChatPrompt:
        """A new history of the configured prompt class, tokenizer attached, initial prompt built."""
        return self.prompts.new_chat_prompt()

    async def validate_grammar(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` in a worker thread (cached by the engine), or raise ValueError naming ``spec.field``:
        the schema is bad, or this engine cannot constrain its output."""
        if not isinstance(self.engine, GrammarEngine):
            raise ValueError(f"{spec.field}: the {type(self.engine).__name__} cannot constrain its output")
        await asyncio.to_thread(self.engine.validate_grammar, spec)

    # ----- admission and generation -----

    async def acquire_slot(
        self, is_disconnected: IsDisconnected, user: str = DEFAULT_USER, ticket_id: str | None = None
    ) -> Slot | None:
        """A slot to generate: at once, or after waiting in line (fairly across users: ``user`` names the caller);
        None when the client left while waiting. ``ticket_id`` lets the caller's place in line be looked up.

        Raises QueueFull (the line is full; counted as a rejection) or Draining (shutting down).
        """
        return await self.wait_for_slot(self.enqueue(user, ticket_id), is_disconnected)

    def enqueue(self, user: str = DEFAULT_USER, ticket_id: str | None = None) -> Ticket:
        """A place in line (already admitted when a slot is free). Raises QueueFull (counted) or Draining."""
        try:
            ticket = self.admission.enqueue(user, ticket_id)
        except QueueFull:
            self.metrics.rejected.inc()
            raise
        if ticket.slot is not None:
            self.record_admission(ticket.slot)
        return ticket

    async def wait_for_slot(self, ticket: Ticket, is_disconnected: IsDisconnected) -> Slot | None:
        """The ticket's slot once admitted; None (and the ticket closed) when the client leaves first."""
        if ticket.slot is not None:
            return ticket.slot
        try:
            slot = await run_unless_disconnected(ticket.wait(), is_disconnected, Slot.release)
        except QueueFull:
            self.metrics.rejected.inc()
            raise
        if slot is not None:
            self.record_admission(slot)
        return slot

    def record_admission(self, slot: Slot) -> None:
        """Count an admission and its time in line."""
        self.metrics.admitted.inc()
        self.metrics.queue_time.observe(slot.queue_time)

    def generate(
        self, request: GenerationRequest, outcome: GenerationOutcome, arrived: float | None = None
    ) -> AsyncGenerator[Delta, None]:
        """The engine's deltas for ``request``, recorded in ``outcome`` and the metrics; closing it aborts the
        request in the engine. ``arrived`` (monotonic) starts the end-to-end latency (default: now)."""
        return run_generation(self.engine, request, self.metrics, outcome, arrived)

    def start_generation(self, request: GenerationRequest, arrived: float | None = None) -> GenerationStream:
        """``request`` as a stream that starts when it is first iterated (engine failures raise from it)."""
        outcome = GenerationOutcome()
        return GenerationStream(request, outcome, self.generate(request, outcome, arrived))

    async def open_generation(
        self, request: GenerationRequest, is_disconnected: IsDisconnected, arrived: float | None = None
    ) -> GenerationStream | None:
        """Start ``request`` and wait for its first delta, before the caller commits to a streaming 200.

        Raises what the engine's stream raises before its first delta (EngineOverloaded: the protocols answer 429
        with Retry-After; EngineError: 503), so that such failures get a proper status instead of a broken stream.
        None when the client left while waiting (the request is aborted then).
        """
        outcome = GenerationOutcome()
        rest = self.generate(request, outcome, arrived)
        try:
            first = await await_unless_disconnected(anext(rest), is_disconnected)
        except BaseException:
            await rest.aclose()
            raise
        if first is None:  # the client left while waiting
            await rest.aclose()  # aborts the request
            return None
        return GenerationStream(request, outcome, rest, first)

    async def collect(
        self, request: GenerationRequest, is_disconnected: IsDisconnected, arrived: float | None = None
    ) -> GenerationOutcome | None:
        """Run ``request`` to its end; None (and the request aborted) when the client disconnects first."""
        outcome = GenerationOutcome()

        async def consume() -> GenerationOutcome:
            async with aclosing(self.generate(request, outcome, arrived)) as deltas:
                async for _ in deltas:
                    pass
            return outcome

        return await run_unless_disconnected(consume(), is_disconnected)

    async def collect_all(
        self, requests: Sequence[GenerationRequest], is_disconnected: IsDisconnected, arrived: float | None = None
    ) -> list[GenerationOutcome] | None:
        """Run several requests (the ``n`` choices of one OpenAI request) to their ends, together; None (and every
        request aborted) when the client disconnects first."""
        outcomes = await asyncio.gather(*(self.collect(r, is_disconnected, arrived) for r in requests))
        return None if any(o is None for o in outcomes) else [o for o in outcomes if o is not None]

    async def merge_generations(
        self, generations: Sequence[GenerationStream]
    ) -> AsyncGenerator[tuple[int, Delta], None]:
        """The deltas of several generations (the ``n`` choices of one OpenAI request) as they come, each with the
        index of its generation; closing the iterator aborts the ones still running."""
        if len(generations) == 1:
            async with aclosing(generations[0].deltas()) as deltas:
                async for delta in deltas:
                    yield 0, delta
            return
        async with aclosing(merge_streams([g.deltas() for g in generations])) as merged:
            async for item in merged:
                yield item

    async def console_turn(
        self, chat_prompt: AbstractChatPrompt, user_input: str, conversation_id: str | None = None
    ) -> AsyncIterator[ConsoleItem]:
        """One console turn on ``chat_prompt`` (no admission control): "begin", "mid" ... items, then "end"."""
        chat_prompt.add_requester_msg(user_input)
        chat_prompt.add_responder_msg(None)
        request = self.requests.build_request(chat_prompt, conversation_id=conversation_id)
        outcome = GenerationOutcome()
        shown = ""
        try:
            async with aclosing(self.generate(request, outcome)) as deltas:
                async for _ in deltas:
                    current = outcome.text.lstrip()
                    if current != shown:
                        yield current, current[len(shown) :], "mid" if shown else "begin"
                        shown = current
            yield shown, "", "end"
        finally:
            chat_prompt.set_responder_last_msg(outcome.text.strip())

    # ----- lifecycle -----

    async def startup(self) -> None:
        """Start the engine (idempotent). Called by the app's lifespan or on the first request.

        An engine that constrains output builds its grammar token table here, in a worker thread, before the server
        takes requests: the build holds the GIL for seconds on a large vocabulary (see engine/structured.py). An
        engine whose start blocks (``blocking_start``: vLLM loads the model, for minutes) starts in a worker thread
        while the event loop keeps serving (/health answers "starting"); the log says how long it has been loading.
        """
        if self.engine.is_running:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_engine())
        await asyncio.shield(self._starting)

    async def _start_engine(self) -> None:
        name = type(self.engine).__name__
        # a default the engine cannot honour would fail every request
        self.requests.check_sampling(self.default_sampling)
        if getattr(self.engine, "blocking_start", False):
            await self._start_in_thread(name)
        else:
            self.engine.start()  # quick, and on this thread (our engine frees the loading thread's OpenMP pool)
        if isinstance(self.engine, GrammarEngine):
            await asyncio.to_thread(self.engine.prepare_grammars)
        if self.config.freeze_gc_heap:
            freeze_gc_heap(self.logger)
        self.logger.info("ChatStream %r started (%s)", self.name, name)

    async def _start_in_thread(self, name: str) -> None:
        self.logger.info("ChatStream %r: the engine (%s) is loading the model", self.name, name)
        started = time.monotonic()
        task = asyncio.ensure_future(asyncio.to_thread(self.engine.start))
        while not (await asyncio.wait({task}, timeout=STARTUP_LOG_INTERVAL_SEC))[0]:
            elapsed = time.monotonic() - started
            self.logger.info("ChatStream %r: the engine (%s) is still loading (%.0f s)", self.name, name, elapsed)
        task.result()
        self.logger.info("ChatStream %r: the engine (%s) loaded in %.1f s", self.name, name, time.monotonic() - started)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting (new requests get 503), let running generations finish for up to ``drain_timeout`` s,
        then stop the engine (what is still running is aborted)."""
        self.logger.info(message("drain_started", self.locale), drain_timeout, self.admission.num_running)
        if not await self.admission.drain(drain_timeout):
            self.logger.warning("drain timed out after %.1f s; aborting running generations", drain_timeout)
        await asyncio.to_thread(self.engine.stop)
        self.logger.info(message("drain_finished", self.locale))
