"""What /openapi.json says about every ChatStream endpoint: bodies, responses, error shapes, media types, security.

The endpoints take a plain ``Request`` (each protocol parses and answers bad input in its own shape), so FastAPI
cannot infer anything; :func:`endpoint_options` gives ``add_api_route`` the description of one endpoint, and
:func:`install_openapi` adds the schemas it refers to and the security schemes to the app's document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chatstream.server import openapi_models as m
from chatstream.server import openapi_models_extra as mx
from chatstream.server.http import MESSAGE_ID_HEADER, QUEUE_TICKET_HEADER
from chatstream.server.openai_schemas import ChatCompletionRequest, CompletionRequest
from chatstream.server.openapi_docs_extra import extra_docs
from chatstream.server.openapi_parts import (
    OPENAI_SECURITY,
    RETRY_AFTER,
    ROLE_DENIED,
    SECURITY_SCHEMES,
    EndpointDoc,
    json_response,
    openai_errors,
    ref,
    route_options,
    sse_response,
    text_response,
)
from chatstream.server.responses_schemas import ResponsesRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

_TOO_LARGE = json_response(m.ApiResult, "The body is longer than the server accepts (the limit is in the message).")
_NATIVE_STREAM = (
    "The answer, streamed as it is generated (`text/plain`, chunked): every chunk is the whole answer so far "
    'followed by `<::EOS::>`. As the original, a full waiting line is answered `200 {"error": '
    '"too_many_requests"}` (429 with `too_many_request_as_http_error`).'
)


def _native_errors(*statuses: int) -> dict[int, Any]:
    described = {
        400: "Invalid body; `detail` names the field.",
        413: "The body is longer than the server accepts (the limit is in `detail`).",
        429: "The waiting line is full (with too_many_request_as_http_error).",
        500: "No session middleware, or the request handler failed.",
        503: "The server is shutting down.",
    }
    errors = {status: json_response(m.NativeError, described[status]) for status in statuses}
    if 429 in errors:
        errors[429]["headers"] = RETRY_AFTER
    return errors


def _chat_stream() -> EndpointDoc:
    ok = {
        "description": _NATIVE_STREAM,
        "headers": {MESSAGE_ID_HEADER: {"description": "The answer's message id", "schema": {"type": "string"}}},
        "content": {"text/plain": {"schema": {"type": "string"}}, "application/json": {"schema": ref(m.NativeError)}},
    }
    ticket = {
        "name": QUEUE_TICKET_HEADER,
        "in": "header",
        "required": False,
        "description": "An id of the client's choice (8-64 letters, digits, - or _) to poll the request's place in "
        "line at GET /chat_stream/queue_position while it waits.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$"},
    }
    return EndpointDoc(
        "chat_stream",
        "Chat: the next turn of this session's conversation",
        "Adds the user's message to the conversation kept in the session and streams the answer. A conversation "
        "longer than the model's context leaves its oldest whole turns out of the prompt (the system prompt stays).",
        {200: ok, **_native_errors(400, 413, 429, 500, 503), **ROLE_DENIED},
        request=m.ChatStreamRequest,
        parameters=(ticket,),
    )


def _session_api(name: str, summary: str, result: type[m.ApiResult], request: Any = None) -> EndpointDoc:
    responses: dict[int, Any] = {200: json_response(result, "The result (`success` false with a message on failure).")}
    if request is not None:
        responses[400] = json_response(m.ApiResult, "Invalid body; the message names the field.")
        responses[413] = _TOO_LARGE
    return EndpointDoc(name, summary, "One of the original's session APIs.", {**responses, **ROLE_DENIED}, request)


def _clear_context() -> EndpointDoc:
    responses = {
        200: json_response(m.ApiResult, "`success` false: there was no conversation."),
        413: _TOO_LARGE,
        **ROLE_DENIED,
    }
    summary = "Forget this session's conversation"
    return EndpointDoc("clear_context", summary, "No body needed.", responses, m.EmptyRequest, body_required=False)


def _openai(kind: str) -> EndpointDoc:
    if kind == "models":
        responses = {200: json_response(m.ModelList, "The model this server runs."), **openai_errors(401, 403)}
        return EndpointDoc("openai", "List models", "OpenAI-compatible.", responses, security=OPENAI_SECURITY)
    chat = kind == "chat"
    stream_note = (
        "`stream` false: one JSON object. `stream` true: Server-Sent Events, `data: <chunk>` per piece of the answer, "
        "then `data: [DONE]`; while the request waits in line, comment lines `: queue position N` (N = 1: next)."
    )
    whole, chunk = (m.ChatCompletion, m.ChatCompletionChunk) if chat else (m.Completion, m.Completion)
    responses = {200: sse_response(chunk, whole, stream_note), **openai_errors(400, 401, 403, 404, 413, 429, 500, 503)}
    return EndpointDoc(
        "openai",
        "Create a chat completion" if chat else "Create a completion",
        "OpenAI-compatible. A prompt longer than the model's context is refused (400, code "
        "`context_length_exceeded`, naming the limit and the prompt's token count).",
        responses,
        request=ChatCompletionRequest if chat else CompletionRequest,
        security=OPENAI_SECURITY,
    )


def _ops(name: str) -> EndpointDoc:
    if name == "health":
        ok, unavailable = json_response(m.Health, "The engine runs."), json_response(m.Health, "Starting or draining.")
        return EndpointDoc(name, "Health", "For load balancers.", {200: ok, 503: unavailable, **ROLE_DENIED})
    if name == "metrics":
        ok = text_response("text/plain", "Prometheus text exposition (version 0.0.4).")
        return EndpointDoc(name, "Prometheus metrics", "For Prometheus.", {200: ok, **ROLE_DENIED})
    if name == "get_load":
        return EndpointDoc(
            name, "Load", "Running and waiting generations.", {200: json_response(m.LoadResult, "Load"), **ROLE_DENIED}
        )
    result = json_response(m.ResourceUsageResult, "Memory in GiB")
    return EndpointDoc(name, "Resource usage", "Process and GPU memory.", {200: result, **ROLE_DENIED})


def _queue_position() -> EndpointDoc:
    param = {"name": "ticket", "in": "query", "required": True, "schema": {"type": "string"}}
    ok = json_response(m.QueuePosition, "`waiting` false once the request runs, or for an unknown ticket.")
    return EndpointDoc(
        "chat_stream",
        "Place in line of a waiting /chat_stream request",
        f"For the request sent with `{QUEUE_TICKET_HEADER}: <ticket>`; poll it while the POST has not answered.",
        {200: ok, **ROLE_DENIED},
        parameters=(param,),
    )


def _docs() -> dict[str, EndpointDoc]:
    return {
        "chat_stream": _chat_stream(),
        "clear_context": _clear_context(),
        "get_prompt": _session_api("get_prompt", "The conversation's prompt text", m.PromptResult),
        "set_generation_params": _session_api(
            "set_generation_params",
            "Keep sampling values for this session",
            m.GenerationParamsResult,
            m.GenerationParams,
        ),
        "get_generation_params": _session_api(
            "get_generation_params", "This session's sampling values", m.GenerationParamsResult
        ),
        "set_feedback": _session_api("set_feedback", "Like or dislike an answer", m.FeedbackResult, m.FeedbackRequest),
        "get_load": _ops("get_load"),
        "get_resource_usage": _ops("get_resource_usage"),
        "webui_index": EndpointDoc(
            "webui_index",
            "The chat page",
            "The built-in web UI.",
            {200: text_response("text/html", "HTML"), **ROLE_DENIED},
        ),
        "webui_js": EndpointDoc(
            "webui_js",
            "The chat page's script",
            "The built-in web UI.",
            {200: text_response("application/javascript", "JS"), **ROLE_DENIED},
        ),
        "health": _ops("health"),
        "metrics": _ops("metrics"),
        "queue_position": _queue_position(),
        "openai_chat_completions": _openai("chat"),
        "openai_completions": _openai("completion"),
        "openai_models": _openai("models"),
        **extra_docs(),
    }


def endpoint_options(key: str) -> dict[str, Any]:
    """The ``add_api_route`` keyword arguments that describe the endpoint ``key``: an API name, "queue_position",
    "conversation_items" (GET /conversations/{id}/items), or an OpenAI route's name ("openai_chat_completions",
    "openai_completions", "openai_models", "openai_model", "openai_responses", "openai_response",
    "openai_response_delete")."""
    return route_options(_docs()[key])


def install_openapi(app: FastAPI) -> None:
    """Add the schemas the endpoint descriptions refer to and the security schemes to ``app``'s /openapi.json."""
    if getattr(app.state, "chatstream_openapi", False):
        return
    app.state.chatstream_openapi = True
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(component_schemas())
        components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def component_schemas() -> dict[str, Any]:
    """The JSON schemas of every model the endpoint descriptions refer to."""
    models: list[type[BaseModel]] = [
        *_models_of(m),
        *_models_of(mx),
        ChatCompletionRequest,
        CompletionRequest,
        ResponsesRequest,
    ]
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(definitions.get("$defs", {}))


def _models_of(module: Any) -> list[type[BaseModel]]:
    """The pydantic models defined in ``module`` (not the parametrized generics pydantic leaves in its namespace,
    such as ``RootModel[...]``)."""
    named = [value for name, value in vars(module).items() if name.isidentifier() and isinstance(value, type)]
    return [model for model in named if issubclass(model, BaseModel) and model.__module__ == module.__name__]
