"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id},
the Responses API (server/responses.py), and OpenAI's error shape for every other /v1 path.

Requests go through the same admission control and engine as /chat_stream. Everything a request's content can get
wrong is checked before it takes an admission slot (server/openai_chat.py). Streaming answers are Server-Sent Events
(``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``). A client that disconnects closes the event generator, which
aborts the engine requests and releases the admission slot.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.admission.admission import Draining, QueueFull, Slot
from chatstream.admission.generation import GenerationStream
from chatstream.engine.base import EngineError, FinishReason
from chatstream.prompts.window import ContextLengthExceeded
from chatstream.request_builder import UnsupportedSampling
from chatstream.server.context import ServerContext
from chatstream.server.errors import ApiError, MethodNotAllowed, NotFound, openai_error_response
from chatstream.server.fairness import user_key
from chatstream.server.http import read_json_object
from chatstream.server.openai_chat import OpenAIJob, conversation_key, prepare_chat, prepare_completion
from chatstream.server.openai_context import (
    OpenAIContext,
    admitted,
    api_key_matches,
    authorize,
    check_model,
    model_object,
)
from chatstream.server.openai_render import Renderer, SseResponse
from chatstream.server.openai_schemas import ChatCompletionRequest, CompletionRequest, check_unsupported
from chatstream.server.openai_stream import event_stream
from chatstream.server.openapi_docs import endpoint_options, install_openapi
from chatstream.server.queue_position import queued_events
from chatstream.server.responses import add_responses_routes
from chatstream.service import ChatService

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["OpenAIContext", "add_openai_routes", "api_key_matches", "authorize", "check_model", "conversation_key"]

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
_EXPECTED_ERRORS = (
    ApiError, QueueFull, Draining, ValidationError, EngineError, ContextLengthExceeded, UnsupportedSampling
)
"""Errors answered in OpenAI's shape without a traceback in the log."""


