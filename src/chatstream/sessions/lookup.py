"""Finding the session of a request: one lookup for every endpoint, whichever middleware made the session.

Both our ``SessionMiddleware`` and fastsession's ``FastSessionMiddleware`` put a manager with ``get_session()`` (the
session dict) and ``save_session()`` at ``request.state.<attribute>`` (default ``session``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection

from chatstream.sessions.middleware import save_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundSession:
    """A request's session: the middleware's manager and the session dict."""

    manager: Any
    data: dict[str, Any]

    def save(self) -> None:
        """Persist the session through its manager."""
        save_session(self.manager)

    @property
    def session_id(self) -> str | None:
        """The session id when the manager tells it."""
        get_id = getattr(self.manager, "get_session_id", None)
        return str(get_id()) if callable(get_id) else None


def find_session(conn: HTTPConnection, attr: str = "session", *, materialize: bool = True) -> FoundSession | None:
    """The request's session, or None when it has none (an agent, no middleware) or it cannot be read.

    Our middleware creates a session lazily, on first use. With ``materialize=False`` such a session is not created
    just to be looked at: an empty dict stands in for it (a role check alone leaves no session behind).
    """
    manager = getattr(conn.state, attr, None)
    if manager is None:
        return None
    if not materialize and getattr(manager, "is_new", False) and not getattr(manager, "touched", True):
        return FoundSession(manager, {})
    try:
        data = manager.get_session()
    except Exception:
        logger.warning("the session could not be read; treating the request as sessionless", exc_info=True)
        return None
    return FoundSession(manager, data) if isinstance(data, dict) else None
