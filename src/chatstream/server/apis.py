"""The original package's extra APIs and ``append_apis``: mount them by name on a FastAPI app.

Every handler checks the caller's client role itself (code written for the original mounts them in its own routes,
e.g. ``return await chat_stream.handle_get_prompt_request(request)``), keeps the original's JSON shapes, and answers
bad input with a 4xx that names the field.
"""

from __future__ import annotations

import inspect
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.i18n import message
from chatstream.server.access import API_NAMES, role_checked
from chatstream.server.context import ServerContext
from chatstream.server.conversations import CONVERSATION_ROUTES, add_conversation_route
from chatstream.server.errors import ApiError, BadRequest, NotFound, native_error_response
from chatstream.server.http import parse_json_object
from chatstream.server.ops import (
    handle_get_load_request,
    handle_get_resource_usage_request,
    handle_health,
    handle_metrics,
)
from chatstream.server.webui import index, js
from chatstream.service import ChatService
from chatstream.sessions.errors import ConversationNotFound, StoreError
from chatstream.sessions.lookup import FoundSession, find_session
from chatstream.sessions.records import Conversation, Feedback
from chatstream.sessions.turns import CONVERSATION_ID_HEADER, pick_conversation_id

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "API_PATHS",
    "append_apis",
    "handle_clear_context_request",
    "handle_get_generation_params_request",
    "handle_get_prompt_request",
    "handle_set_feedback_request",
    "handle_set_generation_params_request",
    "select_apis",
]

logger = logging.getLogger(__name__)

API_PATHS: dict[str, tuple[str, str]] = {
    "chat_stream": ("POST", "/chat_stream"),
    "clear_context": ("POST", "/clear_context"),
    "get_prompt": ("GET", "/get_prompt"),
    "set_generation_params": ("POST", "/set_generation_params"),
    "get_generation_params": ("GET", "/get_generation_params"),
    "set_feedback": ("POST", "/set_feedback"),
    "get_load": ("GET", "/get_load"),
    "get_resource_usage": ("GET", "/get_resource_usage"),
    "webui_index": ("GET", "/"),
    "webui_js": ("GET", "/chatstream.js"),
    "health": ("GET", "/health"),
    "metrics": ("GET", "/metrics"),
}
"""Method and path of each API name ("openai" mounts three paths under /v1, see server/openai.py; the
conversations API's names are in server/conversations.py)."""

_OPTION_KEYS = frozenset({"include", "exclude", "all", "web_ui_params", "on_feedback_received", "api_keys"})
_NOT_SESSION_HANDLER = "Not supported on current request_handler type."
GENERATION_PARAM_RANGES: dict[str, tuple[float, float, str]] = {
    "temperature": (0.0, 1.0, "Invalid temperature value. Temperature should be between 0.0 and 1.0."),
    "top_k_value": (1, 500, "Invalid top_k value. top_k_value should be between 1 and 500."),
    "top_p_value": (0.0, 1.0, "Invalid top_p value. top_p_value should be between 0.0 and 1.0."),
}


# ----- append_apis -----


def select_apis(opts: Mapping[str, Any] | None) -> list[str]:
    """The API names ``opts`` selects: exactly one of ``include`` / ``exclude`` / ``all`` (none selects nothing).

    Raises ValueError for two of them at once or an unknown API name (named in the message).
    """
    opts = opts or {}
    given = [key for key in ("include", "exclude", "all") if key in opts]
    if len(given) > 1:
        raise ValueError(f"append_apis takes only one of 'include', 'exclude', 'all'; got {given}")
    for key in set(opts) - _OPTION_KEYS:
        logger.warning("append_apis: unknown option %r ignored", key)
    if not given:
        return []
    key = given[0]
    if key == "all":
        if not isinstance(opts["all"], bool):
            raise ValueError(f"append_apis option 'all' must be true or false, got {opts['all']!r}")
        return list(API_NAMES) if opts["all"] else []
    names = opts[key]
    if isinstance(names, str) or not isinstance(names, list | tuple | set | frozenset):
        raise ValueError(f"append_apis option {key!r} must be a list of API names, got {names!r}")
    for name in names:
        if name not in API_NAMES:
            raise ValueError(f"append_apis: unknown API name {name!r} in {key!r}; known: {API_NAMES}")
    return [n for n in API_NAMES if n in names] if key == "include" else [n for n in API_NAMES if n not in names]


