"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Requests go through the same admission control and engine as /chat_stream. Streaming answers are Server-Sent
Events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``). A client that disconnects closes the event generator,
which aborts the engine request and releases the admission slot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.admission.admission import Draining, QueueFull, Slot
from chatstream.admission.generation import GenerationStream
from chatstream.config import SamplingParams
from chatstream.engine.base import EngineError, FinishReason, GenerationRequest
from chatstream.server.context import ServerContext
from chatstream.server.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    openai_error_response,
)
from chatstream.server.http import parse_json_object
from chatstream.server.openai_render import Renderer, SseResponse, finish_reason_name, sse
from chatstream.server.openai_schemas import ChatCompletionRequest, CompletionRequest, check_unsupported
from chatstream.service import ChatService, UnsupportedSampling

if TYPE_CHECKING:
    from fastapi import FastAPI

    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for the legacy completions endpoint."""


@dataclasses.dataclass(frozen=True)
class OpenAIContext:
    """What every OpenAI handler needs: the server context, the API keys in force and the models' creation time."""

    server: ServerContext
    api_keys: tuple[str, ...] = ()
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def service(self) -> ChatService:
        return self.server.service


def add_openai_routes(app: FastAPI, server: ServerContext, api_keys: Sequence[str] = ()) -> None:
    """Mount the three endpoints on ``app``."""
    ctx = OpenAIContext(server, tuple(k for k in api_keys if k))

    async def chat_completions(request: Request) -> Response:
        return await handle_chat_completions(ctx, request)

    async def completions(request: Request) -> Response:
        return await handle_completions(ctx, request)

    async def models(request: Request) -> Response:
        return await handle_models(ctx, request)

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], name="openai_chat_completions")
    app.add_api_route("/v1/completions", completions, methods=["POST"], name="openai_completions")
    app.add_api_route("/v1/models", models, methods=["GET"], name="openai_models")


# ----- handlers -----


async def handle_models(ctx: OpenAIContext, request: Request) -> Response:
    """GET /v1/models: the one model this server runs."""
    try:
        authorize(ctx, request)
    except ApiError as exc:
        return openai_error_response(exc)
    model = {"id": ctx.service.model_name, "object": "model", "created": ctx.created, "owned_by": "chatstream"}
    info = ctx.service.engine_info()  # what the engine knows, named as vLLM names it
    if info.get("model"):
        model["root"] = info["model"]
    if info.get("max_model_len"):
        model["max_model_len"] = info["max_model_len"]
    return JSONResponse({"object": "list", "data": [model]})


async def handle_chat_completions(ctx: OpenAIContext, request: Request) -> Response:
    """POST /v1/chat/completions."""
    return await _guarded(ctx, request, ChatCompletionRequest, _chat_generation_request, "chat")


async def handle_completions(ctx: OpenAIContext, request: Request) -> Response:
    """POST /v1/completions."""
    return await _guarded(ctx, request, CompletionRequest, _completion_generation_request, "completion")


async def _guarded(
    ctx: OpenAIContext,
    request: Request,
    schema: type[ChatCompletionRequest] | type[CompletionRequest],
    build: Callable[[ChatService, Any], GenerationRequest],
    kind: str,
) -> Response:
    try:
        authorize(ctx, request)
        body = schema.model_validate(parse_json_object(await request.body()))
        check_unsupported(body)
        check_model(ctx.service, body.model)
        gen_request = build(ctx.service, body)
        if body.add_special_tokens is not None:
            gen_request = dataclasses.replace(gen_request, add_special_tokens=body.add_special_tokens)
        ctx.service.check_sampling(gen_request.sampling)  # the body's own sampling: a 400 naming the field
        renderer = Renderer(kind, gen_request.request_id, ctx.service.model_name)
        return await _respond(ctx.service, request, gen_request, renderer, body)
    except Exception as exc:
        if not isinstance(exc, ApiError | QueueFull | Draining | ValidationError | EngineError | UnsupportedSampling):
            logger.exception("OpenAI %s request failed", kind)
        return openai_error_response(exc)


# ----- access -----


def authorize(ctx: OpenAIContext, request: Request) -> None:
    """API key (when configured) or client role; raises Unauthorized / Forbidden.

    With API keys configured, a valid ``Authorization: Bearer <key>`` is required, unless the request carries a
    header phrase of an agent role that allows "openai". Without keys, the client role decides; OpenAI clients are
    agents, so a session is ignored.
    """
    roles = ctx.server.roles
    role = roles.resolve(request, as_agent=True)
    if ctx.api_keys:
        if api_key_matches(request.headers.get("authorization"), ctx.api_keys):
            return
        if role.auth_method.is_header_phrase and role.allows("openai"):
            return
        raise Unauthorized("Incorrect or missing API key: send 'Authorization: Bearer <key>'.", param="api_key")
    if not roles.is_allowed(request, "openai", as_agent=True):
        raise Forbidden(f"The OpenAI API is not allowed for client role '{role.name}'.")


