"""SessionMiddleware: server-side sessions behind a signed session-id cookie, as a pure ASGI middleware.

Only the session id travels in the cookie (signed with ``itsdangerous``); the data stays in a
:class:`~chatstream.sessions.store.SessionStore`. The session object at ``request.state.session`` offers the same
methods as fastsession's ``FastSession`` (``get_session``, ``save_session``, ``clear_session``, ``get_session_id``),
so handlers written for ``fastsession.FastSessionMiddleware`` work with either.

Being plain ASGI (not ``BaseHTTPMiddleware``), it passes response messages straight through: a streaming response
reaches the client chunk by chunk, and client disconnects reach the application unchanged.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream.sessions.store import MemoryStore, SessionData, SessionStore

logger = logging.getLogger(__name__)

__all__ = ["HttpSession", "SessionMiddleware"]

_SIGNING_SALT = "chatstream.session"
_SAME_SITE_VALUES = ("lax", "strict", "none")

SkipHeader = Mapping[str, str] | Sequence[Mapping[str, str]]
"""``{"header_name": "X-FastSession-Skip", "header_value": "skip"}`` (``"*"`` matches any value), or a list of them."""


SESSION_SKIPPED_STATE = "chatstream_session_skipped"
"""Set in ``request.state`` when a skip header told the session middleware to give this request no session."""

FASTSESSION_SKIP_HEADER = "x-fastsession-skip"


def save_session(session_mgr: Any) -> None:
    """Persist a session through whichever manager holds it (ours or fastsession's); a manager without
    ``save_session`` keeps its dict live and needs nothing."""
    save = getattr(session_mgr, "save_session", None)
    if callable(save):
        save()


def session_skipped(conn: HTTPConnection) -> bool:
    """True when the request deliberately has no session (an agent that sent the skip header), as opposed to an app
    that has no session middleware at all. fastsession marks nothing, so its conventional header counts too."""
    state = conn.scope.get("state") or {}
    return bool(state.get(SESSION_SKIPPED_STATE)) or FASTSESSION_SKIP_HEADER in conn.headers


class HttpSession:
    """One request's view of its session (fastsession's ``FastSession`` interface).

    A new session is created lazily: only when the application touches it (any of the four methods) is it saved to
    the store and the cookie sent, so requests that never use the session (static files, health checks) leave no
    trace.
    """

    def __init__(self, store: SessionStore, session_id: str, data: SessionData | None) -> None:
        self._store = store
        self._session_id = session_id
        self._data = data
        self.is_new = data is None
        self.touched = False

    def get_session(self) -> SessionData:
        """The user's session dict; with a memory store, changes are visible to the user's next requests at once."""
        return self._materialize()

    def save_session(self) -> None:
        """Write the session to the store (needed for stores that serialise; harmless for the memory store)."""
        self._store.save(self._session_id, self._materialize())

    def clear_session(self) -> None:
        """Empty the session dict (the session id stays)."""
        self._materialize().clear()
        self.save_session()

    def get_session_id(self) -> str:
        """The session id (also a stable id for the user's conversation)."""
        self._materialize()
        return self._session_id

    def _materialize(self) -> SessionData:
        self.touched = True
        if self._data is None:
            created: SessionData = {}
            self._store.save(self._session_id, created)
            stored = self._store.get(self._session_id)  # a store may keep its own dict (fastsession's do)
            self._data = stored if stored is not None else created
        return self._data


class SessionMiddleware:
    """Give each browser a server-side session at ``request.state.<session_object>``.

    Args:
        app: the ASGI application to wrap.
        secret_key: key that signs the session-id cookie (keep it secret and stable across restarts).
        store: where session data lives; a new :class:`MemoryStore` per middleware when None.
        http_only: the cookie is invisible to JavaScript.
        secure: the cookie is sent over HTTPS only (browsers treat http://localhost as secure).
        same_site: ``"lax"``, ``"strict"``, ``"none"`` or None (no attribute).
        max_age: seconds; > 0 makes the cookie persistent for that long and the signature expire after it,
            0 gives a browser-session cookie whose signature never expires (data still expires in the store).
        session_cookie: the cookie's name.
        session_object: the attribute name under ``request.state``.
        skip_session_header: requests carrying this header (see :data:`SkipHeader`) get no session at all.
        cookie_path: the cookie's Path attribute.
        logger: accepted for fastsession compatibility; this module logs through ``logging`` when None.
    """

    def __init__(
        self,
        app: ASGIApp,
        secret_key: str,
        store: SessionStore | None = None,
        http_only: bool = True,
        secure: bool = True,
        same_site: str | None = "lax",
        max_age: int = 0,
        session_cookie: str = "sid",
        session_object: str = "session",
        skip_session_header: SkipHeader | None = None,
        cookie_path: str = "/",
        logger: logging.Logger | None = None,
    ) -> None:
        if not secret_key:
            raise ValueError("secret_key must be a non-empty string")
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age!r}")
        if same_site is not None and same_site.lower() not in _SAME_SITE_VALUES:
            raise ValueError(f"same_site must be one of {_SAME_SITE_VALUES} or None, got {same_site!r}")
        self.app = app
        self.store: SessionStore = store if store is not None else MemoryStore()
        self.max_age = max_age
        self.session_cookie = session_cookie
        self.session_object = session_object
        self.skip_headers = _normalize_skip_header(skip_session_header)
        self._serializer = URLSafeTimedSerializer(secret_key, salt=_SIGNING_SALT)
        self._cookie_attributes = _cookie_attributes(cookie_path, max_age, http_only, secure, same_site)
        self._logger = logger if logger is not None else logging.getLogger(__name__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self._should_skip(headers):
            scope.setdefault("state", {})[SESSION_SKIPPED_STATE] = True
            await self.app(scope, receive, send)
            return
        session = self._load_session(headers)
        scope.setdefault("state", {})[self.session_object] = session
        cookie_sent = False

        async def send_with_cookie(message: Message) -> None:
            nonlocal cookie_sent
            if message["type"] == "http.response.start" and session.is_new and session.touched:
                MutableHeaders(scope=message).append("set-cookie", self._cookie_header(session.get_session_id()))
                cookie_sent = True
            await send(message)

        await self.app(scope, receive, send_with_cookie)
        if session.is_new and session.touched and not cookie_sent:
            self._logger.warning(
                "a new session was first used after the response had started, so its cookie was not sent; "
                "call request.state.%s.get_session() before returning the response",
                self.session_object,
            )

    def _should_skip(self, headers: Headers) -> bool:
        for name, value in self.skip_headers:
            actual = headers.get(name)
            if actual is not None and (value == "*" or actual == value):
                return True
        return False

    def _load_session(self, headers: Headers) -> HttpSession:
        signed = cookie_parser(headers.get("cookie", "")).get(self.session_cookie)
        session_id = self._verify(signed) if signed else None
        data = self.store.get(session_id) if session_id else None
        if session_id is None or data is None:
            if signed:
                self._logger.debug("session cookie invalid, expired or unknown to the store; starting a new session")
            return HttpSession(self.store, secrets.token_urlsafe(24), None)
        return HttpSession(self.store, session_id, data)

    def _verify(self, signed: str) -> str | None:
        try:
            value = self._serializer.loads(signed, max_age=self.max_age or None)
        except BadSignature:  # also covers expired signatures and malformed cookies
            return None
        return value if isinstance(value, str) and value else None

    def _cookie_header(self, session_id: str) -> str:
        return f"{self.session_cookie}={self._serializer.dumps(session_id)}{self._cookie_attributes}"


def _normalize_skip_header(skip: SkipHeader | None) -> list[tuple[str, str]]:
    if skip is None:
        return []
    entries = [skip] if isinstance(skip, Mapping) else list(skip)
    pairs = []
    for index, entry in enumerate(entries):
        name, value = entry.get("header_name"), entry.get("header_value")
        if not name or value is None:
            raise ValueError(f"skip_session_header[{index}] needs 'header_name' and 'header_value', got {entry!r}")
        pairs.append((name, value))
    return pairs


def _cookie_attributes(path: str, max_age: int, http_only: bool, secure: bool, same_site: str | None) -> str:
    parts = [f"; Path={path}"]
    if max_age > 0:
        parts.append(f"; Max-Age={max_age}")
    if http_only:
        parts.append("; HttpOnly")
    if secure:
        parts.append("; Secure")
    if same_site:
        parts.append(f"; SameSite={same_site.capitalize()}")
    return "".join(parts)
