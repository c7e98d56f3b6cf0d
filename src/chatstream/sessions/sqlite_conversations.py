"""Conversation records in SQLite: a ``conversations`` row each, and one ``messages`` row per message.

A version check is part of the ``UPDATE`` that bumps the version (``... WHERE version = ?``), inside a
``BEGIN IMMEDIATE`` transaction with the message writes, so two writers of one conversation, in one process or
several, can never both win. Reads are single statements: each sees one committed state.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite

from chatstream.sessions.base import DEFAULT_PAGE_SIZE, ConversationStore, check_page_size
from chatstream.sessions.errors import Conflict, ConversationNotFound, CorruptRecord
from chatstream.sessions.records import (
    Conversation,
    ConversationPage,
    ConversationSummary,
    Feedback,
    Message,
    RecordFields,
    clean_title,
    conversation_from_fields,
    decode_json,
    derive_title,
    encode_json,
    message_from_json,
    title_from_messages,
)
from chatstream.sessions.retention import RetentionPolicy
from chatstream.sessions.sqlite_db import SQLiteDatabase

logger = logging.getLogger(__name__)

__all__ = ["SQLiteConversationStore"]

_SUMMARY = "id, owner, title, created_at, updated_at, version, message_count"
_SUMMARY_COLUMNS = _SUMMARY.split(", ")
_HEAD_COLUMNS = [*_SUMMARY_COLUMNS, "prompt_class", "prompt_settings"]
_CONVERSATION = f"c.{_SUMMARY.replace(', ', ', c.')}, c.prompt_class, c.prompt_settings"
_MESSAGE = "m.seq, m.id, m.role, m.name, m.text, m.children, m.created_at, m.feedback, m.generation_params"
_MESSAGE_COLUMNS = [column.removeprefix("m.") for column in _MESSAGE.split(", ")]
_INSERT_MESSAGE = (
    "INSERT INTO messages (conversation_id, seq, id, role, name, text, children, created_at, feedback, "
    "generation_params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_BUMP = (
    "UPDATE conversations SET version = version + 1, updated_at = ?, message_count = {count}, "
    "title = CASE WHEN title = '' THEN ? ELSE title END{extra} WHERE id = ? AND owner = ?{check} RETURNING " + _SUMMARY
)


class SQLiteConversationStore(ConversationStore):
    """Conversations in the tables of :mod:`chatstream.sessions.sqlite_schema` (see :class:`ConversationStore`)."""

    def __init__(self, db: SQLiteDatabase, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def create(self, conversation: Conversation) -> Conversation:
        title = conversation.derived_title()
        async with self._db.transaction() as conn:
            try:
                await conn.execute(
                    "INSERT INTO conversations (id, owner, title, created_at, updated_at, version, prompt_class, "
                    "prompt_settings, message_count) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
                    (
                        conversation.id,
                        conversation.owner,
                        title,
                        conversation.created_at,
                        conversation.updated_at,
                        conversation.prompt_class,
                        encode_json(conversation.prompt_settings),
                        len(conversation.messages),
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(conversation.id, None, None) from None
            await _insert_messages(conn, conversation.id, 0, conversation.messages)
        return dataclasses.replace(conversation, title=title, version=1)

    async def get(self, owner: str, conversation_id: str) -> Conversation:
        async with self._db.connection() as conn:
            rows = list(
                await conn.execute_fetchall(
                    f"SELECT {_CONVERSATION}, {_MESSAGE} FROM conversations c LEFT JOIN messages m "
                    "ON m.conversation_id = c.id WHERE c.id = ? AND c.owner = ? ORDER BY m.seq",
                    (conversation_id, owner),
                )
            )
        if not rows:
            raise ConversationNotFound(conversation_id)
        return _conversation_from_rows(conversation_id, rows)

    async def list_recent(
        self, owner: str, *, limit: int = DEFAULT_PAGE_SIZE, after: str | None = None
    ) -> ConversationPage:
        check_page_size(limit)
        where, params = "owner = ?", [owner]
        async with self._db.connection() as conn:
            if after is not None:
                anchor = list(
                    await conn.execute_fetchall(
                        "SELECT updated_at, id FROM conversations WHERE id = ? AND owner = ?", (after, owner)
                    )
                )
                if not anchor:
                    raise ConversationNotFound(after)
                where += " AND (updated_at, id) < (?, ?)"
                params += list(anchor[0])
            rows = list(
                await conn.execute_fetchall(
                    f"SELECT {_SUMMARY} FROM conversations WHERE {where} ORDER BY updated_at DESC, id DESC LIMIT ?",
                    (*params, limit + 1),
                )
            )
        items = [summary for summary in map(_listed_summary, rows[:limit]) if summary is not None]
        return ConversationPage(items, has_more=len(rows) > limit)

    async def append_messages(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[Message],
        *,
        expected_version: int | None = None,
    ) -> ConversationSummary:
        sql = _BUMP.format(
            count="message_count + ?", extra="", check="" if expected_version is None else " AND version = ?"
        )
        params: list[Any] = [self._clock(), len(messages), title_from_messages(messages), conversation_id, owner]
        if expected_version is not None:
            params.append(expected_version)
        async with self._db.transaction() as conn:
            rows = list(await conn.execute_fetchall(sql, params))
            if not rows:
                await _raise_missing_or_conflict(conn, owner, conversation_id, expected_version)
            summary = _summary(rows[0])
            await _insert_messages(conn, conversation_id, summary.message_count - len(messages), messages)
        return summary

    async def update(self, conversation: Conversation) -> Conversation:
        sql = _BUMP.format(count="?", extra=", prompt_class = ?, prompt_settings = ?", check=" AND version = ?")
        params = (
            self._clock(),
            len(conversation.messages),
            title_from_messages(conversation.messages),
            conversation.prompt_class,
            encode_json(conversation.prompt_settings),
            conversation.id,
            conversation.owner,
            conversation.version,
        )
        async with self._db.transaction() as conn:
            rows = list(await conn.execute_fetchall(sql, params))
            if not rows:
                await _raise_missing_or_conflict(conn, conversation.owner, conversation.id, conversation.version)
            summary = _summary(rows[0])
            await conn.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation.id,))
            await _insert_messages(conn, conversation.id, 0, conversation.messages)
        return dataclasses.replace(
            conversation, title=summary.title, updated_at=summary.updated_at, version=summary.version
        )

    async def rename(self, owner: str, conversation_id: str, title: str) -> ConversationSummary:
        title = clean_title(title)
        async with self._db.transaction() as conn:
            if not title:
                first = list(
                    await conn.execute_fetchall(
                        "SELECT text FROM messages WHERE conversation_id = ? AND role = 'user' AND text != '' "
                        "ORDER BY seq LIMIT 1",
                        (conversation_id,),
                    )
                )
                title = derive_title(first[0][0]) if first else ""
            rows = list(
                await conn.execute_fetchall(
                    f"UPDATE conversations SET title = ? WHERE id = ? AND owner = ? RETURNING {_SUMMARY}",
                    (title, conversation_id, owner),
                )
            )
        if not rows:
            raise ConversationNotFound(conversation_id)
        return _summary(rows[0])

    async def delete(self, owner: str, conversation_id: str) -> None:
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            )
            if cursor.rowcount == 0:
                raise ConversationNotFound(conversation_id)

    async def delete_owner(self, owner: str) -> int:
        async with self._db.transaction() as conn:
            cursor = await conn.execute("DELETE FROM conversations WHERE owner = ?", (owner,))
            return cursor.rowcount

    async def sweep(self, policy: RetentionPolicy, *, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        deleted = 0
        async with self._db.transaction() as conn:
            await conn.execute("DELETE FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            if policy.max_age_seconds is not None:
                cursor = await conn.execute(
                    "DELETE FROM conversations WHERE updated_at < ?", (now - policy.max_age_seconds,)
                )
                deleted += cursor.rowcount
            if policy.max_per_owner is not None:
                cursor = await conn.execute(
                    "DELETE FROM conversations WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER "
                    "(PARTITION BY owner ORDER BY updated_at DESC, id DESC) AS rank FROM conversations) "
                    "WHERE rank > ?)",
                    (policy.max_per_owner,),
                )
                deleted += cursor.rowcount
        return deleted


async def _insert_messages(
    conn: aiosqlite.Connection, conversation_id: str, first_seq: int, messages: Sequence[Message]
) -> None:
    rows = [_message_row(conversation_id, first_seq + index, message) for index, message in enumerate(messages)]
    if rows:
        await conn.executemany(_INSERT_MESSAGE, rows)


async def _raise_missing_or_conflict(
    conn: aiosqlite.Connection, owner: str, conversation_id: str, expected_version: int | None
) -> None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT version FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
        )
    )
    if not rows:
        raise ConversationNotFound(conversation_id)
    raise Conflict(conversation_id, expected_version, rows[0][0])


def _message_row(conversation_id: str, seq: int, message: Message) -> tuple[Any, ...]:
    feedback = message.feedback
    return (
        conversation_id,
        seq,
        message.id,
        message.role,
        message.name,
        message.text,
        None if message.children is None else encode_json(message.children),
        message.created_at,
        None if feedback is None else encode_json(_feedback_json(feedback)),
        None if message.generation_params is None else encode_json(message.generation_params),
    )


def _feedback_json(feedback: Feedback) -> dict[str, Any]:
    return {"is_like": feedback.is_like, "form_data": feedback.form_data, "created_at": feedback.created_at}


def _listed_summary(row: Sequence[Any]) -> ConversationSummary | None:
    """A list skips a damaged record (logged) rather than failing for all of the owner's conversations."""
    try:
        return _summary(row)
    except CorruptRecord as exc:
        logger.warning("conversation list: %s", exc)
        return None