def api_key_matches(authorization: str | None, api_keys: Sequence[str]) -> bool:
    """True when the header is ``Bearer <one of api_keys>``; every key is compared in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


def check_model(service: ChatService, model: str | None) -> None:
    """NotFound unless ``model`` is empty or the model this server runs."""
    if model and model != service.model_name:
        raise NotFound(
            f"The model '{model}' does not exist; this server runs '{service.model_name}' (GET /v1/models).",
            param="model",
            code="model_not_found",
        )


# ----- building the engine request -----


def _chat_generation_request(service: ChatService, body: ChatCompletionRequest) -> GenerationRequest:
    from chatstream.prompts import ChatTemplatePrompt, load_openai_messages

    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tokenizer = service.prompts.tokenizer
    if getattr(tokenizer, "chat_template", None):
        chat_prompt: AbstractChatPrompt = ChatTemplatePrompt(tokenizer)
    else:
        chat_prompt = service.new_chat_prompt()
    try:
        load_openai_messages(chat_prompt, messages)
        base = service.build_request(chat_prompt)
    except UnsupportedSampling:
        raise
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from None
    return dataclasses.replace(
        base,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        sampling=_sampling(body, base.sampling),
        conversation_id=conversation_key(messages, body.user),
    )


def conversation_key(messages: list[dict[str, Any]], user: str | None) -> str:
    """A stable id for the conversation a stateless OpenAI request continues: its messages up to the first user
    message (and the ``user`` field). The next turn of the same chat has the same opening, so the engine's
    per-conversation KV cache serves it; two chats with the same opening only share (or replace) a cache entry,
    which is safe because reuse covers only the token prefix they actually have in common."""
    opening: list[dict[str, Any]] = []
    for message in messages:
        opening.append(message)
        if message.get("role") == "user":
            break
    digest = hashlib.sha256(json.dumps([user, opening], sort_keys=True, default=str).encode()).hexdigest()
    return f"openai-{digest[:32]}"


def _completion_generation_request(service: ChatService, body: CompletionRequest) -> GenerationRequest:
    sampling = _sampling(body, service.default_sampling, COMPLETIONS_DEFAULT_MAX_TOKENS)
    return service.build_text_request(f"cmpl-{uuid.uuid4().hex}", body.prompt_text, sampling)


def _sampling(
    body: ChatCompletionRequest | CompletionRequest, defaults: SamplingParams, default_max_tokens: int | None = None
) -> SamplingParams:
    try:
        return body.sampling(defaults, default_max_tokens=default_max_tokens)
    except ValueError as exc:
        param = str(exc).split("=", 1)[0] if "=" in str(exc) else None
        raise BadRequest(str(exc), param=param) from None


# ----- admission and responses -----


async def _respond(
    service: ChatService,
    request: Request,
    gen_request: GenerationRequest,
    renderer: Renderer,
    body: ChatCompletionRequest | CompletionRequest,
) -> Response:
    arrived = time.monotonic()
    slot = await service.acquire_slot(request.is_disconnected)
    if slot is None:
        return Response(status_code=499)
    try:
        await service.startup()
        if not service.engine.is_running:
            raise ServiceUnavailable("The model is not ready yet.", code="engine_not_ready")
    except BaseException:
        slot.release()
        raise
    if body.stream:
        return await _stream_response(service, request, gen_request, renderer, body.include_usage, slot, arrived)
    try:
        outcome = await service.collect(gen_request, request.is_disconnected, arrived)
    finally:
        slot.release()
    if outcome is None:
        return Response(status_code=499)
    if outcome.finish_reason is FinishReason.ERROR:
        logger.warning("generation %s failed: %s", gen_request.request_id, outcome.error)
        raise ApiError(f"Generation failed: {outcome.error or 'engine error'}", code="generation_error")
    return JSONResponse(renderer.complete(outcome))


async def _stream_response(
    service: ChatService,
    request: Request,
    gen_request: GenerationRequest,
    renderer: Renderer,
    include_usage: bool,
    slot: Slot,
    arrived: float,
) -> Response:
    """The SSE response, once the first delta is there (an engine that cannot start the request raises first)."""
    try:
        stream = await service.open_generation(gen_request, request.is_disconnected, arrived)
    except BaseException:
        slot.release()
        raise
    if stream is None:
        slot.release()
        return Response(status_code=499)
    opened = stream

    async def close() -> None:
        await opened.aclose()  # aborts the request when the body never ran
        slot.release()

    return SseResponse(_event_stream(opened, renderer, include_usage), close)


async def _event_stream(stream: GenerationStream, renderer: Renderer, include_usage: bool) -> AsyncIterator[str]:
    outcome = stream.outcome
    yield sse(renderer.first_chunk(include_usage))
    async with aclosing(stream.deltas()) as deltas:
        async for delta in deltas:
            if delta.text:
                yield sse(renderer.chunk(delta.text, None, include_usage))
    if outcome.finish_reason is FinishReason.ERROR:
        message = f"Generation failed: {outcome.error or 'engine error'}"
        yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": "generation_error"}})
    else:
        yield sse(renderer.chunk("", finish_reason_name(outcome.finish_reason), include_usage))
        if include_usage:
            yield sse(renderer.usage_chunk(outcome))
    yield "data: [DONE]\n\n"
