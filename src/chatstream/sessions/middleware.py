"""SessionMiddleware: server-side sessions behind a signed session-id cookie, as a pure ASGI middleware.

Only the session id travels in the cookie (signed with ``itsdangerous``); the data stays in a store: any
:class:`~chatstream.sessions.base.Store` (memory, SQLite, Redis; see :func:`~chatstream.sessions.urls.open_store`),
or a synchronous in-memory :class:`~chatstream.sessions.store.SessionStore`. The session object at
``request.state.session`` offers the same methods as fastsession's ``FastSession`` (``get_session``,
``save_session``, ``clear_session``, ``get_session_id``), so handlers written for ``fastsession.FastSessionMiddleware``
work with either, plus ``await commit()``.

Being plain ASGI (not ``BaseHTTPMiddleware``), it passes response messages straight through: a streaming response
reaches the client chunk by chunk, and client disconnects reach the application unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream.sessions.base import AsyncSessionStore, SessionData, Store, encode_session
from chatstream.sessions.errors import CorruptRecord
from chatstream.sessions.store import MemoryStore, SessionStore, as_session_store

logger = logging.getLogger(__name__)

__all__ = ["HttpSession", "SessionMiddleware", "commit_session", "save_session", "session_skipped"]

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


async def commit_session(session_mgr: Any) -> None:
    """Save a session and write it now: ``save_session()``, then ``await commit()`` on ours (fastsession's
    ``save_session()`` already writes, synchronously, to its memory store)."""
    save_session(session_mgr)
    commit = getattr(session_mgr, "commit", None)
    if callable(commit):
        await commit()


def session_skipped(conn: HTTPConnection) -> bool:
    """True when the request deliberately has no session (an agent that sent the skip header), as opposed to an app
    that has no session middleware at all. fastsession marks nothing, so its conventional header counts too."""
    state = conn.scope.get("state") or {}
    return bool(state.get(SESSION_SKIPPED_STATE)) or FASTSESSION_SKIP_HEADER in conn.headers


class HttpSession:
    """One request's view of its session (fastsession's ``FastSession`` interface, plus :meth:`commit`).

    The methods are synchronous, as fastsession's are: :meth:`save_session` only marks the session for writing, and
    the middleware writes it (see :class:`SessionMiddleware` for when). A handler that must know the write is done
    before it goes on (before streaming, say) awaits :meth:`commit`.

    A new session is created lazily: only when the application touches it (any of the four methods) is it written
    and the cookie sent, so requests that never use the session (static files, health checks) leave no trace.
    """

    def __init__(self, sessions: AsyncSessionStore, session_id: str, data: SessionData | None) -> None:
        self._sessions = sessions
        self._session_id = session_id
        self._data = data
        self.is_new = data is None
        self.touched = False
        self._dirty = False
        # Serialising stores: a change made without save_session() is still noticed (fastsession's dicts were live).
        self._snapshot = None if sessions.live_objects or data is None else _fingerprint(session_id, data)

    @property
    def keeps_objects(self) -> bool:
        """True when the store keeps the dict itself (any Python object may be in it), False when it keeps JSON."""
        return self._sessions.live_objects

    def get_session(self) -> SessionData:
        """The user's session dict; with a memory store, changes are visible to the user's next requests at once."""
        return self._materialize()

    def save_session(self) -> None:
        """Mark the session for writing; the middleware writes it before the response starts or ends."""
        self._materialize()
        self._dirty = True

    def clear_session(self) -> None:
        """Empty the session dict (the session id stays)."""
        self._materialize().clear()
        self._dirty = True

    def get_session_id(self) -> str:
        """The session id (the value the cookie carries, signed)."""
        self._materialize()
        return self._session_id

    def needs_write(self) -> bool:
        """True when the session was saved, created, or (serialising stores) changed since it was last written."""
        if self._data is None:
            return False
        if self._dirty:
            return True
        try:
            return self._snapshot is not None and _fingerprint(self._session_id, self._data) != self._snapshot
        except TypeError:
            return True  # not JSON: the write raises the TypeError that names the key

    async def commit(self) -> None:
        """Write the session now if it needs it (:meth:`needs_write`).

        Raises:
            TypeError: a value is not JSON and the store serialises; StoreError: the store failed.
        """
        if not self.needs_write():
            return
        data = self._require_data()
        self._dirty = False  # changes made while the write is under way mark it dirty again
        try:
            snapshot = None if self._sessions.live_objects else _fingerprint(self._session_id, data)
            await self._sessions.save(self._session_id, data)
        except BaseException:
            self._dirty = True
            raise
        self._snapshot = snapshot

    def _materialize(self) -> SessionData:
        self.touched = True
        if self._data is None:
            self._data = {}
            self._dirty = True
        return self._data

    def _require_data(self) -> SessionData:
        if self._data is None:
            raise RuntimeError("the session has no data yet")
        return self._data


class SessionMiddleware:
    """Give each browser a server-side session at ``request.state.<session_object>``.

    The session is read once, when the request starts. It is written (only if it was saved, created, or, with a
    serialising store, changed) at three points: before ``http.response.start`` is passed on, so that the new
    session exists before its cookie does and a client that has the response's headers also finds the session;
    again before the last body message, for changes made while a streaming body ran (the chat handler saves after
    the answer); and once more after the application returns, for a response cut off by a disconnect or changes
    made by background tasks. A failed write before the response starts fails the request (500); one before the
    last chunk cuts the response off (the client sees an incomplete answer, not a false success); the last one can
    only be logged.

    Args:
        app: the ASGI application to wrap.
        secret_key: key that signs the session-id cookie (keep it secret and stable across restarts).
        store: where session data lives: a :class:`~chatstream.sessions.base.Store` (its ``sessions``), an
            :class:`~chatstream.sessions.base.AsyncSessionStore` or a synchronous in-memory
            :class:`~chatstream.sessions.store.SessionStore`; a new :class:`MemoryStore` per middleware when None.
            The middleware does not open or close it: the application's lifespan does.
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
        store: Store | AsyncSessionStore | SessionStore | None = None,
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
        self.store: Store | AsyncSessionStore | SessionStore = store if store is not None else MemoryStore()
        self.sessions = as_session_store(self.store)
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
        session = await self._load_session(headers)
        scope.setdefault("state", {})[self.session_object] = session
        started = cookie_sent = False

        async def send_with_session(message: Message) -> None:
            nonlocal started, cookie_sent
            if message["type"] == "http.response.start":
                started = True
                if session.touched:
                    await session.commit()
                if session.is_new and session.touched:
                    MutableHeaders(scope=message).append("set-cookie", self._cookie_header(session.get_session_id()))
                    cookie_sent = True
            elif _is_last_body(message) and session.touched and (cookie_sent or not session.is_new):
                await session.commit()
            await send(message)

        try:
            await self.app(scope, receive, send_with_session)
        finally:
            await self._write_after_response(session, started, cookie_sent)

    async def _write_after_response(self, session: HttpSession, started: bool, cookie_sent: bool) -> None:
        if session.is_new and session.touched and not cookie_sent:
            if not started:  # the client left before any response: no cookie, so nobody could find the session
                self._logger.debug("no response was sent; the new session is not stored")
                return
            self._logger.warning(
                "a new session was first used after the response had started, so its cookie was not sent (and the "
                "session was not stored); call request.state.%s.get_session() before returning the response",
                self.session_object,
            )
            return
        if not session.touched or not session.needs_write():
            return
        try:
            await asyncio.shield(session.commit())  # a cancelled request still keeps what it saved
        except Exception:
            self._logger.exception("the session could not be written after the response")

    def _should_skip(self, headers: Headers) -> bool:
        for name, value in self.skip_headers:
            actual = headers.get(name)
            if actual is not None and (value == "*" or actual == value):
                return True
        return False

    async def _load_session(self, headers: Headers) -> HttpSession:
        signed = cookie_parser(headers.get("cookie", "")).get(self.session_cookie)
        session_id = self._verify(signed) if signed else None
        data = None
        if session_id is not None:
            try:
                data = await self.sessions.get(session_id)
            except CorruptRecord as exc:
                self._logger.warning("%s; starting a new session", exc)
        if session_id is None or data is None:
            if signed:
                self._logger.debug("session cookie invalid, expired or unknown to the store; starting a new session")
            return HttpSession(self.sessions, secrets.token_urlsafe(24), None)
        return HttpSession(self.sessions, session_id, data)

    def _verify(self, signed: str) -> str | None:
        try:
            value = self._serializer.loads(signed, max_age=self.max_age or None)
        except BadSignature:  # also covers expired signatures and malformed cookies
            return None
        return value if isinstance(value, str) and value else None

    def _cookie_header(self, session_id: str) -> str:
        return f"{self.session_cookie}={self._serializer.dumps(session_id)}{self._cookie_attributes}"


def _is_last_body(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def _fingerprint(session_id: str, data: SessionData) -> str:
    return encode_session(session_id, data)


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
