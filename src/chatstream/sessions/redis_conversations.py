"""Conversation records in Redis: a hash and a message list per conversation, a sorted set per owner.

Writes are the Lua scripts of :mod:`.redis_scripts` (atomic on the server, version check included); reads are a
``MULTI``/``EXEC`` pipeline. Key names: :mod:`.redis_keys`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from chatstream.sessions.base import DEFAULT_PAGE_SIZE, ConversationStore, check_page_size
from chatstream.sessions.errors import Conflict, ConversationNotFound, CorruptRecord, ForeignRecord
from chatstream.sessions.records import (
    RECORD_SCHEMA_VERSION,
    Conversation,
    ConversationPage,
    ConversationSummary,
    Message,
    RecordFields,
    clean_title,
    conversation_from_fields,
    decode_json,
    encode_json,
    message_from_json,
    message_to_json,
    title_from_messages,
)
from chatstream.sessions.redis_keys import RedisKeys, translated_errors, whole_seconds
from chatstream.sessions.redis_scripts import BUMP, CREATE, DELETE, RENAME
from chatstream.sessions.retention import RetentionPolicy, expired_ids

logger = logging.getLogger(__name__)

__all__ = ["RedisConversationStore"]

_SUMMARY_FIELDS = ("owner", "title", "created_at", "updated_at", "version", "message_count")


class RedisConversationStore(ConversationStore):
    """Conversations in Redis (see :class:`ConversationStore` for the contract, :mod:`.redis_keys` for the keys)."""

    def __init__(
        self, client: aioredis.Redis, keys: RedisKeys, ttl: float | None, clock: Callable[[], float], where: str
    ) -> None:
        # Any: redis-py's annotations cannot express that decode_responses=True makes every reply a str.
        self._client: Any = client
        self._keys = keys
        self._ttl = "0" if ttl is None else str(whole_seconds(ttl))
        self._clock = clock
        self._where = where
        self._create = client.register_script(CREATE)
        self._bump = client.register_script(BUMP)
        self._rename = client.register_script(RENAME)
        self._delete = client.register_script(DELETE)

    async def create(self, conversation: Conversation) -> Conversation:
        title = conversation.derived_title()
        fields = _meta_fields(conversation, title)
        args: list[str | int] = [self._ttl, conversation.id, repr(conversation.updated_at), len(fields) // 2, *fields]
        args += [encode_json(message_to_json(m)) for m in conversation.messages]
        keys = self._keys.conversation(conversation.owner, conversation.id)
        async with translated_errors(self._where, conversation.id):
            created = await self._create(keys=keys, args=args)
        if not created:
            raise Conflict(conversation.id, None, None)
        return dataclasses.replace(conversation, title=title, version=1)

    async def get(self, owner: str, conversation_id: str) -> Conversation:
        async with translated_errors(self._where, conversation_id), self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._keys.meta(conversation_id))
            pipe.lrange(self._keys.messages(conversation_id), 0, -1)
            meta, raw_messages = await pipe.execute()
        if not meta or meta.get("owner") != owner:
            raise ConversationNotFound(conversation_id)
        return _conversation_from_redis(conversation_id, meta, raw_messages)

    async def list_recent(
        self, owner: str, *, limit: int = DEFAULT_PAGE_SIZE, after: str | None = None
    ) -> ConversationPage:
        check_page_size(limit)
        index = self._keys.index(owner)
        async with translated_errors(self._where, index):
            start = 0
            if after is not None:
                rank = await self._client.zrevrank(index, after)
                if rank is None:
                    raise ConversationNotFound(after)
                start = rank + 1
            items, stale = await self._collect(index, start, limit + 1)
            if stale:  # index entries of conversations that expired
                await self._client.zrem(index, *stale)
        return ConversationPage(items[:limit], has_more=len(items) > limit)

    async def append_messages(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[Message],
        *,
        expected_version: int | None = None,
    ) -> ConversationSummary:
        now = self._clock()
        expected = "" if expected_version is None else str(expected_version)
        args = [owner, expected, repr(now), title_from_messages(messages), self._ttl, conversation_id, "0", "", ""]
        args += [encode_json(message_to_json(m)) for m in messages]
        _, title, version, count, created_at = await self._run_bump(owner, conversation_id, args, expected_version)
        return ConversationSummary(conversation_id, owner, title, float(created_at), now, int(version), int(count))

    async def update(self, conversation: Conversation) -> Conversation:
        now = self._clock()
        args = [conversation.owner, str(conversation.version), repr(now), title_from_messages(conversation.messages)]
        args += [self._ttl, conversation.id, "1", conversation.prompt_class, encode_json(conversation.prompt_settings)]
        args += [encode_json(message_to_json(m)) for m in conversation.messages]
        _, title, version, _, _ = await self._run_bump(conversation.owner, conversation.id, args, conversation.version)
        return dataclasses.replace(conversation, title=title, updated_at=now, version=int(version))

    async def rename(self, owner: str, conversation_id: str, title: str) -> ConversationSummary:
        title = clean_title(title)
        if not title:
            title = title_from_messages((await self.get(owner, conversation_id)).messages)
        keys = self._keys.conversation(owner, conversation_id)
        async with translated_errors(self._where, conversation_id):
            flat = await self._rename(keys=keys, args=[owner, title, self._ttl])
        if not flat:
            raise ConversationNotFound(conversation_id)
        return _summary(conversation_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    async def delete(self, owner: str, conversation_id: str) -> None:
        keys = self._keys.conversation(owner, conversation_id)
        async with translated_errors(self._where, conversation_id):
            deleted = await self._delete(keys=keys, args=[owner, conversation_id, "0"])
        if not deleted:
            raise ConversationNotFound(conversation_id)

    async def delete_owner(self, owner: str) -> int:
        index = self._keys.index(owner)
        deleted = 0
        async with translated_errors(self._where, index):
            while ids := await self._client.zrange(index, 0, 499):
                deleted += await self._delete_many(owner, ids)
        return deleted

    async def sweep(self, policy: RetentionPolicy, *, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        deleted = 0
        async with translated_errors(self._where):
            async for index in self._client.scan_iter(match=self._keys.index_pattern(), count=500):
                owner = self._keys.owner_of_index(index)
                recent = await self._live_entries(index)
                if not policy.keeps_everything:
                    deleted += await self._delete_many(owner, expired_ids(recent, policy, now))
        return deleted

    async def _run_bump(self, owner: str, conversation_id: str, args: list[Any], expected: int | None) -> list[str]:
        keys = self._keys.conversation(owner, conversation_id)
        async with translated_errors(self._where, conversation_id):
            result = await self._bump(keys=keys, args=args)
        if result[0] == "missing":
            raise ConversationNotFound(conversation_id)
        if result[0] == "conflict":
            raise Conflict(conversation_id, expected, int(result[1]))
        if result[0] != "ok":
            raise CorruptRecord(conversation_id, str(result[1]))
        return list(result)

    async def _collect(self, index: str, start: int, wanted: int) -> tuple[list[ConversationSummary], list[str]]:
        """Up to ``wanted`` summaries from rank ``start`` on, skipping (and returning) ids whose record expired."""
        items: list[ConversationSummary] = []
        stale: list[str] = []
        while len(items) < wanted:
            ids = await self._client.zrevrange(index, start, start + wanted - 1)
            if not ids:
                break
            async with self._client.pipeline(transaction=False) as pipe:
                for conversation_id in ids:
                    pipe.hmget(self._keys.meta(conversation_id), _SUMMARY_FIELDS)
                rows = await pipe.execute(raise_on_error=False)
            for conversation_id, values in zip(ids, rows, strict=True):
                if not isinstance(values, Exception) and values[0] is None:
                    stale.append(conversation_id)
                    continue
                try:
                    items.append(_listed_summary(conversation_id, values))
                except CorruptRecord as exc:  # skipped (logged) rather than failing the owner's whole list
                    logger.warning("conversation list: %s", exc)
            start += len(ids)
        return items[:wanted], stale

    async def _live_entries(self, index: str) -> list[tuple[str, float]]:
        """The ``(id, updated_at)`` entries of an owner index, after removing those whose record expired."""
        entries = await self._client.zrange(index, 0, -1, withscores=True)
        async with self._client.pipeline(transaction=False) as pipe:
            for conversation_id, _ in entries:
                pipe.exists(self._keys.meta(conversation_id))
            exists = await pipe.execute()
        stale = [conversation_id for (conversation_id, _), found in zip(entries, exists, strict=True) if not found]
        if stale:
            await self._client.zrem(index, *stale)
        return [
            (conversation_id, score) for (conversation_id, score), found in zip(entries, exists, strict=True) if found
        ]

    async def _delete_many(self, owner: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        async with self._client.pipeline(transaction=False) as pipe:
            for conversation_id in ids:
                keys = self._keys.conversation(owner, conversation_id)
                await self._delete(keys=keys, args=[owner, conversation_id, "1"], client=pipe)
            results = await pipe.execute()
        return sum(1 for result in results if result)


def _meta_fields(conversation: Conversation, title: str) -> list[str]:
    return [
        "owner", conversation.owner,
        "title", title,
        "created_at", repr(conversation.created_at),
        "updated_at", repr(conversation.updated_at),
        "version", "1",
        "message_count", str(len(conversation.messages)),
        "prompt_class", conversation.prompt_class,
        "prompt_settings", encode_json(conversation.prompt_settings),
        "schema_version", str(RECORD_SCHEMA_VERSION),
    ]  # fmt: skip


def _parsed(conversation_id: str, meta: Mapping[str, str | None]) -> dict[str, Any]:
    """The hash's fields with numbers as numbers; a field that does not parse → CorruptRecord."""
    data: dict[str, Any] = dict(meta)
    for name, kind in (("created_at", float), ("updated_at", float), ("version", int), ("message_count", int)):
        try:
            data[name] = kind(meta.get(name) or "")
        except ValueError:
            raise CorruptRecord(conversation_id, f"field {name!r} is {meta.get(name)!r:.40}, not a number") from None
    data["id"] = conversation_id
    return data


