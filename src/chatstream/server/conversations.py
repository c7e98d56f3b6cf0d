"""The conversations API: a user's conversations over HTTP (list, create, open, rename, delete, export).

The user is the one of the request's session (``session["user_id"]``, see :mod:`chatstream.sessions.keeper`); the
routes are browser APIs, like /chat_stream, not under /v1 (OpenAI clients have no session). Each route has an API
name (server/access.py) that client roles allow or deny; the default browser role allows them all. Bodies and errors
follow OpenAI's Conversations API where it fits (server/conversations_render.py): errors are
``{"error": {"message", "type", "param", "code"}}``, and another user's conversation id answers exactly like a
missing one (404).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.server.context import ServerContext
from chatstream.server.conversations_render import (
    EXPORT_FORMATS,
    conversation_json,
    export_response,
    item_json,
    list_json,
)
from chatstream.server.errors import ApiError, BadRequest, Forbidden, openai_error_response
from chatstream.server.http import parse_json_object, read_body
from chatstream.server.openapi_docs import endpoint_options
from chatstream.sessions.base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from chatstream.sessions.errors import ConversationNotFound, CorruptRecord, StoreError
from chatstream.sessions.lookup import FoundSession, find_session
from chatstream.sessions.middleware import session_skipped
from chatstream.sessions.prompt_bridge import new_conversation
from chatstream.sessions.records import Conversation, check_conversation_id, clean_title

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

__all__ = ["CONVERSATION_ROUTES", "add_conversation_route"]

Handler = Callable[[ServerContext, Request], Awaitable[Response]]

_ID = "/conversations/{conversation_id}"
CONVERSATION_ROUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "list_conversations": (("GET", "/conversations"),),
    "create_conversation": (("POST", "/conversations"),),
    "get_conversation": (("GET", _ID), ("GET", _ID + "/items")),
    "update_conversation": (("POST", _ID),),
    "open_conversation": (("POST", _ID + "/open"),),
    "delete_conversation": (("DELETE", _ID),),
    "export_conversation": (("GET", _ID + "/export"),),
}
"""Method and path of each route, by API name."""


def add_conversation_route(app: FastAPI, ctx: ServerContext, api_name: str) -> None:
    """Mount the route(s) of ``api_name`` (one of :data:`CONVERSATION_ROUTES`), described in /openapi.json."""
    for method, path in CONVERSATION_ROUTES[api_name]:
        endpoint = _endpoint(ctx, api_name, _HANDLERS[(method, path)])
        options = endpoint_options("conversation_items" if path.endswith("/items") else api_name)
        app.add_api_route(path, endpoint, methods=[method], name=f"chatstream_{api_name}", **options)


def _endpoint(ctx: ServerContext, api_name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if not ctx.roles.is_allowed(request, api_name):
            return openai_error_response(Forbidden(f"Your client role may not call {api_name!r}.", param=None))
        try:
            return await handler(ctx, request)
        except (ApiError, StoreError) as exc:
            if isinstance(exc, CorruptRecord):
                logger.error("%s %s: %s", request.method, request.url.path, exc)
            return openai_error_response(exc)

    endpoint.__name__ = f"chatstream_{api_name}"
    return endpoint


# ----- the user -----


def _user(ctx: ServerContext, request: Request, *, create: bool = False) -> tuple[FoundSession, str | None]:
    """The request's session and its user: made on first use when ``create``, else None for a session without one
    (a visitor who never chatted has no conversations, and a look at the list leaves no session behind)."""
    found = find_session(request, materialize=create)
    if found is None:
        if session_skipped(request):
            raise BadRequest("Conversations belong to a browser session; send the session cookie.", code="no_session")
        raise ApiError("Sessions are not available: add a session middleware (append_middlewares).", code="no_session")
    return found, ctx.conversations.owner_of(found, create=create)


def _conversation_id(request: Request) -> str:
    value = request.path_params["conversation_id"]
    try:
        check_conversation_id(value)
    except ValueError as exc:
        raise BadRequest(f"'conversation_id': {exc}", param="conversation_id") from None
    return str(value)


async def _body(ctx: ServerContext, request: Request) -> dict[str, Any]:
    raw = await read_body(request, ctx.max_body_bytes)
    return parse_json_object(raw) if raw.strip() else {}


def _page_size(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_PAGE_SIZE))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_PAGE_SIZE}, got {raw!r:.20}", param="limit")
    return int(raw)


# ----- the routes -----


async def list_conversations(ctx: ServerContext, request: Request) -> Response:
    """GET /conversations?limit=20&after=<id>: the user's conversations, most recently updated first."""
    limit = _page_size(request)
    after = request.query_params.get("after") or None
    found, owner = _user(ctx, request, create=False)
    current_id = ctx.conversations.current_id(found)
    if owner is None:
        return JSONResponse(list_json([], False, current_id=current_id))
    await ctx.conversations.startup()
    try:
        page = await ctx.conversations.store.conversations.list_recent(owner, limit=limit, after=after)
    except ConversationNotFound:
        raise BadRequest(f"'after' names no conversation of yours: {after!r:.110}", param="after") from None
    data = [conversation_json(summary, current_id) for summary in page.items]
    return JSONResponse(list_json(data, page.has_more, current_id=current_id))


