"""What /openapi.json says about the conversations REST API (server/conversations.py), the Responses API
(server/responses.py) and GET /v1/models/{id}: their bodies, responses, errors and security.

Every error of these endpoints is in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, their 403
(the client role) included. :func:`extra_docs` gives ``openapi_docs.py``'s registry their descriptions.
"""

from __future__ import annotations

from typing import Any

from chatstream.server import openapi_models as m
from chatstream.server import openapi_models_extra as mx
from chatstream.server.openapi_parts import (
    JSON,
    OPENAI_SECURITY,
    EndpointDoc,
    json_response,
    openai_errors,
    path_parameter,
    ref,
    typed_sse_response,
)
from chatstream.server.responses_schemas import ResponsesRequest
from chatstream.sessions.base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

_TAG = "Conversations"
_CONVERSATION_ERRORS = {
    413: "`payload_too_large`: the body is longer than the server accepts (the limit is in the message).",
    400: "Invalid input (`param` names it: `conversation_id`, `limit`, `after`, `title`, `format`...), or "
    "`no_session`: the request skipped the session (X-FastSession-Skip).",
    403: "The caller's client role may not call this API (`permission_error`).",
    404: "`conversation_not_found`: the user has no conversation with this id (another user's answers the same).",
    500: "`corrupt_record` / `foreign_record`: the stored record cannot be read (the message names it); "
    "`no_session`: the app has no session middleware.",
    503: "`store_unavailable`: the conversation store cannot be reached.",
}
_CONVERSATION_ID = path_parameter(
    "conversation_id", "The conversation's id (1 to 100 of A-Z a-z 0-9 _ - .).", "^[A-Za-z0-9_.-]{1,100}$"
)


def _conversation_errors(*statuses: int) -> dict[int, Any]:
    errors: dict[int, Any] = {}
    for status in sorted({400, 403, 500, 503, *statuses}):
        errors[status] = json_response(m.OpenAIError, _CONVERSATION_ERRORS[status])
    return errors


def _conversation(api_name: str, summary: str, description: str, ok: dict[str, Any], **extra: Any) -> EndpointDoc:
    """A route of one conversation (the ``conversation_id`` path parameter; 404 for an unknown one)."""
    statuses = (404, 413) if extra.get("request") is not None else (404,)
    responses = {200: ok, **_conversation_errors(*statuses)}
    parameters = (_CONVERSATION_ID, *extra.pop("parameters", ()))
    return EndpointDoc(api_name, summary, description, responses, parameters=parameters, tag=_TAG, **extra)


def _list_conversations() -> EndpointDoc:
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "The page size.",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
    }
    after = {
        "name": "after",
        "in": "query",
        "required": False,
        "description": "The previous page's `last_id` (400 `param: after` when it names no conversation of yours).",
        "schema": {"type": "string"},
    }
    ok = json_response(
        mx.ConversationList, "A page of the user's conversations (empty for a visitor who never chatted)."
    )
    return EndpointDoc(
        "list_conversations",
        "List the user's conversations",
        "Most recently updated first. A visitor who never chatted has no user yet: the list is empty and looking at "
        "it creates no session.",
        {200: ok, **_conversation_errors()},
        parameters=(limit, after),
        tag=_TAG,
    )


def _create_conversation() -> EndpointDoc:
    ok = json_response(mx.ConversationObject, "The new, empty conversation.")
    return EndpointDoc(
        "create_conversation",
        "Start a conversation",
        "An empty conversation of the session's user (made on first use); by default it becomes the current one.",
        {200: ok, **_conversation_errors(413)},
        request=mx.ConversationCreateRequest,
        body_required=False,
        tag=_TAG,
    )


def _export_conversation() -> EndpointDoc:
    fmt = {
        "name": "format",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["json", "markdown"], "default": "json"},
    }
    disposition = {"description": "attachment; filename=<title>.json or .md", "schema": {"type": "string"}}
    ok = {
        "description": "A file to download: the JSON record (`format=json`) or Markdown (`format=markdown`).",
        "headers": {"Content-Disposition": disposition},
        "content": {JSON: {"schema": ref(mx.ConversationExport)}, "text/markdown": {"schema": {"type": "string"}}},
    }
    description = "The JSON record reads back with `conversation_from_json`; the Markdown is for people."
    return _conversation("export_conversation", "Export a conversation", description, ok, parameters=(fmt,))