def _listed_summary(conversation_id: str, values: list[str | None] | Exception) -> ConversationSummary:
    if isinstance(values, Exception):
        raise CorruptRecord(conversation_id, f"unexpected data in Redis ({values})")
    return _summary(conversation_id, dict(zip(_SUMMARY_FIELDS, values, strict=True)))


def _summary(conversation_id: str, meta: dict[str, str | None]) -> ConversationSummary:
    fields = RecordFields(_parsed(conversation_id, meta), conversation_id, "conversation")
    return ConversationSummary(
        id=conversation_id,
        owner=fields.required("owner", str),
        title=fields.required("title", str),
        created_at=fields.number("created_at"),
        updated_at=fields.number("updated_at"),
        version=fields.integer("version"),
        message_count=fields.integer("message_count"),
    )


def _conversation_from_redis(conversation_id: str, meta: dict[str, str], raw_messages: list[str]) -> Conversation:
    data = _parsed(conversation_id, meta)
    schema = meta.get("schema_version", "")
    if not schema.isdigit() or int(schema) > RECORD_SCHEMA_VERSION:
        raise ForeignRecord(conversation_id, f"record schema version {schema!r} is not one this ChatStream reads")
    data["prompt_settings"] = decode_json(meta.get("prompt_settings", ""), conversation_id)
    messages = [message_from_json(decode_json(text, conversation_id), conversation_id) for text in raw_messages]
    if data["message_count"] != len(messages):
        raise CorruptRecord(conversation_id, f"message_count {data['message_count']} but {len(messages)} messages")
    return conversation_from_fields(RecordFields(data, conversation_id, "conversation"), messages)
