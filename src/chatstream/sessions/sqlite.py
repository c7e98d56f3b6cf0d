"""The SQLite store: sessions and conversations in one file, for one machine (several processes may share it).

The connection, WAL and locking: :mod:`.sqlite_db`; tables and migrations: :mod:`.sqlite_schema`; conversation
queries: :mod:`.sqlite_conversations`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from chatstream.sessions.base import (
    DEFAULT_SESSION_TTL,
    AsyncSessionStore,
    SessionData,
    Store,
    decode_session,
    encode_session,
)
from chatstream.sessions.sqlite_conversations import SQLiteConversationStore
from chatstream.sessions.sqlite_db import SQLiteDatabase

logger = logging.getLogger(__name__)

__all__ = ["SQLiteSessionStore", "SQLiteStore"]


class SQLiteSessionStore(AsyncSessionStore):
    """Sessions as JSON text in the ``sessions`` table, expiring ``ttl_seconds`` after their last use.

    The expiry is pushed back by a read only when less than half of it is left, so most reads write nothing.
    """

    def __init__(self, db: SQLiteDatabase, ttl_seconds: float | None, clock: Callable[[], float]) -> None:
        self._db = db
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    async def get(self, session_id: str) -> SessionData | None:
        now = self._clock()
        async with self._db.connection() as conn:
            rows = list(
                await conn.execute_fetchall("SELECT data, expires_at FROM sessions WHERE id = ?", (session_id,))
            )
            if not rows or (rows[0][1] is not None and rows[0][1] <= now):
                return None
            if self.ttl_seconds is not None and rows[0][1] is not None and rows[0][1] - now < self.ttl_seconds / 2:
                await conn.execute(
                    "UPDATE sessions SET expires_at = ? WHERE id = ?", (now + self.ttl_seconds, session_id)
                )
        return decode_session(rows[0][0], session_id)

    async def save(self, session_id: str, data: SessionData) -> None:
        text = encode_session(session_id, data)
        expires_at = self._clock() + self.ttl_seconds if self.ttl_seconds is not None else None
        async with self._db.connection() as conn:
            await conn.execute(
                "INSERT INTO sessions (id, data, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
                (session_id, text, expires_at),
            )

    async def delete(self, session_id: str) -> None:
        async with self._db.connection() as conn:
            await conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


class SQLiteStore(Store):
    """Sessions and conversations in one SQLite file (created, with its directory, on first use).

    Args:
        path: the database file.
        session_ttl: seconds a session lives after its last use; None: forever.
        synchronous: ``"normal"`` (survives a killed process) or ``"full"`` (also a power cut).
        busy_timeout_ms: how long a write waits for another process's write before failing.
        clock: Unix time in seconds; tests pass a fake one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        session_ttl: float | None = DEFAULT_SESSION_TTL,
        synchronous: str = "normal",
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if session_ttl is not None and not session_ttl > 0:
            raise ValueError(f"session_ttl must be positive or None, got {session_ttl!r}")
        self.path = Path(path).expanduser()
        self.db = SQLiteDatabase(self.path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
        self.sessions: SQLiteSessionStore = SQLiteSessionStore(self.db, session_ttl, clock)
        self.conversations: SQLiteConversationStore = SQLiteConversationStore(self.db, clock)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    def describe(self) -> str:
        return f"SQLite file {self.path}"

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