def add_openai_routes(app: FastAPI, server: ServerContext, api_keys: Sequence[str] = ()) -> None:
    """Mount the endpoints on ``app``, and answer unknown /v1 paths in OpenAI's error shape."""
    ctx = OpenAIContext(server, tuple(k for k in api_keys if k))

    def bind(handler: Callable[[OpenAIContext, Request], Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await handler(ctx, request)

        return endpoint

    install_openapi(app)
    for path, handler, method, name in (
        ("/v1/chat/completions", handle_chat_completions, "POST", "openai_chat_completions"),
        ("/v1/completions", handle_completions, "POST", "openai_completions"),
        ("/v1/models", handle_models, "GET", "openai_models"),
        ("/v1/models/{model_id:path}", handle_model, "GET", "openai_model"),
    ):
        app.add_api_route(path, bind(handler), methods=[method], name=name, **endpoint_options(name))
    add_responses_routes(app, ctx)
    _answer_unknown_paths_in_openai_shape(app)


def _answer_unknown_paths_in_openai_shape(app: FastAPI) -> None:
    """404 and 405 under /v1/ in OpenAI's error shape; other paths keep the app's own handlers (FastAPI's
    ``{"detail": ...}`` unless the app registered others)."""
    from fastapi.exception_handlers import http_exception_handler

    for status in (404, 405):
        fallback = app.exception_handlers.get(status) or app.exception_handlers.get(HTTPException)
        app.add_exception_handler(status, _openai_http_error(status, fallback or http_exception_handler))


def _openai_http_error(status: int, fallback: Callable[..., Any]) -> Callable[..., Awaitable[Response]]:
    async def handler(request: Request, exc: Exception) -> Response:
        path = request.url.path
        if not path.startswith(OPENAI_PREFIX):
            result = fallback(request, exc)
            return await result if inspect.isawaitable(result) else result  # type: ignore[no-any-return]
        if status == 405:
            return openai_error_response(MethodNotAllowed(f"{request.method} is not allowed on {path}."))
        return openai_error_response(NotFound(f"Unknown path {request.method} {path}.", code="unknown_url"))

    return handler


# ----- handlers -----


async def handle_models(ctx: OpenAIContext, request: Request) -> Response:
    """GET /v1/models: the one model this server runs."""
    try:
        authorize(ctx, request)
    except ApiError as exc:
        return openai_error_response(exc)
    return JSONResponse({"object": "list", "data": [model_object(ctx)]})


async def handle_model(ctx: OpenAIContext, request: Request) -> Response:
    """GET /v1/models/{id}: the model, when it is the one this server runs (the SDK's ``models.retrieve``)."""
    try:
        authorize(ctx, request)
        check_model(ctx.service, request.path_params["model_id"] or "-")
    except ApiError as exc:
        return openai_error_response(exc)
    return JSONResponse(model_object(ctx))


async def handle_chat_completions(ctx: OpenAIContext, request: Request) -> Response:
    """POST /v1/chat/completions."""

    async def prepare(body: Any) -> OpenAIJob:
        return await prepare_chat(ctx.service, body)

    return await _guarded(ctx, request, ChatCompletionRequest, prepare, "chat")


async def handle_completions(ctx: OpenAIContext, request: Request) -> Response:
    """POST /v1/completions."""

    async def prepare(body: Any) -> OpenAIJob:
        return await prepare_completion(ctx.service, body)

    return await _guarded(ctx, request, CompletionRequest, prepare, "completion")


async def _guarded(
    ctx: OpenAIContext,
    request: Request,
    schema: type[ChatCompletionRequest] | type[CompletionRequest],
    prepare: Callable[[Any], Awaitable[OpenAIJob]],
    kind: str,
) -> Response:
    try:
        authorize(ctx, request)
        body = schema.model_validate(await read_json_object(request, ctx.server.max_body_bytes))
        check_unsupported(body)
        check_model(ctx.service, body.model)
        job = await _finish_job(ctx.service, await prepare(body), body)
        renderer = Renderer(
            kind,
            job.request_id,
            ctx.service.model_name,
            tool_format=job.tool_format,
            tool_names=job.tool_names,
            logprobs=job.logprobs,
        )
        user = user_key(request, ctx.server.roles, as_agent=True)
        return await _respond(ctx.service, request, job, renderer, body, user)
    except Exception as exc:
        if not isinstance(exc, _EXPECTED_ERRORS):
            logger.exception("OpenAI %s request failed", kind)
        return openai_error_response(exc)


# ----- admission and responses -----


async def _respond(
    service: ChatService,
    request: Request,
    job: OpenAIJob,
    renderer: Renderer,
    body: ChatCompletionRequest | CompletionRequest,
    user: str,
) -> Response:
    arrived = time.monotonic()
    ticket = service.enqueue(user)
    if body.stream and ticket.slot is None:  # tell the client its place in line while it waits (SSE comments)
        streams = [service.start_generation(r, arrived) for r in job.requests]
        answer = functools.partial(event_stream, service, streams, job, renderer, body.include_usage)
        return SseResponse(queued_events(service, ticket, answer), ticket.close, job.headers)
    slot = await admitted(service, ticket, request)
    if slot is None:
        return Response(status_code=499)
    if body.stream:
        return await _stream_response(service, request, job, renderer, body.include_usage, slot, arrived)
    try:
        outcomes = await service.collect_all(job.requests, request.is_disconnected, arrived)
    finally:
        slot.release()
    if outcomes is None:
        return Response(status_code=499)
    failed = next((o for o in outcomes if o.finish_reason is FinishReason.ERROR), None)
    if failed is not None:
        logger.warning("generation %s failed: %s", job.request_id, failed.error)
        raise ApiError(f"Generation failed: {failed.error or 'engine error'}", code="generation_error")
    return JSONResponse(renderer.complete(outcomes), headers=job.headers or None)


async def _finish_job(
    service: ChatService, job: OpenAIJob, body: ChatCompletionRequest | CompletionRequest
) -> OpenAIJob:
    """``job`` with the body's extensions applied (``add_special_tokens``), its sampling checked against the engine
    (UnsupportedSampling: a 400 naming the field) and each request fitted to the model's context
    (ContextLengthExceeded when one cannot fit)."""
    requests = []
    for request in job.requests:
        if body.add_special_tokens is not None:
            request = dataclasses.replace(request, add_special_tokens=body.add_special_tokens)
        service.requests.check_sampling(request.sampling)
        requests.append(await service.requests.check_context(request, body.new_token_limit() is not None))
    return dataclasses.replace(job, requests=tuple(requests))


async def _stream_response(
    service: ChatService,
    request: Request,
    job: OpenAIJob,
    renderer: Renderer,
    include_usage: bool,
    slot: Slot,
    arrived: float,
) -> Response:
    """The SSE response, once each choice's first delta is there (an engine that cannot start a request raises
    first: 429 or 503 instead of a broken stream)."""
    opened: list[GenerationStream] = []
    try:
        for gen_request in job.requests:
            stream = await service.open_generation(gen_request, request.is_disconnected, arrived)
            if stream is None:
                break
            opened.append(stream)
    except BaseException:
        await _close_all(opened)
        slot.release()
        raise
    if len(opened) < len(job.requests):  # the client left
        await _close_all(opened)
        slot.release()
        return Response(status_code=499)

    async def close() -> None:
        await _close_all(opened)  # aborts the requests when the body never ran
        slot.release()

    return SseResponse(event_stream(service, opened, job, renderer, include_usage), close, job.headers)


async def _close_all(streams: list[GenerationStream]) -> None:
    for stream in streams:
        await stream.aclose()
