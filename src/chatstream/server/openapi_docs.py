"""What /openapi.json says about every ChatStream endpoint: bodies, responses, error shapes, media types, security.

The endpoints take a plain ``Request`` (each protocol parses and answers bad input in its own shape), so FastAPI
cannot infer anything; :func:`route_options` gives ``add_api_route`` the description of one endpoint, and
:func:`install_openapi` adds the schemas it refers to and the security schemes to the app's document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

from chatstream.server import openapi_models as m
from chatstream.server.access import DEFAULT_AGENT_APIS, DEFAULT_BROWSER_APIS, OPEN_API_NAMES
from chatstream.server.http import AUTH_HEADER, MESSAGE_ID_HEADER, QUEUE_TICKET_HEADER
from chatstream.server.openai_schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

JSON = "application/json"
SECURITY_SCHEMES: dict[str, Any] = {
    "SessionCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "sid",
        "description": "The browser's session (cookie name as configured). Its client role (the default browser "
        "role, or one granted by typing a pass phrase in the chat) decides which APIs it may call (docs/roles.md).",
    },
    "AgentPassPhrase": {
        "type": "apiKey",
        "in": "header",
        "name": AUTH_HEADER,
        "description": "An agent role's pass phrase (auth_method header_phrase), per request.",
    },
    "ApiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of the OpenAI endpoints, required when the server has any (--api-key, "
        "$CHATSTREAM_API_KEYS, ChatStream(api_keys=...)).",
    },
}
_NATIVE_SECURITY: list[dict[str, list[str]]] = [{"SessionCookie": []}, {"AgentPassPhrase": []}, {}]
_OPENAI_SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"AgentPassPhrase": []}, {}]


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(model)}}}


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _sse(chunk: type[BaseModel], whole: type[BaseModel], description: str) -> dict[str, Any]:
    data = {"type": "string", "contentMediaType": JSON, "contentSchema": ref(chunk)}
    item = {"type": "object", "required": ["data"], "properties": {"data": data, "comment": {"type": "string"}}}
    return {
        "description": description,
        "content": {JSON: {"schema": ref(whole)}, "text/event-stream": {"itemSchema": item}},
    }


_RETRY_AFTER = {"Retry-After": {"description": "Seconds after which to retry", "schema": {"type": "integer"}}}
_DENIED = {403: _json(m.RoleDenied, "The caller's client role may not call this API.")}
_TOO_LARGE = _json(m.ApiResult, "The body is longer than the server accepts (the limit is in the message).")


def _openai_errors(*statuses: int) -> dict[int, Any]:
    names = {
        400: "Invalid body (the message names the field), or a prompt longer than the model's context.",
        401: "Missing or wrong API key.",
        403: "The caller's client role may not use the OpenAI API.",
        404: "Unknown model.",
        413: "The body is longer than the server accepts.",
        429: "The waiting line is full; Retry-After says when to try again.",
        500: "The generation failed.",
        503: "The server is starting or shutting down.",
    }
    errors = {status: _json(m.OpenAIError, names[status]) for status in statuses}
    if 429 in errors:
        errors[429]["headers"] = _RETRY_AFTER
    return errors


@dataclass(frozen=True)
class EndpointDoc:
    """The OpenAPI description of one endpoint."""

    api_name: str
    summary: str
    description: str
    responses: dict[int, Any]
    request: type[BaseModel] | None = None
    parameters: tuple[dict[str, Any], ...] = ()
    security: list[dict[str, list[str]]] = field(default_factory=lambda: list(_NATIVE_SECURITY))
    body_required: bool = True


def _roles_note(api_name: str) -> str:
    if api_name in OPEN_API_NAMES:
        who = "every role, unless some role names it in its allow list"
    elif api_name in DEFAULT_BROWSER_APIS:
        who = "the default browser role ('user')"
    elif api_name in DEFAULT_AGENT_APIS:
        who = "the default agent role ('agent')"
    else:
        who = "no default role: allow it in a role of your own (docs/roles.md)"
    return (
        f"\n\nClient roles: API name `{api_name}`; a role may call it when its `apis.allow` lists it or is "
        f'"all". Allowed by default to {who}. Denied: 403 (the original\'s shape).'
    )


def route_options(doc: EndpointDoc) -> dict[str, Any]:
    """Keyword arguments of ``add_api_route`` that describe the endpoint in /openapi.json."""
    extra: dict[str, Any] = {"security": doc.security}
    if doc.request is not None:
        extra["requestBody"] = {"required": doc.body_required, "content": {JSON: {"schema": ref(doc.request)}}}
    if doc.parameters:
        extra["parameters"] = list(doc.parameters)
    return {
        "summary": doc.summary,
        "description": doc.description + _roles_note(doc.api_name),
        "tags": ["OpenAI" if doc.api_name == "openai" else "ChatStream"],
        "responses": doc.responses,
        "response_class": Response,
        "openapi_extra": extra,
    }


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
    errors = {status: _json(m.NativeError, described[status]) for status in statuses}
    if 429 in errors:
        errors[429]["headers"] = _RETRY_AFTER
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
        {200: ok, **_native_errors(400, 413, 429, 500, 503), **_DENIED},
        request=m.ChatStreamRequest,
        parameters=(ticket,),
    )


def _session_api(name: str, summary: str, result: type[m.ApiResult], request: Any = None) -> EndpointDoc:
    responses: dict[int, Any] = {200: _json(result, "The result (`success` false with a message on failure).")}
    if request is not None:
        responses[400] = _json(m.ApiResult, "Invalid body; the message names the field.")
        responses[413] = _TOO_LARGE
    return EndpointDoc(name, summary, "One of the original's session APIs.", {**responses, **_DENIED}, request)


def _clear_context() -> EndpointDoc:
    responses = {200: _json(m.ApiResult, "`success` false: there was no conversation."), 413: _TOO_LARGE, **_DENIED}
    summary = "Forget this session's conversation"
    return EndpointDoc("clear_context", summary, "No body needed.", responses, m.EmptyRequest, body_required=False)


def _openai(kind: str) -> EndpointDoc:
    if kind == "models":
        responses = {200: _json(m.ModelList, "The model this server runs."), **_openai_errors(401, 403)}
        return EndpointDoc("openai", "List models", "OpenAI-compatible.", responses, security=_OPENAI_SECURITY)
    chat = kind == "chat"
    stream_note = (
        "`stream` false: one JSON object. `stream` true: Server-Sent Events, `data: <chunk>` per piece of the answer, "
        "then `data: [DONE]`; while the request waits in line, comment lines `: queue position N` (N = 1: next)."
    )
    whole, chunk = (m.ChatCompletion, m.ChatCompletionChunk) if chat else (m.Completion, m.Completion)
    responses = {200: _sse(chunk, whole, stream_note), **_openai_errors(400, 401, 403, 404, 413, 429, 500, 503)}
    return EndpointDoc(
        "openai",
        "Create a chat completion" if chat else "Create a completion",
        "OpenAI-compatible. A prompt longer than the model's context is refused (400, code "
        "`context_length_exceeded`, naming the limit and the prompt's token count).",
        responses,
        request=ChatCompletionRequest if chat else CompletionRequest,
        security=_OPENAI_SECURITY,
    )


def _ops(name: str) -> EndpointDoc:
    if name == "health":
        ok, unavailable = _json(m.Health, "The engine runs."), _json(m.Health, "Starting or draining.")
        return EndpointDoc(name, "Health", "For load balancers.", {200: ok, 503: unavailable, **_DENIED})
    if name == "metrics":
        ok = _text("text/plain", "Prometheus text exposition (version 0.0.4).")
        return EndpointDoc(name, "Prometheus metrics", "For Prometheus.", {200: ok, **_DENIED})
    if name == "get_load":
        return EndpointDoc(
            name, "Load", "Running and waiting generations.", {200: _json(m.LoadResult, "Load"), **_DENIED}
        )
    result = _json(m.ResourceUsageResult, "Memory in GiB")
    return EndpointDoc(name, "Resource usage", "Process and GPU memory.", {200: result, **_DENIED})


def _queue_position() -> EndpointDoc:
    param = {"name": "ticket", "in": "query", "required": True, "schema": {"type": "string"}}
    ok = _json(m.QueuePosition, "`waiting` false once the request runs, or for an unknown ticket.")
    return EndpointDoc(
        "chat_stream",
        "Place in line of a waiting /chat_stream request",
        f"For the request sent with `{QUEUE_TICKET_HEADER}: <ticket>`; poll it while the POST has not answered.",
        {200: ok, **_DENIED},
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
            "webui_index", "The chat page", "The built-in web UI.", {200: _text("text/html", "HTML"), **_DENIED}
        ),
        "webui_js": EndpointDoc(
            "webui_js",
            "The chat page's script",
            "The built-in web UI.",
            {200: _text("application/javascript", "JS"), **_DENIED},
        ),
        "health": _ops("health"),
        "metrics": _ops("metrics"),
        "queue_position": _queue_position(),
        "openai_chat_completions": _openai("chat"),
        "openai_completions": _openai("completion"),
        "openai_models": _openai("models"),
    }


def endpoint_options(key: str) -> dict[str, Any]:
    """The ``add_api_route`` keyword arguments that describe the endpoint ``key`` (an API name, "queue_position",
    or "openai_chat_completions" / "openai_completions" / "openai_models")."""
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
    models = [model for model in vars(m).values() if isinstance(model, type) and issubclass(model, BaseModel)]
    models = [model for model in models if model is not BaseModel and model.__module__ == m.__name__]
    models += [ChatCompletionRequest, CompletionRequest]
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(definitions.get("$defs", {}))
