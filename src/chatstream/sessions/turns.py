"""One /chat_stream turn on a stored conversation: find it, rebuild its prompt object, commit what the turn added.

A turn runs on the conversation the request names (``"conversation_id"`` in the body), else on the session's
current one, else on a new one; that conversation becomes current. Its record is read once, the prompt object is
rebuilt from it, the turn runs on the object as before, and :func:`commit_turn` writes the difference before the
stream's last chunk:

- a new turn (a question and its answer at the end) is one atomic append, which never conflicts: two tabs that
  write the same conversation at once both keep their turns;
- a regenerated answer replaces the old answer with a version-checked update. When another request wrote the
  conversation in between (a turn in another tab), the new answer is put in the old answer's place in the record
  as it is now and the update is tried again, so neither write is lost;
- a new conversation is created by its first committed turn, so a turn that stores nothing (a pass phrase, a
  client that left while waiting) leaves no empty conversation behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatstream.sessions.errors import Conflict, ConversationNotFound
from chatstream.sessions.keeper import ConversationKeeper
from chatstream.sessions.lookup import FoundSession
from chatstream.sessions.prompt_bridge import merge_prompt, new_conversation, save_prompt
from chatstream.sessions.records import Conversation, Message, check_conversation_id, new_conversation_id

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

__all__ = [
    "CONFLICT_ATTEMPTS",
    "CONVERSATION_ID_HEADER",
    "TurnConversation",
    "commit_turn",
    "open_for_turn",
    "pick_conversation_id",
    "requested_conversation_id",
]

CONVERSATION_ID_HEADER = "X-ChatStream-Conversation-Id"
"""Names the conversation of a /chat_stream or /set_feedback request (instead of ``"conversation_id"`` in the body);
the /chat_stream answer carries it back."""

CONFLICT_ATTEMPTS = 3
"""How often a regenerated answer is put into a conversation that keeps changing before the write gives up."""


@dataclass
class TurnConversation:
    """The conversation one turn runs on.

    Attributes:
        owner: the user's id.
        conversation_id: the conversation's id (also the engine's key for reusing its KV cache).
        record: the record as read at the start of the turn; None while the conversation is not stored yet.
        prompt: the prompt object the turn runs on.
    """

    owner: str
    conversation_id: str
    record: Conversation | None
    prompt: AbstractChatPrompt


def requested_conversation_id(body: bytes | str | None, header: str | None = None) -> str | None:
    """The conversation a /chat_stream request names: ``"conversation_id"`` in the body or the
    ``X-ChatStream-Conversation-Id`` header (the web UI's way, which leaves the original's body as it was); None
    when it names none. A body that is no JSON object is left to the turn, which answers it with a 400.

    Raises:
        ValueError: no valid conversation id, or two different ones (the message names the field).
    """
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    return pick_conversation_id(data.get("conversation_id") if isinstance(data, dict) else None, header)


def pick_conversation_id(in_body: Any, header: str | None) -> str | None:
    """The conversation id of a request from its body's ``"conversation_id"`` and its header, either or neither.

    Raises:
        ValueError: no valid conversation id, or two different ones (the message names the field).
    """
    for name, value in (("'conversation_id'", in_body), (CONVERSATION_ID_HEADER, header)):
        if value is not None:
            try:
                check_conversation_id(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    if in_body is not None and header is not None and in_body != header:
        raise ValueError(f"'conversation_id' {in_body!r} and the {CONVERSATION_ID_HEADER} header {header!r} differ")
    return str(in_body) if in_body is not None else header


async def open_for_turn(
    keeper: ConversationKeeper, session: FoundSession, requested_id: str | None = None
) -> TurnConversation:
    """The conversation this turn continues, made current.

    Raises:
        ConversationNotFound: ``requested_id`` is not one of the user's conversations.
        CorruptRecord, ForeignRecord, StoreUnavailable: the record cannot be read (the turn fails, nothing else).
    """
    await keeper.startup()
    owner = str(keeper.owner_of(session))
    conversation_id = requested_id or keeper.current_id(session)
    record = None
    if conversation_id is not None:
        try:
            record = await keeper.store.conversations.get(owner, conversation_id)
        except ConversationNotFound:
            if requested_id is not None:
                raise
            # The current conversation is not stored yet (its first turn stored nothing) or was deleted meanwhile:
            # the turn starts it (again) under the same id.
    conversation_id = conversation_id or new_conversation_id()
    keeper.set_current(session, conversation_id)
    prompt = keeper.to_prompt(record) if record is not None else keeper.new_prompt()
    return TurnConversation(owner, conversation_id, record, prompt)


async def commit_turn(
    keeper: ConversationKeeper,
    session: FoundSession,
    turn: TurnConversation,
    generation_params: dict[str, Any] | None = None,
) -> None:
    """Write what the turn changed in ``turn.prompt`` (see the module docstring).

    Raises:
        Conflict: a regenerated answer found the answer it replaces gone, or the conversation kept changing.
        StoreError: the store failed (the caller cuts the stream short rather than report a success).
    """
    conversations = keeper.store.conversations
    if turn.record is None:
        turn.record = await _create(keeper, turn, generation_params)
    else:
        try:
            await save_prompt(conversations, turn.record, turn.prompt, generation_params=generation_params)
        except Conflict:
            await _write_over_conflict(keeper, turn, generation_params)
    keeper.keep_legacy_prompt(session, turn.prompt)


async def _create(
    keeper: ConversationKeeper, turn: TurnConversation, generation_params: dict[str, Any] | None
) -> Conversation:
    record = new_conversation(
        turn.owner, turn.prompt, conversation_id=turn.conversation_id, generation_params=generation_params
    )
    conversations = keeper.store.conversations
    try:
        return await conversations.create(record)
    except Conflict:
        # Another tab's first turn created it a moment earlier: ours goes after it.
        existing = await conversations.get(turn.owner, turn.conversation_id)
        known = {message.id for message in existing.messages}
        await conversations.append_messages(
            turn.owner, turn.conversation_id, [m for m in record.messages if m.id not in known]
        )
        return await conversations.get(turn.owner, turn.conversation_id)


async def _write_over_conflict(
    keeper: ConversationKeeper, turn: TurnConversation, generation_params: dict[str, Any] | None
) -> None:
    """Put the messages this turn changed (a regenerated answer) into the record as it is now, and the messages it
    added after them; retried while other writes keep coming in between."""
    assert turn.record is not None
    ours = merge_prompt(turn.record, turn.prompt, generation_params=generation_params).messages
    old = turn.record.messages
    replaced = {before.id: after for before, after in zip(old, ours, strict=False) if before != after}
    added = ours[len(old) :]
    conversations = keeper.store.conversations
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        current = await conversations.get(turn.owner, turn.conversation_id)
        kept = _replaced(current.messages, replaced)
        if kept is None:  # the answer it replaces is gone (deleted, or replaced by another regenerate)
            raise Conflict(turn.conversation_id, turn.record.version, current.version)
        current.messages = kept + added
        try:
            await conversations.update(current)
            return
        except Conflict:
            logger.info("conversation %s changed again while saving a turn (attempt %d)", current.id, attempt)
    raise Conflict(turn.conversation_id, turn.record.version, None)


def _replaced(messages: list[Message], replaced: dict[str, Message]) -> list[Message] | None:
    """``messages`` with each message ``replaced`` names swapped for its new version; None if one is missing."""
    if not set(replaced) <= {message.id for message in messages}:
        return None
    return [replaced.get(message.id, message) for message in messages]
