"""The Responses API: POST /v1/responses (streamed events or one object), GET and DELETE /v1/responses/{id}.

A request is turned into chat messages (the stored turns of ``previous_response_id``, then ``input``, after
``instructions``) and runs through the same machinery as /v1/chat/completions: the chat template with tools, tool
calls parsed from the output, ``text.format`` by constrained decoding, admission, the engine. Responses are kept as
conversation records in the ChatStream's store (server/responses_store.py), so the engine's KV of a chain's
conversation serves its next step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.admission.admission import Draining, QueueFull
from chatstream.admission.generation import GenerationOutcome
from chatstream.engine.base import EngineError, FinishReason
from chatstream.server.errors import ApiError, BadRequest, openai_error_response
from chatstream.server.fairness import user_key
from chatstream.server.http import read_json_object
from chatstream.server.openai_chat import ChatSpec, OpenAIJob, chat_job, plan_for
from chatstream.server.openai_context import OpenAIContext, admitted, authorize, check_model
from chatstream.server.openai_render import SseResponse
from chatstream.server.openapi_docs import endpoint_options
from chatstream.server.responses_render import ResponseBuilder, ResponseEvents
from chatstream.server.responses_schemas import (
    ResponsesRequest,
    chat_tool_choice,
    chat_tools,
    input_messages,
    text_format_grammar,
)
from chatstream.server.responses_store import (
    ResponseStore,
    StoreProvider,
    Turn,
    answer_record,
    chat_messages,
    input_records,
    owner_of,
)
from chatstream.sessions.base import Store

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["add_responses_routes", "conversation_store_of"]

logger = logging.getLogger(__name__)


def conversation_store_of(ctx: OpenAIContext) -> StoreProvider:
    """The store that keeps the responses: the ChatStream's own (``ChatStream(store=...)``), opened on first use,
    with its retention (age, conversations per owner) applied to responses as to every conversation."""
    keeper = ctx.server.conversations

    async def provide() -> Store:
        await keeper.startup()
        return keeper.store

    return provide


def add_responses_routes(app: FastAPI, ctx: OpenAIContext) -> None:
    """Mount POST /v1/responses, GET and DELETE /v1/responses/{response_id}, described in /openapi.json."""
    store = ResponseStore(conversation_store_of(ctx))

    def bind(handler: Callable[[OpenAIContext, ResponseStore, Request], Awaitable[Response]]) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                authorize(ctx, request)
                return await handler(ctx, store, request)
            except Exception as exc:
                if not isinstance(exc, ApiError | QueueFull | Draining | ValidationError | EngineError):
                    logger.exception("OpenAI responses request failed")
                return openai_error_response(exc)

        return endpoint

    for path, handler, method, name in (
        ("/v1/responses", handle_create, "POST", "openai_responses"),
        ("/v1/responses/{response_id}", handle_get, "GET", "openai_response"),
        ("/v1/responses/{response_id}", handle_delete, "DELETE", "openai_response_delete"),
    ):
        app.add_api_route(path, bind(handler), methods=[method], name=name, **endpoint_options(name))


async def handle_get(ctx: OpenAIContext, store: ResponseStore, request: Request) -> Response:
    """GET /v1/responses/{id}: a stored response."""
    chain = await store.find(owner_of(request.headers.get("authorization")), request.path_params["response_id"])
    return JSONResponse(chain.response)


async def handle_delete(ctx: OpenAIContext, store: ResponseStore, request: Request) -> Response:
    """DELETE /v1/responses/{id}."""
    response_id = request.path_params["response_id"]
    await store.delete(owner_of(request.headers.get("authorization")), response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


async def handle_create(ctx: OpenAIContext, store: ResponseStore, request: Request) -> Response:
    """POST /v1/responses: checks, the job, admission, the turn's input written, then the answer."""
    service = ctx.service
    body = ResponsesRequest.model_validate(await read_json_object(request, ctx.server.max_body_bytes))
    body.check()
    check_model(service, body.model)
    owner = owner_of(request.headers.get("authorization"))
    chain = None
    if body.previous_response_id is not None:
        chain = await store.find(owner, body.previous_response_id, "previous_response_id")
    inputs = input_messages(body.input)
    history = chat_messages(chain.history) if chain is not None else []
    if not inputs and not history:
        raise BadRequest("'input' holds no message", param="input")
    job = await _job(ctx, body, history, inputs)
    arrived = time.monotonic()
    slot = await admitted(service, service.enqueue(user_key(request, ctx.server.roles, as_agent=True)), request)
    if slot is None:
        return Response(status_code=499)
    try:
        turn = await store.begin(owner, chain, input_records(inputs, time.time()), store=body.stores)
    except BaseException:
        slot.release()
        raise
    job = _for_turn(job, turn)
    builder = ResponseBuilder(turn.response_id, service.model_name, body)
    if body.stream:
        events = _events(ctx, store, owner, turn, job, builder, arrived)
        return SseResponse(events, slot.release, job.headers)
    try:
        outcome = await service.collect(job.requests[0], request.is_disconnected, arrived)
    finally:
        slot.release()
    return await _whole(store, owner, turn, job, builder, outcome)


