"""ConversationKeeper: where the users of one ChatStream keep their conversations, and who each user is.

The keeper holds the :class:`~chatstream.sessions.base.Store` (memory, SQLite or Redis), opens it once, runs the
retention task while the app runs, and closes the store at shutdown when it opened it from a URL. It also knows the
two things the HTTP session says about a user (the session holds JSON only):

- ``session["user_id"]``: the owner of the user's conversations, made on first use. An application that knows its
  users (a login) may set it to their own id, so that a user finds the same conversations on every device;
- ``session["conversation_id"]``: the current conversation, the one /chat_stream continues when the request does
  not name one.

What a /chat_stream turn does with them is in :mod:`chatstream.sessions.turns`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import TYPE_CHECKING, Any

from chatstream.sessions.base import Store, run_retention
from chatstream.sessions.lookup import FoundSession
from chatstream.sessions.prompt_bridge import conversation_to_prompt
from chatstream.sessions.records import Conversation, check_conversation_id
from chatstream.sessions.retention import RetentionPolicy
from chatstream.sessions.store import MemoryStore
from chatstream.sessions.urls import open_store, parse_duration

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt
    from chatstream.service import PromptFactory

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RETENTION_INTERVAL",
    "LEGACY_PROMPT_KEY",
    "MEMORY_MAX_AGE",
    "SESSION_CONVERSATION_KEY",
    "SESSION_USER_KEY",
    "ConversationKeeper",
]

SESSION_USER_KEY = "user_id"
"""The session key of the user's id, the owner of their conversations."""
SESSION_CONVERSATION_KEY = "conversation_id"
"""The session key of the current conversation's id."""
LEGACY_PROMPT_KEY = "chat_prompt"
"""Where the original package kept the prompt object; still filled for sessions that hold live objects."""

DEFAULT_RETENTION_INTERVAL = 3600.0
"""Seconds between two retention sweeps."""
MEMORY_MAX_AGE = 12 * 3600.0
"""The memory store's default conversation age limit: as long as a memory session lives unused."""


