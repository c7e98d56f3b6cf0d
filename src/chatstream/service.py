"""ChatService: the core that every protocol shares (native, OpenAI, console), with no HTTP in it.

It holds the engine (one now; a pool behind the same methods later), admission control and its metrics, the default
sampling, the prompt factory and the locale, and offers what a chat turn needs, in order: ``new_chat_prompt``,
``build_request``, ``acquire_slot`` (the one admission wait, polling for a disconnect), ``generate`` or ``collect``,
and the lifecycle (``startup``, ``shutdown`` with a drain). server/ and sessions/ depend on it; it depends on neither.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from chatstream.admission.admission import AdmissionController, QueueFull, Slot
from chatstream.admission.generation import GenerationOutcome, run_generation
from chatstream.admission.metrics import ChatStreamMetrics
from chatstream.config import EngineConfig, MockConfig, SamplingOverrides, SamplingParams, ServiceConfig
from chatstream.engine.base import Delta, Engine, GenerationRequest, engine_workers, wants_chat_context
from chatstream.engine.mock_engine import MockEngine, MockRequest
from chatstream.i18n import message

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

T = TypeVar("T")

DISCONNECT_POLL_SEC = 0.25
"""How often a request that waits (for a slot, or for a whole answer) checks whether its client is still there."""

IsDisconnected = Callable[[], Awaitable[bool]]
"""Answers whether the client has gone (Starlette's ``request.is_disconnected``)."""

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
    """The mock engine (``mock`` given), else the transformers engine on ``model`` and ``tokenizer``."""
    if mock is not None:
        return MockEngine(mock)
    if model is None or tokenizer is None:
        raise ValueError("model and tokenizer are required unless use_mock_response=True")
    from chatstream.engine.async_engine import TransformersEngine  # the one place that names it

    return TransformersEngine(model, tokenizer, config)


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
                workers=lambda: engine_workers(self.engine),
            )
        return self._metrics

    # ----- building the request -----

    def new_chat_prompt(self) -> AbstractChatPrompt:
        """A new history of the configured prompt class, tokenizer attached, initial prompt built."""
        return self.prompts.new_chat_prompt()

    def sampling_for(self, overrides: SamplingOverrides | None) -> SamplingParams:
        """The default sampling with a conversation's own values over it."""
        return overrides.apply(self.default_sampling) if overrides is not None else self.default_sampling

    def build_request(
        self,
        chat_prompt: AbstractChatPrompt,
        overrides: SamplingOverrides | None = None,
        conversation_id: str | None = None,
    ) -> GenerationRequest:
        """The engine request for the pending answer of ``chat_prompt`` (prompt text, stops, replacements)."""
        stops = tuple(chat_prompt._get_final_stop_strs() or ()) if chat_prompt.is_chat_mode_enabled() else ()
        request = GenerationRequest(
            request_id=f"chat-{uuid.uuid4().hex}",
            prompt=chat_prompt.create_prompt(),
            sampling=self.sampling_for(overrides).with_updates(stop=stops),
            output_replacements=tuple(chat_prompt.get_replacement_when_output() or ()),
            conversation_id=conversation_id,
            add_special_tokens=self._add_special_tokens_for(chat_prompt),
        )
        return self._for_engine(request, chat_prompt.get_requester_last_msg(), chat_prompt.get_turn())

    def build_text_request(self, request_id: str, prompt: str, sampling: SamplingParams) -> GenerationRequest:
        """The engine request for a raw prompt (no chat formatting, no conversation)."""
        return self._for_engine(GenerationRequest(request_id=request_id, prompt=prompt, sampling=sampling), prompt)

    def _add_special_tokens_for(self, chat_prompt: AbstractChatPrompt) -> bool | None:
        # The configured add_special_tokens wins; otherwise a prompt class whose text already holds the special
        # tokens (a chat template starts with BOS) says not to add them again.
        if self.config.add_special_tokens is not None:
            return self.config.add_special_tokens
        return None if getattr(chat_prompt, "encode_add_special_tokens", True) else False

    def _for_engine(self, request: GenerationRequest, user_input: str | None, turn: int = 0) -> GenerationRequest:
        # The mock answers from the user's input and the turn number, which only its own request type carries; the
        # engine says whether it wants them (a pool or a Ray client forwards what its members say).
        if not wants_chat_context(self.engine):
            return request
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        return MockRequest(**fields, user_input=user_input, turn=turn)

    # ----- admission and generation -----

    async def acquire_slot(self, is_disconnected: IsDisconnected) -> Slot | None:
        """A slot to generate: at once, or after waiting in line; None when the client left while waiting.

        Raises QueueFull (the line is full; counted as a rejection) or Draining (shutting down).
        """
        try:
            slot = await run_unless_disconnected(self.admission.acquire(), is_disconnected, Slot.release)
        except QueueFull:
            self.metrics.rejected.inc()
            raise
        if slot is not None:
            self.metrics.admitted.inc()
            self.metrics.queue_time.observe(slot.queue_time)
        return slot

    def generate(
        self, request: GenerationRequest, outcome: GenerationOutcome, arrived: float | None = None
    ) -> AsyncGenerator[Delta, None]:
        """The engine's deltas for ``request``, recorded in ``outcome`` and the metrics; closing it aborts the
        request in the engine. ``arrived`` (monotonic) starts the end-to-end latency (default: now)."""
        return run_generation(self.engine, request, self.metrics, outcome, arrived)

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

    async def console_turn(
        self, chat_prompt: AbstractChatPrompt, user_input: str, conversation_id: str | None = None
    ) -> AsyncIterator[ConsoleItem]:
        """One console turn on ``chat_prompt`` (no admission control): "begin", "mid" ... items, then "end"."""
        chat_prompt.add_requester_msg(user_input)
        chat_prompt.add_responder_msg(None)
        request = self.build_request(chat_prompt, conversation_id=conversation_id)
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
        """Start the engine (idempotent). Called by the app's lifespan or on the first request."""
        if not self.engine.is_running:
            self.engine.start()
            self.logger.info("ChatStream %r started (%s)", self.name, type(self.engine).__name__)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting (new requests get 503), let running generations finish for up to ``drain_timeout`` s,
        then stop the engine (what is still running is aborted)."""
        self.logger.info(message("drain_started", self.locale), drain_timeout, self.admission.num_running)
        if not await self.admission.drain(drain_timeout):
            self.logger.warning("drain timed out after %.1f s; aborting running generations", drain_timeout)
        await asyncio.to_thread(self.engine.stop)
        self.logger.info(message("drain_finished", self.locale))


async def run_unless_disconnected(
    work: Awaitable[T], is_disconnected: IsDisconnected, on_abandoned: Callable[[T], object] | None = None
) -> T | None:
    """``work``'s result, or None once the client has gone (then ``work`` is cancelled, and a result it produced in
    that same instant is handed to ``on_abandoned``). Checks every ``DISCONNECT_POLL_SEC``; exceptions propagate."""
    task = asyncio.ensure_future(work)
    finished = False
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SEC)
            if done:
                finished = True
                return task.result()
            if await is_disconnected():
                return None
    finally:
        if not finished:  # the client left, or our caller was cancelled
            await _cancel_quietly(task)
            if on_abandoned is not None and task.done() and not task.cancelled() and task.exception() is None:
                on_abandoned(task.result())


async def _cancel_quietly(future: asyncio.Future[Any]) -> None:
    """Cancel ``future`` and wait for it, swallowing what it raises."""
    future.cancel()
    try:
        await future
    except (asyncio.CancelledError, Exception):
        pass
