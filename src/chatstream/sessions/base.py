"""The one async interface of every store: sessions and conversations, memory, SQLite or Redis alike.

A :class:`Store` has two parts, ``store.sessions`` (:class:`AsyncSessionStore`: a small JSON dict per session id) and
``store.conversations`` (:class:`ConversationStore`: conversation records per owner). :func:`chatstream.sessions.
urls.open_store` picks the implementation from a URL. No method blocks the event loop. :func:`run_retention` is the
background task that applies a :class:`~chatstream.sessions.retention.RetentionPolicy`.
"""

from __future__ import annotations

import asyncio
import logging
import types
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from chatstream.sessions.errors import Conflict, CorruptRecord, MessageNotFound
from chatstream.sessions.records import (
    Conversation,
    ConversationPage,
    ConversationSummary,
    Feedback,
    Message,
    decode_json,
    encode_json,
)
from chatstream.sessions.retention import RetentionPolicy

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_SESSION_TTL",
    "MAX_PAGE_SIZE",
    "AsyncSessionStore",
    "ConversationStore",
    "SessionData",
    "Store",
    "check_page_size",
    "decode_session",
    "encode_session",
    "redacted_url",
    "run_retention",
]

SessionData = dict[str, Any]
"""One session's data: a plain dict the application reads and writes (JSON values for the durable stores)."""

DEFAULT_SESSION_TTL = 30 * 24 * 3600.0
"""Durable sessions live 30 days after their last use unless told otherwise (they hold who the user is)."""

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class AsyncSessionStore(ABC):
    """Session data by session id.

    ``live_objects`` is True for stores that keep the dict itself (the memory store: :meth:`get` returns the very
    dict that was saved, and any Python object may be in it) and False for stores that serialise (a fresh dict from
    every :meth:`get`; values must be JSON).
    """

    live_objects: bool = False

    @abstractmethod
    async def get(self, session_id: str) -> SessionData | None:
        """The session's data, or None when it does not exist or has expired (reading restarts its idle clock).

        Raises:
            CorruptRecord: the stored session cannot be decoded.
        """

    @abstractmethod
    async def save(self, session_id: str, data: SessionData) -> None:
        """Create or replace the session's data and restart its expiry clock.

        Raises:
            TypeError: a value is not JSON (durable stores only).
        """

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget the session; unknown ids are ignored."""


class ConversationStore(ABC):
    """Conversation records, each visible only to its owner: another owner's id reads exactly like a missing one.

    ``version`` guards against lost updates: :meth:`update` (and :meth:`append_messages` with ``expected_version``)
    raise :class:`~chatstream.sessions.errors.Conflict` when the stored version differs. Renames do not change the
    version, so a rename never makes a turn that is being generated fail, and a turn never undoes a rename.
    """

    @abstractmethod
    async def create(self, conversation: Conversation) -> Conversation:
        """Store a new conversation (at version 1, title derived when empty) and return it as stored.

        Raises:
            Conflict: a conversation with this id exists (``expected_version`` is None on the exception).
        """

    @abstractmethod
    async def get(self, owner: str, conversation_id: str) -> Conversation:
        """The conversation with all its messages.

        Raises:
            ConversationNotFound: no such conversation for this owner.
            CorruptRecord: the record cannot be read (:class:`~chatstream.sessions.errors.ForeignRecord` when it is
                from a newer schema).
        """

    @abstractmethod
    async def list_recent(
        self, owner: str, *, limit: int = DEFAULT_PAGE_SIZE, after: str | None = None
    ) -> ConversationPage:
        """The owner's conversations, most recently updated first, ``limit`` (1..100) at a time; ``after`` is the
        ``next_after`` of the previous page.

        Raises:
            ConversationNotFound: ``after`` names no conversation of this owner (it was deleted: start over).
        """

    @abstractmethod
    async def append_messages(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[Message],
        *,
        expected_version: int | None = None,
    ) -> ConversationSummary:
        """Append messages atomically (version + 1, ``updated_at`` now, title derived when still empty).

        Without ``expected_version`` an append never conflicts: two tabs appending at once both keep their turns.

        Raises:
            ConversationNotFound: no such conversation for this owner.
            Conflict: ``expected_version`` is given and differs from the stored version.
        """

    @abstractmethod
    async def update(self, conversation: Conversation) -> Conversation:
        """Replace the messages and prompt settings if the stored version is still ``conversation.version``.

        The title is not written (use :meth:`rename`), except that an empty one is derived. Returns the stored
        conversation: version + 1, ``updated_at`` now.

        Raises:
            ConversationNotFound: no such conversation for this owner.
            Conflict: the stored version is not ``conversation.version``.
        """

    @abstractmethod
    async def rename(self, owner: str, conversation_id: str, title: str) -> ConversationSummary:
        """Set the title (an empty title is derived again from the first user message); the version stays."""

    @abstractmethod
    async def delete(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation.

        Raises:
            ConversationNotFound: no such conversation for this owner.
        """

    @abstractmethod
    async def delete_owner(self, owner: str) -> int:
        """Delete every conversation of ``owner`` (a user's data removal); returns how many there were."""

    @abstractmethod
    async def sweep(self, policy: RetentionPolicy, *, now: float | None = None) -> int:
        """Delete what ``policy`` no longer keeps, and expired sessions; returns the number of conversations
        deleted. Cheap enough to run every few minutes."""

    async def set_feedback(
        self, owner: str, conversation_id: str, message_id: str, feedback: Feedback | None, *, attempts: int = 3
    ) -> Conversation:
        """Record (or with None, remove) the feedback on one message; retried on a concurrent change.

        Raises:
            ConversationNotFound, MessageNotFound; Conflict after ``attempts`` concurrent changes in a row.
        """
        for attempt in range(attempts):
            conversation = await self.get(owner, conversation_id)
            message = conversation.find_message(message_id)
            if message is None:
                raise MessageNotFound(conversation_id, message_id)
            message.feedback = feedback
            try:
                return await self.update(conversation)
            except Conflict:
                if attempt == attempts - 1:
                    raise
        raise ValueError(f"attempts must be at least 1, got {attempts!r}")


