"""The in-memory store, and the synchronous session interface that came before the async stores.

:class:`MemoryStore` is today's behaviour: sessions as live Python objects in this process (a conversation's prompt
object stays an object, nothing is serialised), with an idle timeout and a bounded size, and conversation records in
memory. It is a :class:`~chatstream.sessions.base.Store` (``store.sessions``, ``store.conversations``) and keeps its
synchronous :class:`SessionStore` methods (``get`` / ``save`` / ``delete``) for code written against them.

:class:`SessionStore` is that synchronous interface; :func:`as_session_store` wraps any session store the middleware
is given into the async one.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatstream.sessions.base import AsyncSessionStore, SessionData, Store
from chatstream.sessions.memory import MemoryConversationStore

logger = logging.getLogger(__name__)

__all__ = [
    "FastSessionStoreAdapter",
    "LegacySessionStore",
    "MemoryStore",
    "SessionData",
    "SessionStore",
    "as_session_store",
]


class SessionStore(ABC):
    """The synchronous session interface (in-memory stores only: a blocking call would stall the event loop).

    The middleware calls :meth:`get` once per request and :meth:`save` when the session was created or saved. An
    in-memory store may return the live dict. Stores that do I/O implement
    :class:`~chatstream.sessions.base.AsyncSessionStore` instead.
    """

    @abstractmethod
    def get(self, session_id: str) -> SessionData | None:
        """The session's data, or None when it does not exist or has expired."""

    @abstractmethod
    def save(self, session_id: str, data: SessionData) -> None:
        """Create or replace the session's data (and restart its expiry clock)."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget the session; unknown ids are ignored."""


@dataclass
class _Entry:
    data: SessionData
    expires_at: float


class MemoryStore(SessionStore, Store):
    """Sessions as live Python objects in this process, least recently used first out; conversations in memory.

    Args:
        ttl_seconds: idle timeout; a session not read or saved for this long is gone. None keeps sessions until they
            are evicted.
        max_sessions: upper bound on the number of sessions; beyond it the least recently used one is dropped.
        clock: the time source of session expiry (seconds, monotonic); tests pass a fake one.
        wall_clock: the time source of conversation times (Unix seconds).

    Sessions are thread-safe (a lock guards every operation, so the store can be shared with threads outside the
    event loop); conversations are for the event loop only. Everything is lost when the process ends.
    """

    def __init__(
        self,
        ttl_seconds: float | None = 12 * 3600,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds!r}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions!r}")
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.sessions: AsyncSessionStore = LegacySessionStore(self)
        self.conversations: MemoryConversationStore = MemoryConversationStore(wall_clock)

    async def close(self) -> None:
        """Nothing to release (the data stays until the object is dropped)."""

    def describe(self) -> str:
        return "memory (this process only; lost on restart)"

    def get(self, session_id: str) -> SessionData | None:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                return None
            now = self._clock()
            if entry.expires_at <= now:
                del self._entries[session_id]
                return None
            entry.expires_at = self._expiry(now)
            self._entries.move_to_end(session_id)
            return entry.data

    def save(self, session_id: str, data: SessionData) -> None:
        with self._lock:
            now = self._clock()
            self._entries[session_id] = _Entry(data, self._expiry(now))
            self._entries.move_to_end(session_id)
            self._drop_expired(now)
            while len(self._entries) > self.max_sessions:
                self._entries.popitem(last=False)
                logger.debug("session store full (%d); evicted the least recently used session", self.max_sessions)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)

    def clear(self) -> None:
        """Forget every session."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        """True when the session exists and has not expired (does not count as a use)."""
        with self._lock:
            entry = self._entries.get(session_id) if isinstance(session_id, str) else None
            return entry is not None and entry.expires_at > self._clock()

    def _expiry(self, now: float) -> float:
        return now + self.ttl_seconds if self.ttl_seconds is not None else float("inf")

    def _drop_expired(self, now: float) -> None:
        # Entries are kept in last-use order and every use restarts the same idle timeout, so the expired ones
        # are all at the front.
        while self._entries:
            session_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                return
            del self._entries[session_id]


class FastSessionStoreAdapter(SessionStore):
    """Use a fastsession store (``fastsession.MemoryStore`` or one with the same methods) as a :class:`SessionStore`.

    fastsession's stores hand out one dict per session (``create_store`` / ``get_store``) and persist it with
    ``save_store``; this adapter keeps that dict as the live session data.
    """

    def __init__(self, fastsession_store: Any) -> None:
        for method in ("create_store", "get_store", "save_store"):
            if not callable(getattr(fastsession_store, method, None)):
                raise ValueError(f"{type(fastsession_store).__name__} has no {method}(); not a fastsession store")
        self.fastsession_store = fastsession_store

    def get(self, session_id: str) -> SessionData | None:
        data: SessionData | None = self.fastsession_store.get_store(session_id)
        return data

    def save(self, session_id: str, data: SessionData) -> None:
        target = self.fastsession_store.get_store(session_id)
        if target is None:
            target = self.fastsession_store.create_store(session_id)
        if target is not data:
            target.clear()
            target.update(data)
        self.fastsession_store.save_store(session_id)

    def delete(self, session_id: str) -> None:
        # fastsession has no delete; its MemoryStore keeps sessions in raw_memory_store.
        raw = getattr(self.fastsession_store, "raw_memory_store", None)
        if isinstance(raw, dict):
            raw.pop(session_id, None)
        else:
            data = self.fastsession_store.get_store(session_id)
            if data is not None:
                data.clear()


class LegacySessionStore(AsyncSessionStore):
    """A synchronous :class:`SessionStore` (in memory, with live objects) behind the async interface."""

    live_objects = True

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def get(self, session_id: str) -> SessionData | None:
        return self.store.get(session_id)

    async def save(self, session_id: str, data: SessionData) -> None:
        self.store.save(session_id, data)

    async def delete(self, session_id: str) -> None:
        self.store.delete(session_id)


def as_session_store(store: Store | AsyncSessionStore | SessionStore) -> AsyncSessionStore:
    """The async session interface of whatever the middleware was given: a Store's ``sessions``, an
    :class:`AsyncSessionStore` itself, or a synchronous :class:`SessionStore` wrapped.

    Raises:
        TypeError: none of these.
    """
    if isinstance(store, Store):
        return store.sessions
    if isinstance(store, AsyncSessionStore):
        return store
    if isinstance(store, SessionStore):
        return LegacySessionStore(store)
    raise TypeError(
        f"{type(store).__name__} is not a session store (a chatstream Store from open_store(), an "
        "AsyncSessionStore or a SessionStore); for fastsession's stores use FastSessionStoreAdapter"
    )