async def create_conversation(ctx: ServerContext, request: Request) -> Response:
    """POST /conversations ``{"title": "...", "make_current": true}``: a new, empty conversation."""
    body = await _body(ctx, request)
    title = _title(body, required=False)
    make_current = body.get("make_current", True)
    if not isinstance(make_current, bool):
        raise BadRequest(f"'make_current' must be true or false, got {make_current!r:.40}", param="make_current")
    found, owner = _user(ctx, request, create=True)
    keeper = ctx.conversations
    await keeper.startup()
    record = new_conversation(str(owner), keeper.new_prompt())
    record.title = title
    stored = await keeper.store.conversations.create(record)
    if make_current:
        keeper.set_current(found, stored.id)
    return JSONResponse(conversation_json(stored.summary(), keeper.current_id(found)))


async def get_conversation(ctx: ServerContext, request: Request) -> Response:
    """GET /conversations/{id}: the conversation without its messages."""
    found, record = await _owned(ctx, request)
    return JSONResponse(conversation_json(record.summary(), ctx.conversations.current_id(found)))


async def list_items(ctx: ServerContext, request: Request) -> Response:
    """GET /conversations/{id}/items: every message, oldest first."""
    _found, record = await _owned(ctx, request)
    return JSONResponse(list_json([item_json(message) for message in record.messages], False))


async def update_conversation(ctx: ServerContext, request: Request) -> Response:
    """POST /conversations/{id} ``{"title": "..."}`` (or OpenAI's ``{"metadata": {"title": "..."}}``): rename;
    an empty title derives it again from the first message."""
    conversation_id = _conversation_id(request)
    title = _title(await _body(ctx, request), required=True)
    found, owner = _owner_of(ctx, request, conversation_id)
    await ctx.conversations.startup()
    summary = await ctx.conversations.store.conversations.rename(owner, conversation_id, title)
    return JSONResponse(conversation_json(summary, ctx.conversations.current_id(found)))


async def open_conversation(ctx: ServerContext, request: Request) -> Response:
    """POST /conversations/{id}/open: make it the current conversation (the one /chat_stream continues)."""
    found, record = await _owned(ctx, request)
    ctx.conversations.set_current(found, record.id)
    return JSONResponse(conversation_json(record.summary(), record.id))


async def delete_conversation(ctx: ServerContext, request: Request) -> Response:
    """DELETE /conversations/{id}: delete it (if it was current, the next turn starts a new one)."""
    conversation_id = _conversation_id(request)
    found, owner = _owner_of(ctx, request, conversation_id)
    keeper = ctx.conversations
    await keeper.startup()
    await keeper.store.conversations.delete(owner, conversation_id)
    if keeper.current_id(found) == conversation_id:
        keeper.set_current(found, None)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def export_conversation(ctx: ServerContext, request: Request) -> Response:
    """GET /conversations/{id}/export?format=json|markdown: a file to download."""
    export_format = request.query_params.get("format", "json")
    if export_format not in EXPORT_FORMATS:
        raise BadRequest(f"'format' must be one of {sorted(EXPORT_FORMATS)}, got {export_format!r:.40}", param="format")
    _found, record = await _owned(ctx, request)
    return export_response(record, export_format)


def _owner_of(ctx: ServerContext, request: Request, conversation_id: str) -> tuple[FoundSession, str]:
    """The session and its user, who must have one to own ``conversation_id`` (ConversationNotFound)."""
    found, owner = _user(ctx, request)
    if owner is None:
        raise ConversationNotFound(conversation_id)
    return found, owner


async def _owned(ctx: ServerContext, request: Request) -> tuple[FoundSession, Conversation]:
    """The session and the named conversation of its user (ConversationNotFound for anyone else's)."""
    conversation_id = _conversation_id(request)
    found, owner = _owner_of(ctx, request, conversation_id)
    await ctx.conversations.startup()
    return found, await ctx.conversations.store.conversations.get(owner, conversation_id)


def _title(body: dict[str, Any], *, required: bool) -> str:
    metadata = body.get("metadata")
    title = body.get("title", metadata.get("title") if isinstance(metadata, dict) else None)
    if title is None:
        if required:
            raise BadRequest("'title' is required (a string; empty derives it from the first message)", param="title")
        return ""
    try:
        return clean_title(title)
    except ValueError as exc:
        raise BadRequest(f"'title': {exc}", param="title") from None


_HANDLERS: dict[tuple[str, str], Handler] = {
    ("GET", "/conversations"): list_conversations,
    ("POST", "/conversations"): create_conversation,
    ("GET", _ID): get_conversation,
    ("GET", _ID + "/items"): list_items,
    ("POST", _ID): update_conversation,
    ("POST", _ID + "/open"): open_conversation,
    ("DELETE", _ID): delete_conversation,
    ("GET", _ID + "/export"): export_conversation,
}