class Store(ABC):
    """A place for sessions and conversations, opened by URL with :func:`chatstream.sessions.urls.open_store`.

    Constructing a store does no I/O; :meth:`open` connects (and for SQLite creates or migrates the file) and is
    also done on first use. Use it as ``async with open_store(url) as store:``, or call :meth:`open` at the app's
    startup and :meth:`close` at its shutdown.
    """

    sessions: AsyncSessionStore
    conversations: ConversationStore

    async def open(self) -> None:  # noqa: B027 - most stores have something to open; the memory store has not
        """Connect now (idempotent); raises StoreUnavailable when the store cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and threads; idempotent."""

    @abstractmethod
    def describe(self) -> str:
        """Where the data lives, for logs (the file path, or the Redis URL without its password)."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        await self.close()


def check_page_size(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}, got {limit!r}")


def encode_session(session_id: str, data: SessionData) -> str:
    """The session as JSON text.

    Raises:
        TypeError: a value is not JSON; the message names the key (a live prompt object under ``"chat_prompt"``
            belongs in a conversation record, see docs/conversations.md).
    """
    try:
        return encode_json(data)
    except (TypeError, ValueError):
        bad = [key for key, value in data.items() if not _is_json(value)]
        raise TypeError(
            f"session {session_id[:8]}… holds values that are not JSON under {bad}; this store keeps JSON only "
            "(keep conversations in store.conversations, not prompt objects in the session)"
        ) from None


def decode_session(text: str | bytes, session_id: str) -> SessionData:
    data = decode_json(text, f"session:{session_id}")
    if not isinstance(data, dict):
        raise CorruptRecord(f"session:{session_id}", f"a session is a JSON object, got {type(data).__name__}")
    return data


def _is_json(value: Any) -> bool:
    try:
        encode_json(value)
    except (TypeError, ValueError):
        return False
    return True


async def run_retention(store: Store, policy: RetentionPolicy, interval_seconds: float = 3600.0) -> None:
    """Sweep ``store`` now and then every ``interval_seconds`` until cancelled (start it as a task in the app's
    lifespan, cancel it at shutdown). A failed sweep is logged and retried at the next interval."""
    if interval_seconds <= 0:
        raise ValueError(f"interval_seconds must be positive, got {interval_seconds!r}")
    while True:
        try:
            deleted = await store.conversations.sweep(policy)
        except Exception:
            logger.exception("retention sweep of %s failed; retrying in %.0f s", store.describe(), interval_seconds)
        else:
            if deleted:
                logger.info("retention sweep of %s deleted %d conversation(s)", store.describe(), deleted)
        await asyncio.sleep(interval_seconds)


def redacted_url(url: str) -> str:
    """The URL without its password (for logs and error messages)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':' if user else ':'}***@{host}"
