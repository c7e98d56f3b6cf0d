"""ChatStream: the seed's public class, a facade over the chat service and the HTTP layer.

The constructor takes the original package's arguments and translates them, once, into typed configs
(``SamplingParams``, ``AdmissionConfig``, ``EngineConfig``, ``ServiceConfig``); it then builds the
:class:`~chatstream.service.ChatService` and the :class:`~chatstream.server.context.ServerContext`. Every other
method is a few lines that delegate to one of them. Which engine runs (a name, a spec, instances, devices, the seed's
mock) is resolved in engine_choice.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.admission.admission import AdmissionController
from chatstream.admission.metrics import ChatStreamMetrics
from chatstream.config import AdmissionConfig, EngineConfig, MockConfig, SamplingParams, ServiceConfig
from chatstream.engine.base import Engine
from chatstream.engine.factory import EngineKind, EngineSpec
from chatstream.engine_choice import (
    build_engine,
    default_model_name,
    engine_spec,
    num_engines,
    num_gpus_in_use,
    prompt_context_len,
    resolve_device,
    tokenizer_for,
)
from chatstream.i18n import normalize_locale
from chatstream.server import apis, middlewares, ops, webui
from chatstream.server.access import ClientRoles
from chatstream.server.context import ServerContext
from chatstream.server.http import DEFAULT_MAX_BODY_BYTES
from chatstream.server.native import NativeChat, UserCallback
from chatstream.server.queue_position import handle_queue_position_request
from chatstream.server.tool_calls import get_format
from chatstream.service import ChatService, ConsoleItem, PromptFactory, default_prompt_class
from chatstream.sessions.base import Store
from chatstream.sessions.handler import AbstractRequestHandler, SimpleSessionRequestHandler
from chatstream.sessions.keeper import DEFAULT_RETENTION_INTERVAL, ConversationKeeper

if TYPE_CHECKING:
    import torch

    from chatstream.engine.upstream_protocol import UpstreamConfig
    from chatstream.engine.vllm_config import VLLMConfig
    from chatstream.prompts.base import AbstractChatPrompt


class ChatStream:
    """A streaming chat service around one causal LM: sessions, admission control and continuous batching.

    The constructor takes the original package's arguments with the same names and defaults; see
    docs/compatibility.md for the few places where behaviour knowingly differs. Mount it in a FastAPI app with
    ``await chat_stream.handle_chat_stream_request(request)`` in a POST route (plus a session middleware), or with
    ``append_middlewares(app)`` and ``append_apis(app, {"all": True})``, or serve it whole with
    ``chatstream.server.app.create_app(chat_stream)``.

    Args:
        name: shown in /get_load and logs.
        model, tokenizer: a Hugging Face causal LM and its tokenizer (not needed with ``use_mock_response``).
        num_gpus: GPUs the model was loaded on (informational; see ``chatstream.models.load_model``).
        device: "cpu", "cuda", "cuda:N", "mps" or a ``torch.device``.
        num_of_concurrent_executions: generations that run (and are batched) at once.
        max_queue_size: requests that may wait for a slot; the next one is rejected at once.
        too_many_request_as_http_error: reject with 429 + Retry-After instead of the seed's 200.
        use_mock_response, mock_params: canned answers without a model; mock_params keys ``type`` ("round",
            "long", "echo", "script"), ``initial_wait_sec``, ``time_per_token_sec``, ``script`` (the answers of
            "script", one per request in turn). A tokenizer given with the mock counts its prompt tokens.
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
        fused_decoder: run the model families it supports (Llama, Mistral, Qwen2, Qwen3, Gemma-3) through the engine's
            fused CPU decoder; False keeps transformers' forward pass (``chatstream serve --no-fused-decoder``).
        max_prefill_tokens: prompt tokens (padding included) our engine prefills in one step beside the decode of
            the running streams; a longer prompt is prefilled in chunks (``--max-prefill-tokens``; docs/performance.md).
        max_decode_slowdown: while streams decode, the engine shrinks a prefill chunk so that the step takes at most
            this many times a step without one, more when more users wait for a first token than stream
            (``--max-decode-slowdown``; None: always ``max_prefill_tokens``).
        weight_quantization: None, "int8", "int4" or "w8a8": weights quantized at load time for the fused CPU
            decoder's decode (w8a8: also prefill; ``--weight-quantization``; speed and quality: docs/performance.md).
        cpu_kernels: the fused CPU decoder's norms, rotary embedding, MLP gate and attention in the compiled extension
            (``--cpu-kernels``; None: with w8a8 and for bf16 models where it runs; True: always; False: never).
        max_body_bytes: the largest request body accepted (default 1 MiB); a longer one gets 413 before it is read.
        fair_queue: serve the waiting line fairly across users (default); False: first come, first served.
        max_running_per_user: a hard cap on one user's running generations; None (default): each user's fair
            share, kept by the order in which freed slots are handed out (docs/api.md, "Fair queueing").
        engine: which engine generates (docs/engines.md): "transformers" (the default: ours, on ``model``), "vllm"
            (``model`` is then a model folder or Hugging Face id that vLLM loads), "upstream" (another
            OpenAI-compatible server; ``engine_options`` says where), "mock" (as ``use_mock_response``); an
            :class:`~chatstream.engine.factory.EngineSpec`; or an engine instance (any implementation of
            ``chatstream.engine.Engine``: then ``model`` is not needed). ``tokenizer`` still renders the prompts
            (for vLLM it is loaded from the model when not given). A list of engine instances is served as a pool
            (``chatstream.pool``), each running ``num_of_concurrent_executions``.
        engine_options: the chosen engine's own settings: a ``VLLMConfig`` for "vllm", an ``UpstreamConfig`` for
            "upstream" (required), a ``MockConfig`` for "mock" (else ``mock_params`` apply).
        devices: serve one copy of ``model`` per device ("cuda:0", "cuda:1", ...) as a pool behind the same endpoints:
            each conversation stays on the engine that holds its KV cache, new ones go to the least-loaded engine
            (docs/scaling.md). ``num_of_concurrent_executions`` is then per device, and admission control admits
            that many times the number of devices.
        store: where sessions and conversations are kept: a URL (``memory://``, the default; ``sqlite:///path.db``;
            ``redis://host:6379/0``) or a store from ``chatstream.sessions.open_store`` (docs/conversations.md).
            ``append_middlewares`` keeps sessions in it too.
        conversation_max_age: conversations not updated for this long are deleted (seconds, or "90d", "12h";
            "never" keeps them); None: the store's default (memory 12 h, SQLite and Redis never).
        max_conversations_per_user: each user keeps at most this many, the most recently updated (None: no limit).
        retention_interval: seconds between two sweeps of the retention task.
        tool_call_format: how the model writes tool calls (``hermes``, ``llama3_json``, ``mistral``,
            ``functiongemma``, ``pythonic``, or one added with ``chatstream.server.tool_calls.register_format``);
            None detects it from the chat template (docs/api.md, tool calling).
        freeze_gc_heap: once the engine has started, the objects alive then (the libraries, the model) are frozen
            out of Python's garbage collector (``gc.freeze()``, the first time in a process), so that its full
            collections stop pausing every stream for a quarter to half a second (docs/performance.md); they are
            still freed when nothing refers to them. False leaves the collector as it is.
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
        fused_decoder: bool = True,
        max_prefill_tokens: int = EngineConfig.max_prefill_tokens,
        max_decode_slowdown: float | None = EngineConfig.max_decode_slowdown,
        weight_quantization: str | None = None,
        cpu_kernels: bool | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        fair_queue: bool = True,
        max_running_per_user: int | None = None,
        engine: Engine | Sequence[Engine] | EngineSpec | str | None = None,
        engine_options: VLLMConfig | UpstreamConfig | MockConfig | None = None,
        devices: Sequence[str | torch.device] | None = None,
        store: str | Store = "memory://",
        conversation_max_age: float | str | None = None,
        max_conversations_per_user: int | None = None,
        retention_interval: float = DEFAULT_RETENTION_INTERVAL,
        tool_call_format: str | None = None,
        freeze_gc_heap: bool = True,
    ) -> None:
        self.name = name
        self.logger = logger or logging.getLogger("chatstream")
        _warn_if_sampler_hooks(self.logger, token_sampler, probe_mode_enabled)
        spec = engine_spec(engine, engine_options, model, use_mock_response, mock_params)
        use_mock_response = use_mock_response or (spec is not None and spec.kind is EngineKind.MOCK)
        tokenizer = tokenizer if tokenizer is not None or spec is None else tokenizer_for(spec)
        self.model, self.tokenizer, self.use_mock_response = model, tokenizer, use_mock_response
        self.engine_spec = spec
        self.device = resolve_device(device if not devices else devices[0])
        self.num_gpus = 0 if use_mock_response or (self.device is not None and self.device.type != "cuda") else num_gpus
        if devices:
            self.num_gpus = len({str(d) for d in devices if str(d).startswith("cuda")})
        self.too_many_request_as_http_error = too_many_request_as_http_error
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
            num_of_concurrent_executions * num_engines(engine, devices),
            max_queue_size,
            reject_as_http_error=too_many_request_as_http_error,
            fair=fair_queue,
            max_running_per_user=max_running_per_user,
        )
        self.engine_config = EngineConfig(
            context_len=context_len,
            max_batch_size=num_of_concurrent_executions,
            add_special_tokens=add_special_tokens,
            prefix_cache_bytes=prefix_cache_bytes,
            fused_decoder=fused_decoder,
            max_prefill_tokens=max_prefill_tokens,
            max_decode_slowdown=max_decode_slowdown,
            weight_quantization=weight_quantization,
            cpu_kernels=cpu_kernels,
        )
        self.client_roles = ClientRoles.from_config(client_roles)
        self.chat_prompt_clazz = chat_prompt_clazz or default_prompt_class(tokenizer, use_mock_response)
        self.request_handler = request_handler or SimpleSessionRequestHandler()
        if tool_call_format is not None:
            get_format(tool_call_format)  # ValueError listing the known formats
        self.tool_call_format = tool_call_format
        self.freeze_gc_heap = freeze_gc_heap
        built = build_engine(engine, devices, spec, model, tokenizer, self.engine_config, use_mock_response)
        self.service = self._create_service(locale, model_name, built)
        self.conversations = ConversationKeeper(
            store,
            self.service.prompts,
            max_age=conversation_max_age,
            max_per_owner=max_conversations_per_user,
            retention_interval=retention_interval,
        )
        chat = NativeChat(
            self.service, self.client_roles, self.request_handler, self.logger, self.conversations, max_body_bytes
        )
        self.server_context = ServerContext(
            self.service, self.client_roles, chat, tuple(api_keys), on_feedback_received
        )
        self._console_prompt: AbstractChatPrompt | None = None

    def _create_service(self, locale: str | None, model_name: str | None, engine: Engine) -> ChatService:
        spec = self.engine_spec
        config = ServiceConfig(
            name=self.name,
            model_name=model_name or default_model_name(self.model, self.use_mock_response, spec),
            locale=normalize_locale(locale),
            admission=self.admission_config,
            sampling=self.default_sampling,
            add_special_tokens=self.engine_config.add_special_tokens,
            num_gpus=num_gpus_in_use(spec, self.num_gpus),
            device=self.device,
            context_len=prompt_context_len(engine, spec, self.engine_config, self.use_mock_response),
            model_type=getattr(getattr(self.model, "config", None), "model_type", None),
            tool_call_format=self.tool_call_format,
            freeze_gc_heap=self.freeze_gc_heap,
        )
        return ChatService(config, engine, PromptFactory(self.chat_prompt_clazz, self.tokenizer), self.logger)

    # ----- what the service holds -----

    @property
    def engine(self) -> Engine:
        return self.service.engine

    @property
    def admission(self) -> AdmissionController:
        return self.service.admission

    @property
    def metrics(self) -> ChatStreamMetrics:
        return self.service.metrics

    @property
    def locale(self) -> str:
        return self.service.locale

    @property
    def model_name(self) -> str:
        return self.service.model_name

    @property
    def api_keys(self) -> tuple[str, ...]:
        return self.server_context.api_keys

    @property
    def on_feedback_received(self) -> Callable[[dict[str, Any]], Any] | None:
        return self.server_context.on_feedback_received

    # ----- lifecycle -----

    async def startup(self) -> None:
        """Start the engine and open the conversation store (idempotent). Called by the app's lifespan or on the
        first request."""
        await self.service.startup()
        await self.conversations.startup()

    async def start_queue_worker(self) -> None:
        """Kept for code written for the original package (a startup hook); same as :meth:`startup`."""
        await self.startup()

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting, let running streams finish for up to ``drain_timeout`` s, stop the engine, then close
        the conversation store."""
        await self.service.shutdown(drain_timeout)
        await self.conversations.shutdown()

    # ----- the chat endpoint and the console -----

    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | str | None = None, callback: UserCallback | None = None
    ) -> Response:
        """Handle POST /chat_stream: role check, admission (run, wait or reject), then the streamed answer.

        ``request_body`` lets an endpoint that already read the body pass it in; ``callback(request, message)``
        (sync or async) is called once when the request is done with "success",
        "client_disconnected_while_streaming", "client_disconnected_before_streaming" or "unknown_error_occurred...".
        """
        return await self.server_context.chat.handle(request, request_body, callback)

    async def handle_console_input(self, user_input: str) -> AsyncIterator[tuple[str, str, str]]:
        """One console turn: yields (answer so far, new text, pos) with pos "begin", "mid", then "end".

        A single history is kept for the console. Runs through the same engine, without admission control.
        """
        await self.service.startup()
        if self._console_prompt is None:
            self._console_prompt = self.service.new_chat_prompt()
        item: ConsoleItem
        async for item in self.service.console_turn(self._console_prompt, user_input, f"console-{id(self)}"):
            yield item

    async def handle_queue_position_request(self, request: Request) -> Response:
        """GET /chat_stream/queue_position?ticket=<id>: the place in line of the /chat_stream request that was sent
        with ``X-ChatStream-Queue-Ticket: <id>`` (mount it next to your /chat_stream route; docs/api.md)."""
        return await handle_queue_position_request(self.server_context, request)

    def verify_role_for_api(self, request: Request, api_name: str) -> JSONResponse | None:
        """None when the caller's client role allows ``api_name``, else the role layer's 403 response."""
        return self.client_roles.deny_response(request, api_name)

    # ----- the original's other APIs -----

    def append_apis(self, app: Any, opts: dict[str, Any] | None = None) -> None:
        """Mount the original's extra APIs (docs/api.md): ``{"include": [...]}``, ``{"exclude": [...]}`` or
        ``{"all": True}``, plus optional ``"web_ui_params"``."""
        apis.append_apis(self.server_context, app, opts)

    def append_middlewares(self, app: Any, opts: dict[str, Any] | None = None) -> None:
        """Add the session middleware, the client-role middleware and (when asked) CORS."""
        middlewares.append_middlewares(self.server_context, app, opts)

    async def handle_clear_context_request(
        self, request: Request, request_body: Any = None, callback: Any = None
    ) -> Response:
        return await apis.handle_clear_context_request(self.server_context, request, request_body, callback)

    async def handle_get_prompt_request(self, request: Request) -> Response:
        return await apis.handle_get_prompt_request(self.server_context, request)

    async def handle_set_generation_params_request(self, request: Request) -> Response:
        return await apis.handle_set_generation_params_request(self.server_context, request)

    async def handle_get_generation_params_request(self, request: Request) -> Response:
        return await apis.handle_get_generation_params_request(self.server_context, request)

    async def handle_set_feedback_request(self, request: Request, opts: Mapping[str, Any] | None = None) -> Response:
        return await apis.handle_set_feedback_request(self.server_context, request, opts)

    async def handle_get_load_request(self, request: Request) -> Response:
        return await ops.handle_get_load_request(self.server_context, request)

    async def handle_get_resource_usage_request(self, request: Request) -> Response:
        return await ops.handle_get_resource_usage_request(self.server_context, request)

    async def index(self, request: Request, response: Any = None, opts: Mapping[str, Any] | None = None) -> Response:
        return await webui.index(self.server_context, request, response, opts)

    async def js(self, request: Request, response: Any = None) -> Response:
        return await webui.js(self.server_context, request, response)


def _warn_if_sampler_hooks(logger: logging.Logger, token_sampler: Any, probe_mode_enabled: bool) -> None:
    if token_sampler is not None or probe_mode_enabled:
        logger.warning(
            "token_sampler and probe_mode_enabled are accepted for compatibility and ignored: sampling is batched "
            "in the engine (see SamplingParams)"
        )
