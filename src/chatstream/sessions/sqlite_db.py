"""The SQLite store's connection: one aiosqlite connection per store, opened and migrated on first use.

Every statement runs on aiosqlite's thread, never on the event loop. The file is in WAL mode (readers in other
processes never wait for a writer) with ``synchronous=NORMAL`` by default: a committed write survives the process
being killed; ``"full"`` also survives a power cut, at the price of an fsync per write. Operations of one store take
turns on an asyncio lock, so a transaction never sees another task's statements; processes take turns on SQLite's
own lock (``busy_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from chatstream.sessions.errors import StoreUnavailable
from chatstream.sessions.sqlite_schema import migrate

logger = logging.getLogger(__name__)

__all__ = ["SQLiteDatabase"]

_SYNCHRONOUS = ("normal", "full")


class SQLiteDatabase:
    """One aiosqlite connection to the store's file, opened (and migrated) on first use; a lock serialises use."""

    def __init__(self, path: Path, *, synchronous: str = "normal", busy_timeout_ms: int = 5000) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be >= 0, got {busy_timeout_ms!r}")
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, for statements that need no transaction (each one is atomic by itself)."""
        async with self._lock, _translated_errors(self.path):
            yield await self._connection()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back when the block raises)."""
        async with self._lock, _translated_errors(self.path):
            conn = await self._connection()
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # e.g. cancelled after COMMIT ran: nothing to roll back
                    await conn.execute("ROLLBACK")
                raise

    async def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:  # opened on first use; the caller holds the lock
            self._conn = await self._connect()
        return self._conn

    async def _connect(self) -> aiosqlite.Connection:
        location = str(self.path)
        try:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
            conn = await aiosqlite.connect(location, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open {location}: {exc}") from exc
        try:
            await self._configure(conn)
            await migrate(conn, location)
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"cannot open {location}: {exc}") from exc
            raise
        logger.info("SQLite store at %s (WAL, synchronous=%s)", location, self.synchronous)
        return conn

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        if not rows or str(rows[0][0]).lower() != "wal":
            raise StoreUnavailable(f"{self.path}: WAL mode is not available here (journal_mode={rows!r})")
        await conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        await conn.execute("PRAGMA foreign_keys = ON")


@contextlib.asynccontextmanager
async def _translated_errors(path: Path) -> AsyncIterator[None]:
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
        raise StoreUnavailable(f"{path}: {exc}") from exc
