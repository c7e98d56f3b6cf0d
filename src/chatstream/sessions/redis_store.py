"""The Redis store: sessions and conversations shared by every process and machine that uses the same Redis.

All I/O goes through ``redis.asyncio``. Writes of a conversation are Lua scripts (:mod:`.redis_scripts`), atomic on
the server; reads of a conversation are one ``MULTI``/``EXEC`` round trip. The keys: :mod:`.redis_keys`. Sessions
expire ``session_ttl`` after their last use (``GETEX`` slides the expiry). With ``ttl`` set, a conversation expires
``ttl`` seconds after its last change; the retention sweep adds the per-owner maximum and cleans index entries of
expired conversations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from chatstream.sessions.base import (
    DEFAULT_SESSION_TTL,
    AsyncSessionStore,
    SessionData,
    Store,
    decode_session,
    encode_session,
    redacted_url,
)
from chatstream.sessions.redis_conversations import RedisConversationStore
from chatstream.sessions.redis_keys import RedisKeys, translated_errors, whole_seconds

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PREFIX", "RedisSessionStore", "RedisStore"]

DEFAULT_PREFIX = "chatstream:"


class RedisSessionStore(AsyncSessionStore):
    """Sessions as JSON strings under ``P session:<id>``, expiring ``ttl_seconds`` after their last use."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, ttl_seconds: float | None, where: str) -> None:
        self._client = client
        self._keys = keys
        self.ttl_seconds = ttl_seconds
        self._where = where

    async def get(self, session_id: str) -> SessionData | None:
        key = self._keys.session(session_id)
        async with translated_errors(self._where, f"session:{session_id}"):
            if self.ttl_seconds is None:
                text = await self._client.get(key)
            else:
                text = await self._client.getex(key, ex=whole_seconds(self.ttl_seconds))
        return None if text is None else decode_session(text, session_id)

    async def save(self, session_id: str, data: SessionData) -> None:
        text = encode_session(session_id, data)
        ex = None if self.ttl_seconds is None else whole_seconds(self.ttl_seconds)
        async with translated_errors(self._where):
            await self._client.set(self._keys.session(session_id), text, ex=ex)

    async def delete(self, session_id: str) -> None:
        async with translated_errors(self._where):
            await self._client.delete(self._keys.session(session_id))


class RedisStore(Store):
    """Sessions and conversations in Redis (``redis://`` or ``rediss://``), shared across processes and machines.

    Args:
        url: the Redis URL (``redis://[:password@]host:6379/0``); other query options go to redis-py.
        ttl: seconds a conversation lives after its last change; None: until deleted or swept.
        session_ttl: seconds a session lives after its last use; None: forever.
        prefix: the start of every key, so that several applications can share one Redis database.
        clock: Unix time in seconds; tests pass a fake one.
        client_options: passed to ``redis.asyncio.Redis.from_url`` (e.g. ``socket_timeout``).
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float | None = None,
        session_ttl: float | None = DEFAULT_SESSION_TTL,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("ttl", ttl), ("session_ttl", session_ttl)):
            if value is not None and not value >= 1:
                raise ValueError(f"{name} must be at least 1 second or None, got {value!r}")
        self.url = url
        self.where = redacted_url(url)
        self.client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True, **(client_options or {}))
        keys = RedisKeys(prefix)
        self.sessions: RedisSessionStore = RedisSessionStore(self.client, keys, session_ttl, self.where)
        self.conversations: RedisConversationStore = RedisConversationStore(self.client, keys, ttl, clock, self.where)

    async def open(self) -> None:
        async with translated_errors(self.where):
            await self.client.ping()
        logger.info("Redis store at %s", self.where)

    async def close(self) -> None:
        await self.client.aclose()

    def describe(self) -> str:
        return f"Redis {self.where}"

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r})"