def _conversation_docs() -> dict[str, EndpointDoc]:
    one = json_response(mx.ConversationObject, "The conversation, without its messages.")
    return {
        "list_conversations": _list_conversations(),
        "create_conversation": _create_conversation(),
        "get_conversation": _conversation("get_conversation", "Get a conversation", "Without its messages.", one),
        "conversation_items": _conversation(
            "get_conversation",
            "A conversation's messages",
            "Every message, oldest first, as OpenAI message items.",
            json_response(mx.ConversationItemList, "The messages."),
        ),
        "update_conversation": _conversation(
            "update_conversation",
            "Rename a conversation",
            "An empty title derives it again from the first message. Renaming leaves `version` alone.",
            json_response(mx.ConversationObject, "The renamed conversation."),
            request=mx.ConversationUpdateRequest,
        ),
        "open_conversation": _conversation(
            "open_conversation",
            "Make a conversation current",
            "The next /chat_stream turn that names no conversation continues this one. No body needed.",
            json_response(mx.ConversationObject, "The conversation, now current."),
            request=m.EmptyRequest,
            body_required=False,
        ),
        "delete_conversation": _conversation(
            "delete_conversation",
            "Delete a conversation",
            "If it was current, the next turn starts a new one.",
            json_response(mx.ConversationDeleted, "Deleted."),
        ),
        "export_conversation": _export_conversation(),
    }


_RESPONSE_ID = path_parameter("response_id", "The response's id (its `id`).")
_STORED_ERRORS = {
    "e404": "No stored response with this id for this API key (never stored, or deleted).",
    "e500": "`corrupt_record` / `foreign_record`: the stored record cannot be read.",
    "e503": "`store_unavailable`: the store cannot be reached.",
}
_STREAM_NOTE = (
    "`stream` false: the response object once it is done. `stream` true: typed Server-Sent Events (`event: <type>` "
    "and `data: <event>`): response.created, response.in_progress, the output items as they come "
    "(response.output_item.added, response.content_part.added, response.output_text.delta ... .done; "
    "response.function_call_arguments.delta / .done), then response.completed, response.incomplete or "
    "response.failed. Events are numbered by `sequence_number`; there is no `[DONE]`."
)


def _create_response() -> EndpointDoc:
    errors = openai_errors(
        400,
        401,
        403,
        404,
        413,
        429,
        500,
        503,
        e404="Unknown model (`param: model`), or `previous_response_id` names no stored response.",
        e500="The generation failed, or a stored record cannot be read.",
        e503="The server is starting or shutting down, or the store cannot be reached (`store_unavailable`).",
    )
    return EndpointDoc(
        "openai",
        "Create a response",
        "OpenAI's Responses API: the stored turns of `previous_response_id`, then `input`, after `instructions`. "
        "Fields this server cannot honour (`background`, `conversation`, `prompt`, built-in tools) are refused with "
        "a 400 naming them. With `store` (the default) the response is kept until deleted.",
        {200: typed_sse_response(mx.ResponseStreamEvent, mx.ResponseObject, _STREAM_NOTE), **errors},
        request=ResponsesRequest,
        security=OPENAI_SECURITY,
    )


def _openai_docs() -> dict[str, EndpointDoc]:
    model_errors = openai_errors(401, 403, 404, e404="This server runs another model (`model_not_found`).")
    stored = openai_errors(401, 403, 404, 500, 503, **_STORED_ERRORS)
    return {
        "openai_model": EndpointDoc(
            "openai",
            "Retrieve a model",
            "OpenAI-compatible: the model, when it is the one this server runs.",
            {200: json_response(m.Model, "The model."), **model_errors},
            parameters=(path_parameter("model_id", "The model's id (may hold slashes)."),),
            security=OPENAI_SECURITY,
        ),
        "openai_responses": _create_response(),
        "openai_response": EndpointDoc(
            "openai",
            "Retrieve a response",
            "A stored response of the same API key (a hash of the bearer token owns it; requests without one share "
            "an owner).",
            {200: json_response(mx.ResponseObject, "The response as it ended."), **stored},
            parameters=(_RESPONSE_ID,),
            security=OPENAI_SECURITY,
        ),
        "openai_response_delete": EndpointDoc(
            "openai",
            "Delete a response",
            "Removes its turn when it is the latest of its chain, else hides it (its text stays in the history of "
            "the responses that continued it).",
            {200: json_response(mx.ResponseDeleted, "Deleted."), **stored, **openai_errors(409)},
            parameters=(_RESPONSE_ID,),
            security=OPENAI_SECURITY,
        ),
    }


def extra_docs() -> dict[str, EndpointDoc]:
    """The descriptions of the conversations API (by API name; "conversation_items" for GET
    /conversations/{id}/items), of the Responses API and of GET /v1/models/{id} (by route name)."""
    return {**_conversation_docs(), **_openai_docs()}
