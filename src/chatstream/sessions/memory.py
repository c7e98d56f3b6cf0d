"""Conversations in this process's memory: the behaviour of the durable stores, without durability.

Records are copied in and out, so a caller that changes a conversation it got changes nothing stored (as with the
durable stores). Every method runs without awaiting, so each is atomic on the event loop; use it from the loop only.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

from chatstream.sessions.base import DEFAULT_PAGE_SIZE, ConversationStore, check_page_size
from chatstream.sessions.errors import Conflict, ConversationNotFound
from chatstream.sessions.records import (
    Conversation,
    ConversationPage,
    ConversationSummary,
    Message,
    clean_title,
)
from chatstream.sessions.retention import RetentionPolicy, expired_ids

__all__ = ["MemoryConversationStore"]


class MemoryConversationStore(ConversationStore):
    """Conversation records in a dict, lost when the process ends.

    Args:
        clock: Unix time in seconds (``time.time``); tests pass a fake one.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._conversations: dict[str, Conversation] = {}
        self._by_owner: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._conversations)

    async def create(self, conversation: Conversation) -> Conversation:
        if conversation.id in self._conversations:
            raise Conflict(conversation.id, None, None)
        stored = copy.deepcopy(conversation)
        stored.version = 1
        stored.title = stored.derived_title()
        self._conversations[stored.id] = stored
        self._by_owner.setdefault(stored.owner, set()).add(stored.id)
        return copy.deepcopy(stored)

    async def get(self, owner: str, conversation_id: str) -> Conversation:
        return copy.deepcopy(self._owned(owner, conversation_id))

    async def list_recent(
        self, owner: str, *, limit: int = DEFAULT_PAGE_SIZE, after: str | None = None
    ) -> ConversationPage:
        check_page_size(limit)
        summaries = self._newest_first(owner)
        start = 0
        if after is not None:
            ids = [s.id for s in summaries]
            if after not in ids:
                raise ConversationNotFound(after)
            start = ids.index(after) + 1
        return ConversationPage(summaries[start : start + limit], has_more=len(summaries) > start + limit)

    async def append_messages(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[Message],
        *,
        expected_version: int | None = None,
    ) -> ConversationSummary:
        stored = self._owned(owner, conversation_id)
        if expected_version is not None and stored.version != expected_version:
            raise Conflict(conversation_id, expected_version, stored.version)
        stored.messages.extend(copy.deepcopy(list(messages)))
        self._touch(stored)
        return stored.summary()

    async def update(self, conversation: Conversation) -> Conversation:
        stored = self._owned(conversation.owner, conversation.id)
        if stored.version != conversation.version:
            raise Conflict(conversation.id, conversation.version, stored.version)
        stored.messages = copy.deepcopy(conversation.messages)
        stored.prompt_class = conversation.prompt_class
        stored.prompt_settings = copy.deepcopy(conversation.prompt_settings)
        self._touch(stored)
        return copy.deepcopy(stored)

    async def rename(self, owner: str, conversation_id: str, title: str) -> ConversationSummary:
        stored = self._owned(owner, conversation_id)
        stored.title = clean_title(title)
        stored.title = stored.derived_title()
        return stored.summary()

    async def delete(self, owner: str, conversation_id: str) -> None:
        self._owned(owner, conversation_id)
        self._remove(owner, conversation_id)

    async def delete_owner(self, owner: str) -> int:
        ids = list(self._by_owner.get(owner, ()))
        for conversation_id in ids:
            self._remove(owner, conversation_id)
        return len(ids)

    async def sweep(self, policy: RetentionPolicy, *, now: float | None = None) -> int:
        if policy.keeps_everything:
            return 0
        now = self._clock() if now is None else now
        deleted = 0
        for owner in list(self._by_owner):
            recent = [(s.id, s.updated_at) for s in self._newest_first(owner)]
            for conversation_id in expired_ids(recent, policy, now):
                self._remove(owner, conversation_id)
                deleted += 1
        return deleted

    def _owned(self, owner: str, conversation_id: str) -> Conversation:
        stored = self._conversations.get(conversation_id)
        if stored is None or stored.owner != owner:
            raise ConversationNotFound(conversation_id)
        return stored

    def _touch(self, stored: Conversation) -> None:
        stored.version += 1
        stored.updated_at = self._clock()
        stored.title = stored.derived_title()

    def _newest_first(self, owner: str) -> list[ConversationSummary]:
        summaries = [self._conversations[i].summary() for i in self._by_owner.get(owner, ())]
        return sorted(summaries, key=lambda s: (s.updated_at, s.id), reverse=True)

    def _remove(self, owner: str, conversation_id: str) -> None:
        del self._conversations[conversation_id]
        ids = self._by_owner[owner]
        ids.discard(conversation_id)
        if not ids:
            del self._by_owner[owner]
