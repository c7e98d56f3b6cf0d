"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Requests go through the same admission control and engine as /chat_stream. Streaming answers are Server-Sent
Events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``). A client that disconnects closes the event generator,
which aborts the engine request (``run_generation``) and releases the admission slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from chatstream.admission.admission import Draining, QueueFull, Slot
from chatstream.admission.generation import GenerationOutcome, cancel_quietly, run_generation
from chatstream.engine.base import EngineError, FinishReason, GenerationRequest
from chatstream.engine.mock_engine import MockEngine, MockRequest
from chatstream.server.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    openai_error_response,
)
from chatstream.server.openai_schemas import ChatCompletionRequest, CompletionRequest, check_unsupported

if TYPE_CHECKING:
    from fastapi import FastAPI

    from chatstream.chat_stream import ChatStream

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for the legacy completions endpoint."""

_DISCONNECT_POLL_SEC = 0.25
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclasses.dataclass(frozen=True)
class OpenAIContext:
    """What every OpenAI handler needs: the ChatStream and the configured API keys."""

    chat_stream: ChatStream
    api_keys: tuple[str, ...] = ()
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def add_openai_routes(app: FastAPI, chat_stream: ChatStream, api_keys: Sequence[str] = ()) -> None:
    """Mount the three endpoints on ``app``."""
    ctx = OpenAIContext(chat_stream, tuple(k for k in api_keys if k))

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
    model = {"id": ctx.chat_stream.model_name, "object": "model", "created": ctx.created, "owned_by": "chatstream"}
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
    build: Callable[[ChatStream, Any], GenerationRequest],
    kind: str,
) -> Response:
    try:
        authorize(ctx, request)
        body = schema.model_validate(await read_json_object(request))
        check_unsupported(body)
        check_model(ctx.chat_stream, body.model)
        gen_request = build(ctx.chat_stream, body)
        renderer = _Renderer(kind, gen_request.request_id, ctx.chat_stream.model_name)
        return await _respond(ctx.chat_stream, request, gen_request, renderer, body)
    except Exception as exc:
        if not isinstance(exc, ApiError | QueueFull | Draining | ValidationError | EngineError):
            logger.exception("OpenAI %s request failed", kind)
        return openai_error_response(exc)


# ----- access -----


def authorize(ctx: OpenAIContext, request: Request) -> None:
    """API key (when configured) or client role; raises Unauthorized / Forbidden.

    With API keys configured, a valid ``Authorization: Bearer <key>`` is required, unless the request carries a
    header phrase of an agent role that allows "openai". Without keys, the client role decides; OpenAI clients are
    agents, so a session is ignored.
    """
    roles = ctx.chat_stream.client_roles
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


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or BadRequest."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body must be valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def check_model(chat_stream: ChatStream, model: str | None) -> None:
    if model and model != chat_stream.model_name:
        raise NotFound(
            f"The model '{model}' does not exist; this server runs '{chat_stream.model_name}' (GET /v1/models).",
            param="model",
            code="model_not_found",
        )


# ----- building the engine request -----


def _chat_generation_request(chat_stream: ChatStream, body: ChatCompletionRequest) -> GenerationRequest:
    from chatstream.prompts import ChatTemplatePrompt, load_openai_messages

    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    if getattr(chat_stream.tokenizer, "chat_template", None):
        chat_prompt: Any = ChatTemplatePrompt(chat_stream.tokenizer)
    else:
        chat_prompt = chat_stream.new_chat_prompt()
    try:
        load_openai_messages(chat_prompt, messages)
        base = chat_stream.build_generation_request(chat_prompt)
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


def _completion_generation_request(chat_stream: ChatStream, body: CompletionRequest) -> GenerationRequest:
    sampling = _sampling(body, chat_stream.default_sampling, COMPLETIONS_DEFAULT_MAX_TOKENS)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    if isinstance(chat_stream.engine, MockEngine):
        return MockRequest(request_id, body.prompt_text, sampling, user_input=body.prompt_text)
    return GenerationRequest(request_id=request_id, prompt=body.prompt_text, sampling=sampling)


def _sampling(body: Any, defaults: Any, default_max_tokens: int | None = None) -> Any:
    try:
        return body.sampling(defaults, default_max_tokens=default_max_tokens)
    except ValueError as exc:
        param = str(exc).split("=", 1)[0] if "=" in str(exc) else None
        raise BadRequest(str(exc), param=param) from None


# ----- admission and responses -----


async def acquire_slot(chat_stream: ChatStream, request: Request) -> Slot | None:
    """An admission slot (metrics recorded), None when the client left while waiting. QueueFull / Draining
    propagate (the rejection is counted)."""
    acquiring = asyncio.ensure_future(chat_stream.admission.acquire())
    try:
        while True:
            done, _ = await asyncio.wait({acquiring}, timeout=_DISCONNECT_POLL_SEC)
            if done:
                slot = acquiring.result()
                break
            if await request.is_disconnected():
                await cancel_quietly(acquiring)  # type: ignore[arg-type]
                if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
                    acquiring.result().release()
                return None
    except QueueFull:
        chat_stream.metrics.rejected.inc()
        raise
    chat_stream.metrics.admitted.inc()
    chat_stream.metrics.queue_time.observe(slot.queue_time)
    return slot


async def _respond(
    chat_stream: ChatStream, request: Request, gen_request: GenerationRequest, renderer: _Renderer, body: Any
) -> Response:
    arrived = time.monotonic()
    slot = await acquire_slot(chat_stream, request)
    if slot is None:
        return Response(status_code=499)
    try:
        await chat_stream.startup()
        if not chat_stream.engine.is_running:
            raise ServiceUnavailable("The model is not ready yet.", code="engine_not_ready")
    except BaseException:
        slot.release()
        raise
    if body.stream:
        events = _event_stream(chat_stream, gen_request, renderer, body.include_usage, arrived)
        return SseResponse(events, on_close=slot.release)
    try:
        outcome = await collect_until_disconnect(chat_stream, request, gen_request, arrived)
    finally:
        slot.release()
    if outcome is None:
        return Response(status_code=499)
    if outcome.finish_reason is FinishReason.ERROR:
        logger.warning("generation %s failed: %s", gen_request.request_id, outcome.error)
        raise ApiError(f"Generation failed: {outcome.error or 'engine error'}", code="generation_error")
    return JSONResponse(renderer.complete(outcome))


async def collect_until_disconnect(
    chat_stream: ChatStream, request: Request, gen_request: GenerationRequest, arrived: float
) -> GenerationOutcome | None:
    """Run the generation to its end; None (and the engine request aborted) when the client disconnects."""
    outcome = GenerationOutcome()

    async def consume() -> None:
        deltas = run_generation(chat_stream.engine, gen_request, chat_stream.metrics, outcome, arrived)
        async with contextlib.aclosing(deltas):  # type: ignore[type-var]  # run_generation is an async generator
            async for _ in deltas:
                pass

    task = asyncio.ensure_future(consume())
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SEC)
        if done:
            task.result()
            return outcome
        if await request.is_disconnected():
            await cancel_quietly(task)  # type: ignore[arg-type]
            return None


async def _event_stream(
    chat_stream: ChatStream, gen_request: GenerationRequest, renderer: _Renderer, include_usage: bool, arrived: float
) -> AsyncIterator[str]:
    outcome = GenerationOutcome()
    yield sse(renderer.first_chunk(include_usage))
    deltas = run_generation(chat_stream.engine, gen_request, chat_stream.metrics, outcome, arrived)
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]  # run_generation is an async generator
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


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_reason_name(reason: FinishReason | None) -> str:
    """OpenAI's finish_reason ("stop", "length"; "abort" when the server cut the request)."""
    if reason is None:
        return "abort"
    return reason.value