def _summary(row: Sequence[Any]) -> ConversationSummary:
    fields = RecordFields(dict(zip(_SUMMARY_COLUMNS, row, strict=True)), str(row[0]), "conversation")
    return ConversationSummary(
        id=fields.required("id", str),
        owner=fields.required("owner", str),
        title=fields.required("title", str),
        created_at=fields.number("created_at"),
        updated_at=fields.number("updated_at"),
        version=fields.integer("version"),
        message_count=fields.integer("message_count"),
    )


def _conversation_from_rows(conversation_id: str, rows: list[Any]) -> Conversation:
    head = dict(zip(_HEAD_COLUMNS, rows[0], strict=False))
    head["prompt_settings"] = decode_json(head["prompt_settings"], conversation_id)
    fields = RecordFields(head, conversation_id, "conversation")
    messages = [_message_from_row(conversation_id, row[len(head) :]) for row in rows if row[len(head)] is not None]
    if [row[len(head)] for row in rows if row[len(head)] is not None] != list(range(len(messages))):
        raise CorruptRecord(conversation_id, "the message sequence numbers have gaps")
    if head["message_count"] != len(messages):
        raise CorruptRecord(conversation_id, f"message_count {head['message_count']!r} but {len(messages)} messages")
    return conversation_from_fields(fields, messages)


def _message_from_row(conversation_id: str, row: Sequence[Any]) -> Message:
    data = dict(zip(_MESSAGE_COLUMNS, row, strict=True))
    for column in ("children", "feedback", "generation_params"):
        if data[column] is not None:
            data[column] = decode_json(data[column], conversation_id)
    return message_from_json(data, conversation_id)