async def _job(
    ctx: OpenAIContext, body: ResponsesRequest, history: list[dict[str, Any]], inputs: list[dict[str, Any]]
) -> OpenAIJob:
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    plan = plan_for(ctx.service, chat_tools(body.tools), chat_tool_choice(body.tool_choice), body.parallel_tool_calls)
    chat = ChatSpec(
        request_id=f"resp-{uuid.uuid4().hex}",
        conversation_id=None,
        sampling=lambda prompt_sampling: _sampling(body, prompt_sampling),
    )
    return await chat_job(ctx.service, [*instructions, *history, *inputs], plan, text_format_grammar(body.text), chat)


def _sampling(body: ResponsesRequest, defaults: Any) -> Any:
    try:
        return body.sampling(defaults)
    except ValueError as exc:
        raise BadRequest(str(exc), param=str(exc).split("=", 1)[0]) from None


def _for_turn(job: OpenAIJob, turn: Turn) -> OpenAIJob:
    """The job's request named after the response, in the turn's conversation (whose KV the engine keeps)."""
    request = dataclasses.replace(job.requests[0], request_id=turn.response_id, conversation_id=turn.conversation_id)
    return dataclasses.replace(job, requests=(request,))


async def _whole(
    store: ResponseStore,
    owner: str,
    turn: Turn,
    job: OpenAIJob,
    builder: ResponseBuilder,
    outcome: GenerationOutcome | None,
) -> Response:
    if outcome is None:
        return Response(status_code=499)
    if outcome.finish_reason is FinishReason.ERROR:
        logger.warning("response %s failed: %s", turn.response_id, outcome.error)
        raise ApiError(f"Generation failed: {outcome.error or 'engine error'}", code="generation_error")
    parsed = job.tool_format.parse(outcome.text, job.tool_names or None) if job.tool_format else None
    text = parsed.content if parsed is not None else outcome.text
    calls = parsed.tool_calls if parsed is not None else ()
    response = builder.complete(text, calls, outcome)
    await store.finish(owner, turn, answer_record(turn, text or "", response, [c.to_openai() for c in calls]))
    return JSONResponse(response, headers=job.headers or None)


async def _events(
    ctx: OpenAIContext,
    store: ResponseStore,
    owner: str,
    turn: Turn,
    job: OpenAIJob,
    builder: ResponseBuilder,
    arrived: float,
) -> AsyncIterator[str]:
    """The events of a streamed response; the answer is stored before the last one."""
    outcome = GenerationOutcome()
    events = ResponseEvents(builder, job.tool_format, job.tool_names)
    for event in events.start():
        yield event
    async with aclosing(ctx.service.generate(job.requests[0], outcome, arrived)) as deltas:
        async for delta in deltas:
            for event in events.feed(delta.text):
                yield event
    closing = events.close()
    response, last = events.finish(outcome)
    if outcome.finish_reason is not FinishReason.ERROR:
        calls = [call.to_openai() for call in events.calls]
        await store.finish(owner, turn, answer_record(turn, events.content, response, calls))
    for event in [*closing, last]:
        yield event