def append_apis(ctx: ServerContext, app: FastAPI, opts: Mapping[str, Any] | None = None) -> list[str]:
    """Mount the selected APIs on ``app`` (see :func:`select_apis`) and return their names.

    Other options: ``web_ui_params`` (a dict handed to the web UI), ``on_feedback_received`` (overrides the
    context's hook for /set_feedback), ``api_keys`` (for the OpenAI API, besides ``ctx.api_keys``).
    """
    opts = opts or {}
    selected = select_apis(opts)
    if not selected:
        logger.warning(message("no_apis_selected", ctx.service.locale))
    for name in selected:
        if name == "openai":
            from chatstream.server.openai import add_openai_routes

            add_openai_routes(app, ctx, (*ctx.api_keys, *tuple(opts.get("api_keys") or ())))
            continue
        if name in CONVERSATION_ROUTES:
            add_conversation_route(app, ctx, name)
            continue
        method, path = API_PATHS[name]
        app.add_api_route(path, _endpoint(ctx, name, opts), methods=[method], name=f"chatstream_{name}")
        logger.debug("API endpoint %s %s (%s) added", method, path, name)
    return selected


def _endpoint(ctx: ServerContext, name: str, opts: Mapping[str, Any]) -> Callable[[Request], Awaitable[Response]]:
    web_ui = {"ui_init_params": dict(opts.get("web_ui_params") or {})}
    feedback_opts = {"on_feedback_received": opts.get("on_feedback_received")}
    handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
        "chat_stream": lambda r: ctx.chat.handle(r),
        "clear_context": lambda r: handle_clear_context_request(ctx, r),
        "get_prompt": lambda r: handle_get_prompt_request(ctx, r),
        "set_generation_params": lambda r: handle_set_generation_params_request(ctx, r),
        "get_generation_params": lambda r: handle_get_generation_params_request(ctx, r),
        "set_feedback": lambda r: handle_set_feedback_request(ctx, r, feedback_opts),
        "get_load": lambda r: handle_get_load_request(ctx, r),
        "get_resource_usage": lambda r: handle_get_resource_usage_request(ctx, r),
        "webui_index": lambda r: index(ctx, r, None, web_ui),
        "webui_js": lambda r: js(ctx, r),
        "health": lambda r: handle_health(ctx, r),
        "metrics": lambda r: handle_metrics(ctx, r),
    }
    handler = handlers[name]

    async def endpoint(request: Request) -> Response:
        return await handler(request)

    endpoint.__name__ = f"chatstream_{name}"
    return endpoint


def _ok(**fields: Any) -> JSONResponse:
    return JSONResponse({"success": True, "message": "success", **fields})


def _fail(text: str, status: int = 200, **fields: Any) -> JSONResponse:
    return JSONResponse({"success": False, "message": text, **fields}, status_code=status)


# ----- the session APIs -----


@role_checked("clear_context")
async def handle_clear_context_request(
    ctx: ServerContext, request: Request, request_body: Any = None, callback: Any = None
) -> Response:
    """POST /clear_context: the session's next turn starts a new conversation (the old one stays in the user's
    list; DELETE /conversations/{id} deletes it)."""
    if not ctx.keeps_history_in_session:
        return _fail(_NOT_SESSION_HANDLER)
    found = find_session(request)
    if found is None or ctx.conversations.current_id(found) is None:
        return _fail("no context.")
    ctx.conversations.set_current(found, None)
    return JSONResponse({"success": True, "message": "Context successfully cleared"})


@role_checked("get_prompt")
async def handle_get_prompt_request(ctx: ServerContext, request: Request) -> Response:
    """GET /get_prompt: the rendered prompt text of this session's current conversation, URL-encoded."""
    if not ctx.keeps_history_in_session:
        return _fail(_NOT_SESSION_HANDLER)
    found = find_session(request)
    if found is None:
        return _fail("no context.", prompt=None)
    try:
        record = await current_conversation(ctx, found)
    except StoreError as exc:
        return native_error_response(exc)
    if record is None:
        return JSONResponse({"success": True, "message": "no prompt", "prompt": None})
    return _ok(prompt=urllib.parse.quote(ctx.conversations.to_prompt(record).create_prompt()))


async def current_conversation(
    ctx: ServerContext, found: FoundSession, conversation_id: str | None = None
) -> Conversation | None:
    """The named conversation of the session's user (ConversationNotFound when it is not theirs), else the current
    one (None: no current conversation, or not stored yet)."""
    keeper = ctx.conversations
    owner = keeper.owner_of(found, create=False)
    wanted = conversation_id or keeper.current_id(found)
    if owner is None or wanted is None:
        if conversation_id is not None:
            raise ConversationNotFound(conversation_id)
        return None
    await keeper.startup()
    try:
        return await keeper.store.conversations.get(owner, wanted)
    except ConversationNotFound:
        if conversation_id is not None:
            raise
        return None


def default_generation_params(service: ChatService) -> dict[str, Any]:
    """The service's default sampling in the original's names."""
    sampling = service.default_sampling
    return {"temperature": sampling.temperature, "top_k_value": sampling.top_k, "top_p_value": sampling.top_p}


