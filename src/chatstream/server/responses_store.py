"""Responses kept as conversations: a chain of ``previous_response_id`` is one conversation record of the store
(:mod:`chatstream.sessions`), so the engine's KV of that conversation serves the next step.

The record of a chain (id ``resp_<32 hex>``, owner: who asked, see :func:`owner_of`) holds its turns in order. A turn
is the request's ``input`` as messages (user, ``other`` for system/developer/tool messages, assistant for calls the
client replays), then one assistant message for the response itself: its id is the response id, its text the
answer, its ``generation_params`` the stored response object (``"response"``) and its tool calls (``"tool_calls"``,
in the chat shape); a tool result keeps the call it answers as ``generation_params["tool_call_id"]``. Instructions are
not messages: as OpenAI's, they apply to one response only.

A response id is ``<conversation id>_<n>``, ``n`` the number of messages before its turn: the id names its record and
place without an index. Continuing the latest response appends to its record, version-checked at the start of the
turn (before the id is announced); continuing an older one, or losing that race, forks: a new record with a copy of
the turns up to that response. The input is written when the turn starts, the answer when it ends (before the last
event of a stream). Deleting a response removes its turn when it is the latest, else marks it deleted: its text stays
in the history of the responses that continued it.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chatstream.server.errors import NotFound
from chatstream.sessions.base import Store
from chatstream.sessions.errors import Conflict, ConversationNotFound
from chatstream.sessions.records import Conversation, Message, new_message_id

__all__ = ["PROMPT_CLASS", "Chain", "ResponseStore", "Turn", "chat_messages", "input_records", "owner_of"]

PROMPT_CLASS = "chatstream.server.responses.ResponseChain"
"""The prompt-class name of the records this module writes (a name only: nothing is imported from it)."""

_RESPONSE_ID = re.compile(r"(resp_[0-9a-f]{32})_(\d+)")
_WRITE_ATTEMPTS = 3

StoreProvider = Callable[[], Awaitable[Store]]


def owner_of(authorization: str | None) -> str:
    """Whose responses these are: one owner per API key (a hash of it), else everyone's ``openai``."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "openai-" + hashlib.sha256(token.strip().encode()).hexdigest()[:24]
    return "openai"


def _params(message: Message) -> dict[str, Any]:
    return message.generation_params or {}


def is_response(message: Message) -> bool:
    return "response" in _params(message)


# ----- messages -----


def input_records(messages: Sequence[dict[str, Any]], now: float) -> list[Message]:
    """Chat-style input messages as records."""
    records = []
    for message in messages:
        role, text = message["role"], message.get("content")
        params: dict[str, Any] | None = None
        if role == "tool":
            params = {"tool_call_id": message.get("tool_call_id")}
        elif message.get("tool_calls"):
            params = {"tool_calls": message["tool_calls"]}
        kind = role if role in ("user", "assistant") else "other"
        records.append(Message(new_message_id(), kind, text or "", now, name=role, generation_params=params))
    return records


def chat_messages(records: Sequence[Message]) -> list[dict[str, Any]]:
    """Records as chat-style messages (what the chat template renders)."""
    out: list[dict[str, Any]] = []
    for record in records:
        params = _params(record)
        if record.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": record.text or None}
            if params.get("tool_calls"):
                message["tool_calls"] = params["tool_calls"]
        elif record.name == "tool":
            message = {"role": "tool", "tool_call_id": params.get("tool_call_id"), "content": record.text or ""}
        else:
            role = record.name if record.name in ("system", "developer") else "user"
            message = {"role": role, "content": record.text or ""}
        out.append(message)
    return out


# ----- chains and turns -----


@dataclass(frozen=True)
class Chain:
    """A stored response and the record it lives in: ``conversation.messages[index]`` is its message."""

    conversation: Conversation
    index: int

    @property
    def history(self) -> list[Message]:
        """The turns up to and including the response."""
        return self.conversation.messages[: self.index + 1]

    @property
    def message(self) -> Message:
        return self.conversation.messages[self.index]

    @property
    def response(self) -> dict[str, Any]:
        return dict(_params(self.message)["response"])


