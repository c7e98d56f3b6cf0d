"""Who a request belongs to, for fair admission: the key that puts it in its user's own line.

A user is, in this order (docs/api.md, "Fair queueing"):

1. the browser session the request carries (an existing session, from its cookie; the OpenAI API ignores sessions);
2. the API key in ``Authorization: Bearer <key>`` (every client of one key is one user);
3. the agent role whose pass phrase is in ``X-ChatStream-Auth-Header``;
4. the client's address (behind a proxy: the address uvicorn reports, set from trusted forwarded headers).

A request without a cookie gets a new session, so a client that keeps no cookies would be a new user every time:
new sessions therefore count by address. Keys are hashed; no secret is kept in the key.
"""

from __future__ import annotations

import hashlib
import re

from starlette.requests import HTTPConnection

from chatstream.server.access import ClientRoles
from chatstream.server.http import QUEUE_TICKET_HEADER
from chatstream.sessions.lookup import find_session

_TICKET_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def user_key(request: HTTPConnection, roles: ClientRoles, *, as_agent: bool = False) -> str:
    """The fairness key of ``request`` (see the module docstring); ``as_agent`` ignores the session."""
    if not as_agent:
        session_id = _existing_session_id(request)
        if session_id is not None:
            return "session:" + _digest(session_id)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + _digest(token.strip())
    role = roles.resolve(request, as_agent=True)
    if role.auth_method.is_header_phrase:
        return "role:" + role.name
    client = request.client
    return "address:" + (client.host if client is not None else "unknown")


def queue_ticket_id(request: HTTPConnection) -> str | None:
    """The client's id for this request's place in line (``X-ChatStream-Queue-Ticket``: 8-64 characters of
    letters, digits, ``-`` and ``_``), or None."""
    value = request.headers.get(QUEUE_TICKET_HEADER)
    return value if value is not None and _TICKET_ID.match(value) else None


def _existing_session_id(request: HTTPConnection) -> str | None:
    found = find_session(request, materialize=False)
    if found is None or getattr(found.manager, "is_new", False):
        return None
    try:
        return found.session_id
    except Exception:  # a foreign session manager that cannot tell
        return None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:24]
