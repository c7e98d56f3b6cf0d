"""ChatStream: the seed's public class, mapped onto typed configs and wired to the engine, admission and handlers.

An orchestrator only: the queue lives in ``admission/``, the model loop in ``engine/``, the HTTP
endpoints in ``server/`` and the chat turn in ``sessions/handler.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from chatstream.admission.admission import AdmissionController, Draining, QueueFull, Slot
from chatstream.admission.generation import GenerationOutcome, cancel_quietly, run_generation
from chatstream.admission.metrics import ChatStreamMetrics
from chatstream.config import AdmissionConfig, EngineConfig, MockConfig, SamplingParams
from chatstream.engine.base import Engine, GenerationRequest
from chatstream.engine.mock_engine import MockEngine, MockRequest
from chatstream.server import native
from chatstream.server.access import ClientRoles
from chatstream.sessions.handler import (
    DISCONNECTED_BEFORE_STREAMING,
    AbstractRequestHandler,
    SimpleSessionRequestHandler,
)

if TYPE_CHECKING:
    import torch

    from chatstream.prompts.base import AbstractChatPrompt

_DISCONNECT_POLL_SEC = 0.25


class ChatStream:
    """A streaming chat service around one causal LM: sessions, admission control and continuous batching.

    The constructor takes the original package's arguments with the same names and defaults; see
    docs/compatibility.md for the few places where behaviour knowingly differs. Mount it in a FastAPI app with
    ``await chat_stream.handle_chat_stream_request(request)`` in a POST route (plus a session middleware), or with
    ``append_middlewares(app)`` and ``append_apis(app, {"all": True})``.

    Args:
        name: shown in /get_load and logs.
        model, tokenizer: a Hugging Face causal LM and its tokenizer (not needed with ``use_mock_response``).
        num_gpus: GPUs the model was loaded on (informational; see ``chatstream.models.load_model``).
        device: "cpu", "cuda", "cuda:N", "mps" or a ``torch.device``.
        num_of_concurrent_executions: generations that run (and are batched) at once.
        max_queue_size: requests that may wait for a slot; the next one is rejected at once.
        too_many_request_as_http_error: reject with 429 + Retry-After instead of the seed's 200.
        use_mock_response, mock_params: canned answers without a model; mock_params keys ``type`` ("round",
            "long", "echo"), ``initial_wait_sec``, ``time_per_token_sec``.
        chat_prompt_clazz: the prompt class (a subclass of ``AbstractChatPrompt``); None picks
            ``ChatTemplatePrompt`` when the tokenizer has a chat template, else the plain User/Assistant preset.
        max_new_tokens, context_len, temperature, top_k, top_p, repetition_penalty, repetition_penalty_method:
            default sampling; ``context_len`` truncates prompts from the left, keeping room for max_new_tokens.
        add_special_tokens: passed to the tokenizer when encoding prompts (None: its default).
        request_handler: where histories live (default: a new ``SimpleSessionRequestHandler``).
        logger: a ``logging.Logger`` (default: the logger named "chatstream").
        locale: "en" or "ja" for user-facing messages ("ja-JP" counts as ja).
        client_roles: role definitions (docs/roles.md); None gives a browser "user" role and an agent role.
        min_p, seed: extra sampling defaults (not in the seed).
        ignore_eos: keep generating past EOS up to max_new_tokens (for benchmarks; stop strings still apply).
        prefix_cache_bytes: memory for per-conversation KV caches kept between turns (0 disables reuse).
        on_feedback_received: called with a dict by POST /set_feedback.
        model_name: the id reported by /v1/models.
        api_keys: when set, the OpenAI endpoints require ``Authorization: Bearer <one of them>``.
        token_sampler, probe_mode_enabled: the original's sampler hooks; accepted and ignored (a warning is logged).
    """

    def __init__(
        self,
        name: str = "node:0",
        model: Any = None,
        tokenizer: Any = None,
        num_gpus: int | None = None,
        device: str | torch.device | None = None,
        num_of_concurrent_executions: int = 2,
        max_queue_size: int = 5,
        too_many_request_as_http_error: bool = False,
        use_mock_response: bool = False,
        mock_params: dict[Any, Any] | None = None,
        chat_prompt_clazz: type[AbstractChatPrompt] | None = None,
        max_new_tokens: int = 256,
        context_len: int = 1024,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        repetition_penalty: float | None = None,
        repetition_penalty_method: str = "multiplicative",
        add_special_tokens: bool | None = None,
        request_handler: AbstractRequestHandler | None = None,
        logger: logging.Logger | None = None,
        locale: str | None = None,
        client_roles: dict[str, Any] | None = None,
        *,
        min_p: float = 0.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        prefix_cache_bytes: int = 512 * 1024 * 1024,
        on_feedback_received: Callable[[dict[str, Any]], Any] | None = None,
        model_name: str | None = None,
        api_keys: tuple[str, ...] | list[str] = (),
        token_sampler: Any = None,
        probe_mode_enabled: bool = False,
    ) -> None:
        self.name = name
        self.logger = logger or logging.getLogger("chatstream")
        if token_sampler is not None or probe_mode_enabled:
            self.logger.warning(
                "token_sampler and probe_mode_enabled are accepted for compatibility and ignored: sampling is batched "
                "in the engine (see SamplingParams)"
            )
        self.locale = _normalize_locale(locale)
        self.model = model
        self.tokenizer = tokenizer
        self.device = _resolve_device(device)
        self.num_gpus = 0 if use_mock_response or (self.device is not None and self.device.type != "cuda") else num_gpus
        self.use_mock_response = use_mock_response
        self.model_name = model_name or _model_name(model, use_mock_response)
        self.default_sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            repetition_penalty_method=repetition_penalty_method,  # type: ignore[arg-type]  # validated to the enum
            seed=seed,
            ignore_eos=ignore_eos,
        )
        self.admission_config = AdmissionConfig(
            max_concurrency=num_of_concurrent_executions,
            max_queue_size=max_queue_size,
            reject_as_http_error=too_many_request_as_http_error,
        )
        self.engine_config = EngineConfig(
            context_len=context_len,
            max_batch_size=num_of_concurrent_executions,
            add_special_tokens=add_special_tokens,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        self.too_many_request_as_http_error = too_many_request_as_http_error
        self.client_roles = ClientRoles.from_config(client_roles)
        self.on_feedback_received = on_feedback_received
        self.api_keys = tuple(api_keys)
        self.engine: Engine = self._create_engine(mock_params)
        self.chat_prompt_clazz = chat_prompt_clazz or _default_prompt_class(tokenizer, use_mock_response)
        self._admission: AdmissionController | None = None
        self._metrics: ChatStreamMetrics | None = None
        self.request_handler = request_handler or SimpleSessionRequestHandler()
        self._attach_handler(self.request_handler)
        self._console_prompt: AbstractChatPrompt | None = None

    # ----- wiring -----

    def _create_engine(self, mock_params: dict[Any, Any] | None) -> Engine:
        if self.use_mock_response:
            return MockEngine(MockConfig.from_seed_params(mock_params))
        if self.model is None or self.tokenizer is None:
            raise ValueError("model and tokenizer are required unless use_mock_response=True")
        from chatstream.engine.transformers_engine import TransformersEngine

        return TransformersEngine(self.model, self.tokenizer, self.engine_config)

    def _attach_handler(self, handler: AbstractRequestHandler) -> None:
        handler.chat_stream = self
        handler.chat_prompt_clazz = self.chat_prompt_clazz
        handler.tokenizer = self.tokenizer
        handler.logger = self.logger

    @property
    def admission(self) -> AdmissionController:
        """The admission controller (created on first use, inside the running event loop)."""
        if self._admission is None:
            self._admission = AdmissionController(self.admission_config)
        return self._admission

    @property
    def metrics(self) -> ChatStreamMetrics:
        """This instance's Prometheus metrics."""
        if self._metrics is None:
            self._metrics = ChatStreamMetrics(
                running=lambda: self.admission.num_running, waiting=lambda: self.admission.num_waiting
            )
        return self._metrics

    # ----- lifecycle -----

    async def startup(self) -> None:
        """Start the engine (idempotent). Called by the app's lifespan or on the first request."""
        if not self.engine.is_running:
            self.engine.start()
            self.logger.info("ChatStream %r started (%s)", self.name, type(self.engine).__name__)

    async def start_queue_worker(self) -> None:
        """Kept for code written for the original package (a startup hook); same as :meth:`startup`."""
        await self.startup()

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting, let running streams finish for up to ``drain_timeout`` s, then stop the engine."""
        finished = await self.admission.drain(drain_timeout)
        if not finished:
            self.logger.warning("drain timed out after %.1f s; aborting running generations", drain_timeout)
        await asyncio.to_thread(self.engine.stop)

    # ----- the chat endpoint -----

    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: bytes | str | None = None,
        callback: Callable[[Request, str], Any] | None = None,
    ) -> Response:
        """Handle POST /chat_stream: role check, admission (run, wait or reject), then the streamed answer.

        ``request_body`` lets an endpoint that already read the body pass it in; ``callback(request, message)``
        (sync or async) is called once when the request is done with "success",
        "client_disconnected_while_streaming", "client_disconnected_before_streaming" or "unknown_error_occurred...".
        """
        denied = self.client_roles.deny_response(request, "chat_stream")
        if denied is not None:
            return denied
        if request_body is None:
            request_body = await request.body()  # read before waiting: the wait polls for a disconnect
        await self.startup()
        try:
            slot = await self._wait_for_slot(request)
        except QueueFull as e:
            self.metrics.rejected.inc()
            self.logger.info("queue full (%d waiting); rejected", self.admission.num_waiting)
            return native.too_many_requests(self.too_many_request_as_http_error, e.retry_after)
        except Draining:
            return native.service_unavailable("the server is shutting down")
        if slot is None:
            await _call_user_callback(callback, request, DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=499)
        self.metrics.admitted.inc()
        self.metrics.queue_time.observe(slot.queue_time)

        async def finished(req: Request, message: str) -> None:
            slot.release()
            await _call_user_callback(callback, req, message)

        try:
            return await self.request_handler.process_request(request, request_body, finished)
        except Exception:
            self.logger.exception("the request handler failed")
            await finished(request, "unknown_error_occurred,while process_request")
            return native.internal_error("generating response")

    async def _wait_for_slot(self, request: Request) -> Slot | None:
        """A slot, or None when the client went away while waiting. QueueFull/Draining propagate."""
        acquiring = asyncio.ensure_future(self.admission.acquire())
        while True:
            done, _ = await asyncio.wait({acquiring}, timeout=_DISCONNECT_POLL_SEC)
            if done:
                return acquiring.result()
            if await request.is_disconnected():
                await cancel_quietly(acquiring)  # type: ignore[arg-type]
                if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
                    acquiring.result().release()
                return None

    # ----- what the turn needs -----

    def new_chat_prompt(self) -> AbstractChatPrompt:
        """A fresh history of the configured prompt class, tokenizer attached, initial prompt built."""
        chat_prompt = self.request_handler.create_chat_prompt()
        chat_prompt.build_initial_prompt(chat_prompt)
        return chat_prompt

    def sampling_for_session(self, session: dict[str, Any] | None) -> SamplingParams:
        """The default sampling with the session's "generation_params" (set_generation_params) over it."""
        params = (session or {}).get("generation_params")
        return self._sampling_with(params)

    def _sampling_with(self, params: dict[str, Any] | None) -> SamplingParams:
        if not params:
            return self.default_sampling
        changes: dict[str, Any] = {}
        if params.get("temperature") is not None:
            changes["temperature"] = float(params["temperature"])
        if params.get("top_k_value") is not None:
            changes["top_k"] = int(params["top_k_value"])
        if params.get("top_p_value") is not None:
            top_p = float(params["top_p_value"])
            if top_p <= 0.0:
                changes["temperature"] = 0.0  # an empty nucleus means: always the most likely token
            else:
                changes["top_p"] = min(top_p, 1.0)
        return self.default_sampling.with_updates(**changes)

    def build_generation_request(
        self,
        chat_prompt: AbstractChatPrompt,
        generation_params: dict[str, Any] | None = None,
        conversation_id: str | None = None,
    ) -> GenerationRequest:
        """The engine request for the pending answer of ``chat_prompt`` (prompt text, stops, replacements)."""
        stops: list[str] = []
        if chat_prompt.is_chat_mode_enabled():
            stops = list(chat_prompt._get_final_stop_strs() or [])
        sampling = self._sampling_with(generation_params).with_updates(stop=tuple(stops))
        request = GenerationRequest(
            request_id=f"chat-{uuid.uuid4().hex}",
            prompt=chat_prompt.create_prompt(),
            sampling=sampling,
            output_replacements=tuple(chat_prompt.get_replacement_when_output() or ()),
            conversation_id=conversation_id,
            add_special_tokens=self._add_special_tokens_for(chat_prompt),
        )
        if isinstance(self.engine, MockEngine):
            fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
            return MockRequest(**fields, user_input=chat_prompt.get_requester_last_msg(), turn=chat_prompt.get_turn())
        return request

    def _add_special_tokens_for(self, chat_prompt: AbstractChatPrompt) -> bool | None:
        # The constructor's add_special_tokens wins; otherwise a prompt class whose text already holds the special
        # tokens (a chat template starts with BOS) says not to add them again.
        if self.engine_config.add_special_tokens is not None:
            return self.engine_config.add_special_tokens
        return None if getattr(chat_prompt, "encode_add_special_tokens", True) else False

    # ----- console chat -----

    async def handle_console_input(self, user_input: str) -> AsyncIterator[tuple[str, str, str]]:
        """One console turn: yields (answer so far, new text, pos) with pos "begin", "mid", then "end".

        A single history is kept for the console. Runs through the same engine, without admission control.
        """
        await self.startup()
        if self._console_prompt is None:
            self._console_prompt = self.new_chat_prompt()
        chat_prompt = self._console_prompt
        chat_prompt.add_requester_msg(user_input)
        chat_prompt.add_responder_msg(None)
        gen_request = self.build_generation_request(chat_prompt, conversation_id=f"console-{id(self)}")
        outcome = GenerationOutcome()
        shown = ""
        try:
            async with aclosing(run_generation(self.engine, gen_request, self.metrics, outcome)) as deltas:
                async for _ in deltas:
                    current = outcome.text.lstrip()
                    if current != shown:
                        pos = "begin" if not shown else "mid"
                        yield current, current[len(shown) :], pos
                        shown = current
            yield shown, "", "end"
        finally:
            chat_prompt.set_responder_last_msg(outcome.text.strip())

    # ----- the original's other APIs -----

    def append_apis(self, app: Any, opts: dict[str, Any] | None = None) -> None:
        """Mount the original's extra APIs (docs/api.md): ``{"include": [...]}``, ``{"exclude": [...]}`` or
        ``{"all": True}``, plus optional ``"web_ui_params"``."""
        from chatstream.server.apis import append_apis

        append_apis(self, app, opts)

    def append_middlewares(self, app: Any, opts: dict[str, Any] | None = None) -> None:
        """Add the session middleware, the client-role middleware and (when asked) CORS."""
        from chatstream.server.middlewares import append_middlewares

        append_middlewares(self, app, opts)

    def __getattr__(self, name: str) -> Any:
        # The seed's per-endpoint methods (handle_clear_context_request, index, js, ...) live in server/apis.py.
        if (name.startswith("handle_") and name.endswith("_request")) or name in ("index", "js"):
            from chatstream.server import apis

            target = getattr(apis, name, None)
            if target is not None:
                return lambda *args, **kwargs: target(self, *args, **kwargs)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


async def _call_user_callback(callback: Callable[[Request, str], Any] | None, request: Request, message: str) -> None:
    if callback is None:
        return
    result = callback(request, message)
    if inspect.isawaitable(result):
        await result


def _normalize_locale(locale: str | None) -> str:
    return "ja" if locale and locale.lower().replace("_", "-").split("-")[0] == "ja" else "en"


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    from chatstream.models.devices import parse_device  # imports torch: only when a device is given

    return parse_device(device)


def _model_name(model: Any, mock: bool) -> str:
    if mock:
        return "chatstream-mock"
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "chatstream-model")


def _default_prompt_class(tokenizer: Any, mock: bool) -> type[AbstractChatPrompt]:
    from chatstream.prompts.chat_template import ChatTemplatePrompt
    from chatstream.prompts.presets import ChatPromptPlainUserAssistant

    if not mock and getattr(tokenizer, "chat_template", None):
        return ChatTemplatePrompt
    return ChatPromptPlainUserAssistant