@dataclass(frozen=True)
class Turn:
    """A response being made: its id, and its record (None when it is not stored)."""

    response_id: str
    conversation_id: str | None


class ResponseStore:
    """Responses in a conversation store; ``provider`` gives the (opened) store on first use."""

    def __init__(self, provider: StoreProvider) -> None:
        self._provider = provider

    async def find(self, owner: str, response_id: str, param: str = "response_id") -> Chain:
        """The stored response; NotFound naming ``param`` when there is none (or it was deleted)."""
        match = _RESPONSE_ID.fullmatch(response_id)
        if match is None:
            raise _not_found(response_id, param)
        store = await self._provider()
        try:
            conversation = await store.conversations.get(owner, match.group(1))
        except ConversationNotFound:
            raise _not_found(response_id, param) from None
        for index, message in enumerate(conversation.messages):
            if message.id == response_id and is_response(message) and not _params(message).get("deleted"):
                return Chain(conversation, index)
        raise _not_found(response_id, param)

    async def begin(self, owner: str, chain: Chain | None, inputs: list[Message], *, store: bool) -> Turn:
        """Start a turn: write its input (appended to ``chain``'s record when it ends there, else a new record)."""
        if not store:
            return Turn(f"resp_{uuid.uuid4().hex}", None)
        conversations = (await self._provider()).conversations
        if chain is not None and chain.index == len(chain.conversation.messages) - 1:
            conversation = chain.conversation
            try:
                await conversations.append_messages(
                    owner, conversation.id, inputs, expected_version=conversation.version
                )
                return Turn(f"{conversation.id}_{len(conversation.messages)}", conversation.id)
            except Conflict:
                pass  # someone continued it first: fork
        history = chain.history if chain is not None else []
        now = time.time()
        record = Conversation(f"resp_{uuid.uuid4().hex}", owner, "", now, now, 0, PROMPT_CLASS, {}, [*history, *inputs])
        await conversations.create(record)
        return Turn(f"{record.id}_{len(history)}", record.id)

    async def finish(self, owner: str, turn: Turn, answer: Message) -> None:
        """Write the response's message (its id is the response id) at the end of its turn."""
        if turn.conversation_id is not None:
            store = await self._provider()
            await store.conversations.append_messages(owner, turn.conversation_id, [answer])

    async def delete(self, owner: str, response_id: str) -> None:
        """Delete a stored response (see the module's note); NotFound when there is none."""
        store = await self._provider()
        for attempt in range(_WRITE_ATTEMPTS):
            chain = await self.find(owner, response_id)
            conversation = chain.conversation
            try:
                await _delete_in(store, owner, conversation, chain.index)
                return
            except Conflict:
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise


async def _delete_in(store: Store, owner: str, conversation: Conversation, index: int) -> None:
    messages = conversation.messages
    if index < len(messages) - 1:
        message = messages[index]
        message.generation_params = {**_params(message), "deleted": True}
        await store.conversations.update(conversation)
        return
    start = max((i + 1 for i, m in enumerate(messages[:index]) if is_response(m)), default=0)
    if start == 0:
        await store.conversations.delete(owner, conversation.id)
        return
    conversation.messages = messages[:start]
    await store.conversations.update(conversation)


def _not_found(response_id: str, param: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=param)


def answer_record(turn: Turn, text: str, response: dict[str, Any], tool_calls: list[dict[str, Any]]) -> Message:
    """The message of a response: its text, and the response object and calls in ``generation_params``."""
    params: dict[str, Any] = {"response": response}
    if tool_calls:
        params["tool_calls"] = tool_calls
    return Message(turn.response_id, "assistant", text, time.time(), name="assistant", generation_params=params)