def session_generation_params(service: ChatService, session: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults with this session's non-null values over them."""
    merged = default_generation_params(service)
    stored = (session or {}).get("generation_params") or {}
    merged.update({k: v for k, v in stored.items() if k in merged and v is not None})
    return merged


def parse_generation_params(data: Mapping[str, Any]) -> dict[str, float | int]:
    """The given subset of temperature / top_k_value / top_p_value, type-checked (400) and range-checked."""
    params: dict[str, float | int] = {}
    for name, (low, high, out_of_range) in GENERATION_PARAM_RANGES.items():
        value = data.get(name)
        if value is None:
            continue
        integral = name == "top_k_value"
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "an integer" if integral else "a number"
            raise BadRequest(f"'{name}' must be {kind}, got {value!r}", param=name)
        if integral and value != int(value):
            raise BadRequest(f"'{name}' must be an integer, got {value!r}", param=name)
        if not low <= value <= high:
            raise BadRequest(out_of_range, param=name)
        params[name] = int(value) if integral else float(value)
    return params


@role_checked("set_generation_params")
async def handle_set_generation_params_request(ctx: ServerContext, request: Request) -> Response:
    """POST /set_generation_params: keep temperature / top_k_value / top_p_value for this session's next turns."""
    try:
        params = parse_generation_params(parse_json_object(await request.body()))
    except ApiError as exc:
        return native_error_response(exc)
    found = find_session(request)
    if found is None:
        return _fail("no session", generation_params=None)
    stored = dict(found.data.get("generation_params") or {})
    stored.update(params)
    found.data["generation_params"] = stored
    found.save()
    return _ok(generation_params=session_generation_params(ctx.service, found.data))


@role_checked("get_generation_params")
async def handle_get_generation_params_request(ctx: ServerContext, request: Request) -> Response:
    """GET /get_generation_params: this session's values over the defaults."""
    found = find_session(request)
    if found is None:
        return _fail("no session", generation_params=None)
    return _ok(generation_params=session_generation_params(ctx.service, found.data))


def _parse_feedback(data: Mapping[str, Any], header: str | None) -> tuple[str, bool, Any, str | None]:
    message_id = data.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise BadRequest("'message_id' is required and must be a string", param="message_id")
    is_like = data.get("is_like", False)
    if not isinstance(is_like, bool):
        raise BadRequest(f"'is_like' must be true or false, got {is_like!r}", param="is_like")
    try:
        conversation_id = pick_conversation_id(data.get("conversation_id"), header)
    except ValueError as exc:
        raise BadRequest(str(exc), param="conversation_id") from None
    return message_id, is_like, data.get("form_data", ""), conversation_id


@role_checked("set_feedback")
async def handle_set_feedback_request(
    ctx: ServerContext, request: Request, opts: Mapping[str, Any] | None = None
) -> Response:
    """POST /set_feedback: keep a like/dislike (and form data) on one answer of the current conversation (or of
    ``conversation_id``) and hand it to ``on_feedback_received``."""
    if not ctx.keeps_history_in_session:
        return _fail(_NOT_SESSION_HANDLER)
    try:
        body = parse_json_object(await request.body())
        message_id, is_like, form_data, conversation_id = _parse_feedback(
            body, request.headers.get(CONVERSATION_ID_HEADER)
        )
        found = find_session(request)
        if found is None:
            return _fail("no session")
        feedback = await _store_feedback(ctx, found, message_id, (is_like, form_data), conversation_id)
    except (ApiError, StoreError) as exc:
        return native_error_response(exc)
    hook = (opts or {}).get("on_feedback_received") or ctx.on_feedback_received
    if hook is not None:
        try:
            result = hook(feedback)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_feedback_received failed for message %s", message_id)
            return _fail("error occurred", status=500)
    logger.debug("feedback received for message %s (is_like=%s)", message_id, is_like)
    return JSONResponse({"success": True, "message": "success", "target_message_id": message_id})


async def _store_feedback(
    ctx: ServerContext, found: FoundSession, message_id: str, given: tuple[bool, Any], conversation_id: str | None
) -> dict[str, Any]:
    """Keep the feedback on the message; return the record the hook gets."""
    is_like, form_data = given
    record = await current_conversation(ctx, found, conversation_id)
    if record is None:
        raise NotFound("No chat prompt", param="message_id")
    chat_prompt = ctx.conversations.to_prompt(record)
    target = chat_prompt.find_chat_content_by_message_id(message_id)
    if target is None:
        raise NotFound(f"Unknown message_id {message_id!r}", param="message_id")
    await ctx.conversations.store.conversations.set_feedback(
        record.owner, record.id, message_id, Feedback(is_like, form_data, time.time())
    )
    return {
        "is_like": is_like,
        "form_data": form_data,
        "prompt": chat_prompt.create_prompt({"to_message_id": message_id}),
        "target_message_id": message_id,
        "target_message": target.get_message(),
        "generation_params": session_generation_params(ctx.service, found.data),
    }
