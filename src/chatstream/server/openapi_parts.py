"""The building blocks of the endpoint descriptions in /openapi.json: schema references, responses by media type,
error responses, security, the client-roles note, and :class:`EndpointDoc` with :func:`route_options`.

Shared by ``openapi_docs.py`` (the native and chat/completions endpoints, the registry) and ``openapi_docs_extra.py``
(the conversations REST API, the Responses API, GET /v1/models/{id}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from chatstream.server import openapi_models as m
from chatstream.server.access import DEFAULT_AGENT_APIS, DEFAULT_BROWSER_APIS, OPEN_API_NAMES
from chatstream.server.http import AUTH_HEADER

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
NATIVE_SECURITY: list[dict[str, list[str]]] = [{"SessionCookie": []}, {"AgentPassPhrase": []}, {}]
OPENAI_SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"AgentPassPhrase": []}, {}]


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_response(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(model)}}}


def text_response(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def sse_response(chunk: type[BaseModel], whole: type[BaseModel], description: str) -> dict[str, Any]:
    """``whole`` as JSON, or Server-Sent Events ``data: <chunk>`` (and ``: comment`` lines)."""
    data = {"type": "string", "contentMediaType": JSON, "contentSchema": ref(chunk)}
    item = {"type": "object", "required": ["data"], "properties": {"data": data, "comment": {"type": "string"}}}
    return {
        "description": description,
        "content": {JSON: {"schema": ref(whole)}, "text/event-stream": {"itemSchema": item}},
    }


def typed_sse_response(event: type[BaseModel], whole: type[BaseModel], description: str) -> dict[str, Any]:
    """``whole`` as JSON, or typed Server-Sent Events: ``event: <type>`` and ``data: <event>`` (whose ``type`` is
    the same name)."""
    data = {"type": "string", "contentMediaType": JSON, "contentSchema": ref(event)}
    properties = {"event": {"type": "string", "description": "The data's `type`."}, "data": data}
    item = {"type": "object", "required": ["event", "data"], "properties": properties}
    return {
        "description": description,
        "content": {JSON: {"schema": ref(whole)}, "text/event-stream": {"itemSchema": item}},
    }


RETRY_AFTER = {"Retry-After": {"description": "Seconds after which to retry", "schema": {"type": "integer"}}}
ROLE_DENIED = {403: json_response(m.RoleDenied, "The caller's client role may not call this API.")}
_OPENAI_ERRORS = {
    400: "Invalid body (the message names the field), or a prompt longer than the model's context.",
    401: "Missing or wrong API key.",
    403: "The caller's client role may not use the OpenAI API.",
    404: "Unknown model.",
    409: "Another request changed the same record first; retry.",
    413: "The body is longer than the server accepts.",
    429: "The waiting line is full; Retry-After says when to try again.",
    500: "The generation failed.",
    503: "The server is starting or shutting down.",
}


def openai_errors(*statuses: int, **described: str) -> dict[int, Any]:
    """Error responses in OpenAI's shape; ``described`` (``e404="..."``) replaces the usual description."""
    errors = {
        status: json_response(m.OpenAIError, described.get(f"e{status}", _OPENAI_ERRORS[status])) for status in statuses
    }
    if 429 in errors:
        errors[429]["headers"] = RETRY_AFTER
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
    security: list[dict[str, list[str]]] = field(default_factory=lambda: list(NATIVE_SECURITY))
    body_required: bool = True
    tag: str | None = None


def path_parameter(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"} if pattern is None else {"type": "string", "pattern": pattern}
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def _denied_shape(responses: dict[int, Any]) -> str:
    schema = responses.get(403, {}).get("content", {}).get(JSON, {}).get("schema", {})
    if schema == ref(m.OpenAIError):
        return "OpenAI's error shape, type `permission_error`"
    return "the original's shape"


def roles_note(api_name: str, responses: dict[int, Any]) -> str:
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
        f'"all". Allowed by default to {who}. Denied: 403 ({_denied_shape(responses)}).'
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
        "description": doc.description + roles_note(doc.api_name, doc.responses),
        "tags": [doc.tag or ("OpenAI" if doc.api_name == "openai" else "ChatStream")],
        "responses": doc.responses,
        "response_class": Response,
        "openapi_extra": extra,
    }