class SseResponse(StreamingResponse):
    """An SSE response whose generator is closed and ``on_close`` called however the response ends
    (also when the client left before the body started, where Starlette never starts the iterator)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose: Callable[[], Awaitable[None]] | None = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self._on_close()


class _Renderer:
    """Builds the JSON objects of one response ("chat" or "completion")."""

    def __init__(self, kind: str, request_id: str, model: str) -> None:
        self.chat = kind == "chat"
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def first_chunk(self, include_usage: bool) -> dict[str, Any]:
        if self.chat:
            return self._chunk_with({"role": "assistant", "content": ""}, None, include_usage)
        return self.chunk("", None, include_usage)

    def chunk(self, text: str, finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
        if self.chat:
            return self._chunk_with({"content": text} if text else {}, finish_reason, include_usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        payload = self._envelope("text_completion", [choice])
        if include_usage:
            payload["usage"] = None
        return payload

    def _chunk_with(self, delta: dict[str, Any], finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = self._envelope("chat.completion.chunk", [choice])
        if include_usage:
            payload["usage"] = None
        return payload

    def usage_chunk(self, outcome: GenerationOutcome) -> dict[str, Any]:
        payload = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        payload["usage"] = usage(outcome)
        return payload

    def complete(self, outcome: GenerationOutcome) -> dict[str, Any]:
        finish = finish_reason_name(outcome.finish_reason)
        if self.chat:
            message = {"role": "assistant", "content": outcome.text}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            payload = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": finish}
            payload = self._envelope("text_completion", [choice])
        payload["usage"] = usage(outcome)
        return payload


def usage(outcome: GenerationOutcome) -> dict[str, Any]:
    prompt, completion = outcome.num_prompt_tokens, outcome.num_generated_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": outcome.num_cached_tokens},
    }
