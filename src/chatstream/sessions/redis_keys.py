"""The Redis store's key names, URL redaction and error translation (shared by its session and conversation parts).

Keys (``P`` = the store's prefix, ``"chatstream:"`` by default):

- ``P session:<session id>``: one session's JSON;
- ``P conv:<id>``: a hash with one conversation's fields (owner, title, created_at, updated_at, version,
  message_count, prompt_class, prompt_settings as JSON, schema_version);
- ``P conv:<id>:messages``: a list of the conversation's messages, one JSON document each, oldest first;
- ``P owner:<owner>``: a sorted set of the owner's conversation ids scored by updated_at.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatstream.sessions.errors import CorruptRecord, StoreUnavailable

__all__ = ["RedisKeys", "translated_errors", "whole_seconds"]


class RedisKeys:
    """The names of the store's keys under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def meta(self, conversation_id: str) -> str:
        return f"{self.prefix}conv:{conversation_id}"

    def messages(self, conversation_id: str) -> str:
        return f"{self.prefix}conv:{conversation_id}:messages"

    def index(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    def conversation(self, owner: str, conversation_id: str) -> list[str]:
        """The KEYS of every script: meta, messages, owner index."""
        return [self.meta(conversation_id), self.messages(conversation_id), self.index(owner)]

    def index_pattern(self) -> str:
        """A SCAN pattern matching every owner index (the prefix's glob characters escaped)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}owner:*"

    def owner_of_index(self, key: str) -> str:
        return key[len(self.index("")) :]


@contextlib.asynccontextmanager
async def translated_errors(where: str, key: str | None = None) -> AsyncIterator[None]:
    """Redis down or slow → StoreUnavailable; a key of the wrong type (``WRONGTYPE``) → CorruptRecord on ``key``."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis at {where}: {exc}") from exc
    except ResponseError as exc:
        if key is not None and ("WRONGTYPE" in str(exc) or "attempt to" in str(exc)):
            raise CorruptRecord(key, f"unexpected data in Redis ({exc})") from exc
        raise


def whole_seconds(seconds: float) -> int:
    return max(1, round(seconds))
