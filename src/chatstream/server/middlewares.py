"""``append_middlewares``: the session middleware, the client-role middleware and (only when asked) CORS.

Order matters: Starlette runs the middleware added last first, so CORS (outermost) answers preflights, then the
session middleware attaches ``request.state.session``, then the role middleware resolves the caller's role.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream.i18n import message
from chatstream.server.access import ClientRoles
from chatstream.server.context import ServerContext
from chatstream.server.http import DEV_TOOL_HEADER, MESSAGE_ID_HEADER, SKIP_SESSION_HEADER
from chatstream.sessions.turns import CONVERSATION_ID_HEADER

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

ROLE_STATE_KEY = "chatstream_client_role"
"""``request.state`` attribute holding the resolved role's name (set by :class:`ClientRoleMiddleware`)."""

_OPTION_KEYS = frozenset({"session", "fast_session", "cors", "develop_mode"})
_SESSION_KEYS = frozenset(
    {"secret_key", "store", "same_site", "secure", "http_only", "max_age", "session_cookie", "skip_session_header"}
)


class ClientRoleMiddleware:
    """Resolves each request's client role once (header-phrase agents are promoted here, per request), records
    its name in ``request.state.chatstream_client_role`` and, for roles with ``enable_dev_tool``, adds
    ``X-ChatStream-API-DevTool-Enabled: enabled`` to the response so that the web UI keeps its tools after a reload.
    """

    def __init__(self, app: ASGIApp, roles: ClientRoles) -> None:
        self.app = app
        self.roles = roles

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        role = self.roles.resolve(HTTPConnection(scope))
        scope.setdefault("state", {})[ROLE_STATE_KEY] = role.name
        if not role.enable_dev_tool:
            await self.app(scope, receive, send)
            return

        async def send_with_dev_tool(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = MutableHeaders(scope=msg)
                if DEV_TOOL_HEADER not in headers:
                    headers.append(DEV_TOOL_HEADER, "enabled")
            await send(msg)

        await self.app(scope, receive, send_with_dev_tool)


def append_middlewares(ctx: ServerContext, app: FastAPI, opts: Mapping[str, Any] | None = None) -> None:
    """Add the middlewares ChatStream's APIs need.

    Options (all optional):
        session (or the original's ``fast_session``): ``secret_key`` (default: a random per-process secret, with a
            warning), ``store`` (default: the ChatStream's store, so that sessions live beside the conversations),
            ``secure`` (default True), ``http_only`` (default True), ``same_site``, ``max_age``,
            ``session_cookie``; ``False`` adds no session middleware (bring your own).
        cors: ``{"allow_origins": [...], "allow_credentials": bool}``; CORS is added only with this key or
            ``develop_mode``.
        develop_mode: True allows CORS from every origin (logged as a warning).
    """
    opts = dict(opts or {})
    for key in set(opts) - _OPTION_KEYS:
        logger.warning("append_middlewares: unknown option %r ignored", key)
    app.add_middleware(ClientRoleMiddleware, roles=ctx.roles)
    session_opts = opts.get("session", opts.get("fast_session"))
    if session_opts is not False:
        _add_session_middleware(ctx, app, session_opts or {})
    cors = _cors_options(ctx.service.locale, opts)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)


def _add_session_middleware(ctx: ServerContext, app: FastAPI, session_opts: Mapping[str, Any]) -> None:
    from chatstream.sessions.middleware import SessionMiddleware

    locale = ctx.service.locale
    if not isinstance(session_opts, Mapping):
        raise ValueError(f"append_middlewares option 'session' must be a dict or False, got {session_opts!r}")
    unknown = set(session_opts) - _SESSION_KEYS
    if unknown:
        raise ValueError(
            f"append_middlewares: unknown session option(s) {sorted(unknown)}; known: {sorted(_SESSION_KEYS)}"
        )
    kwargs = dict(session_opts)
    kwargs["store"] = _session_store(ctx, kwargs.get("store"))
    if not kwargs.get("secret_key"):
        kwargs["secret_key"] = secrets.token_urlsafe(32)
        logger.warning(message("session_secret_generated", locale))
    kwargs.setdefault("secure", True)
    kwargs.setdefault("http_only", True)
    kwargs.setdefault("skip_session_header", dict(SKIP_SESSION_HEADER))
    app.add_middleware(SessionMiddleware, **kwargs)
    logger.debug(
        "session middleware added (secure=%s http_only=%s same_site=%s)",
        kwargs["secure"],
        kwargs["http_only"],
        kwargs.get("same_site"),
    )


def _session_store(ctx: ServerContext, store: Any) -> Any:
    """The session store of the middleware: ChatStream's own store (its ``store=``) unless another is given, a
    chatstream store as is, a fastsession store through its adapter."""
    from chatstream.sessions.base import AsyncSessionStore, Store
    from chatstream.sessions.store import FastSessionStoreAdapter, SessionStore

    if store is None:
        return ctx.conversations.store
    if isinstance(store, Store | AsyncSessionStore | SessionStore):
        return store
    if all(callable(getattr(store, name, None)) for name in ("create_store", "get_store", "save_store")):
        return FastSessionStoreAdapter(store)
    raise ValueError(
        f"append_middlewares session option 'store' must be a chatstream store (open_store(url)) or a fastsession "
        f"store, got {type(store).__name__}"
    )


def _cors_options(locale: str, opts: Mapping[str, Any]) -> dict[str, Any] | None:
    cors = opts.get("cors")
    develop_mode = opts.get("develop_mode", False)
    if not isinstance(develop_mode, bool):
        raise ValueError(f"append_middlewares option 'develop_mode' must be true or false, got {develop_mode!r}")
    if cors is None and not develop_mode:
        return None
    cors = dict(cors or {})
    origins = cors.get("allow_origins", ["*"])
    if isinstance(origins, str) or not all(isinstance(o, str) for o in origins):
        raise ValueError(f"cors 'allow_origins' must be a list of origins, got {origins!r}")
    if "*" in origins:
        logger.warning(message("cors_all_origins", locale))
    else:
        logger.info(message("cors_enabled", locale), ", ".join(origins))
    return {
        "allow_origins": list(origins),
        "allow_credentials": bool(cors.get("allow_credentials", True)),
        "allow_methods": list(cors.get("allow_methods", ["*"])),
        "allow_headers": list(cors.get("allow_headers", ["*"])),
        "expose_headers": [MESSAGE_ID_HEADER, DEV_TOOL_HEADER, CONVERSATION_ID_HEADER],
    }