class ConversationKeeper:
    """The conversations of one ChatStream: the store, its lifecycle, the retention task, the users' sessions.

    Args:
        store: a :class:`Store`, or a store URL (``memory://``, ``sqlite:///...``, ``redis://...``). A store made
            from a URL is closed at :meth:`shutdown`; a store object given here is opened but left open (its owner
            closes it).
        prompts: the service's prompt class and tokenizer (rebuilds prompt objects from records).
        max_age: conversations not updated for this long are deleted by the retention task: seconds or a duration
            (``"90d"``, ``"12h"``), ``"never"`` to keep them; None: the store's default (memory: 12 hours, as long as
            a memory session lives unused; SQLite and Redis: never).
        max_per_owner: each user keeps at most this many conversations, the most recently updated; None: no limit.
        retention_interval: seconds between sweeps (a sweep also deletes expired sessions).
    """

    def __init__(
        self,
        store: Store | str,
        prompts: PromptFactory,
        *,
        max_age: float | str | None = None,
        max_per_owner: int | None = None,
        retention_interval: float = DEFAULT_RETENTION_INTERVAL,
    ) -> None:
        if not retention_interval > 0:
            raise ValueError(f"retention_interval must be positive, got {retention_interval!r}")
        self.owns_store = isinstance(store, str)
        self.store: Store = open_store(store) if isinstance(store, str) else _checked_store(store)
        self.prompts = prompts
        age = default_max_age(self.store) if max_age is None else parse_duration(max_age, "max_age")
        self.retention = RetentionPolicy(max_age_seconds=age, max_per_owner=max_per_owner)
        self.retention_interval = retention_interval
        self._started = False
        self._retention_task: asyncio.Task[None] | None = None

    def describe(self) -> str:
        """Where the conversations live (for logs)."""
        return self.store.describe()

    # ----- lifecycle -----

    async def startup(self) -> None:
        """Open the store and start the retention task (idempotent; also done on first use)."""
        if self._started:
            return
        await self.store.open()  # StoreUnavailable: the next call tries again
        if self._started:  # another request started it meanwhile
            return
        self._started = True
        logger.info("conversations are kept in %s (%s)", self.describe(), _retention_text(self.retention))
        self._retention_task = asyncio.create_task(
            run_retention(self.store, self.retention, self.retention_interval), name="chatstream-retention"
        )

    async def shutdown(self) -> None:
        """Stop the retention task; close the store when it was opened from a URL. Idempotent."""
        task, self._retention_task = self._retention_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._started and self.owns_store:
            await self.store.close()
        self._started = False

    # ----- the user's session -----

    def owner_of(self, session: FoundSession, *, create: bool = True) -> str | None:
        """The user's id (the owner of their conversations); made and saved in the session on first use, or None
        when there is none yet and ``create`` is False."""
        value = session.data.get(SESSION_USER_KEY)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not create:
            return None
        owner = f"user_{secrets.token_hex(16)}"
        session.data[SESSION_USER_KEY] = owner
        session.save()
        return owner

    def current_id(self, session: FoundSession) -> str | None:
        """The id of the session's current conversation (None: the next turn starts a new one)."""
        value = session.data.get(SESSION_CONVERSATION_KEY)
        if not isinstance(value, str):
            return None
        try:
            check_conversation_id(value)
        except ValueError:
            return None
        return value

    def set_current(self, session: FoundSession, conversation_id: str | None) -> None:
        """Make ``conversation_id`` the current conversation (None: none), and save the session if it changed."""
        if conversation_id == session.data.get(SESSION_CONVERSATION_KEY):
            return
        if conversation_id is None:
            session.data.pop(SESSION_CONVERSATION_KEY, None)
        else:
            session.data[SESSION_CONVERSATION_KEY] = conversation_id
        session.data.pop(LEGACY_PROMPT_KEY, None)  # it showed the conversation that was current
        session.save()

    def keep_legacy_prompt(self, session: FoundSession, prompt: AbstractChatPrompt) -> None:
        """Leave the prompt object at ``session["chat_prompt"]`` where the session holds live objects (fastsession,
        a memory store), for code written for the original package that reads it. ChatStream never reads it back."""
        if getattr(session.manager, "keeps_objects", True):
            session.data[LEGACY_PROMPT_KEY] = prompt

    # ----- records and prompt objects -----

    def to_prompt(self, record: Conversation) -> AbstractChatPrompt:
        """The prompt object of the service's prompt class holding ``record`` (ForeignRecord, CorruptRecord)."""
        return conversation_to_prompt(record, self.prompts.prompt_class, self.prompts.tokenizer)

    def new_prompt(self) -> AbstractChatPrompt:
        """An empty prompt object for a new conversation, its opening messages built."""
        return self.prompts.new_chat_prompt()


def default_max_age(store: Store) -> float | None:
    """Memory: conversations not updated for as long as a memory session lives unused (12 hours) go, so that the
    memory store does not grow without bound; durable stores keep them until told otherwise."""
    if isinstance(store, MemoryStore):
        return store.ttl_seconds or MEMORY_MAX_AGE
    return None


def _checked_store(store: Any) -> Store:
    if not isinstance(store, Store):
        raise TypeError(
            f"store must be a store URL or a chatstream Store (from chatstream.sessions.open_store), "
            f"got {type(store).__name__}"
        )
    return store


def _retention_text(policy: RetentionPolicy) -> str:
    if policy.keeps_everything:
        return "kept until deleted"
    parts = []
    if policy.max_age_seconds is not None:
        parts.append(f"deleted {policy.max_age_seconds / 3600:g} h after their last change")
    if policy.max_per_owner is not None:
        parts.append(f"at most {policy.max_per_owner} per user")
    return ", ".join(parts)
