"""Helpers of the store tests: a clock that ticks, and small conversations."""

from __future__ import annotations

from chatstream.sessions.records import Conversation, Message, new_conversation_id

START = 1_700_000_000.0


class TickingClock:
    """Unix time that moves one second forward at every reading, so that every write has its own updated_at."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def message(role: str, text: str | None, message_id: str | None = None, **fields: object) -> Message:
    return Message(id=message_id or f"m-{role}-{text}", role=role, text=text, created_at=START, **fields)  # type: ignore[arg-type]


def conversation(
    owner: str = "alice", texts: tuple[str, ...] = ("hello", "hi there"), **fields: object
) -> Conversation:
    """A conversation with alternating user / assistant messages."""
    roles = ("user", "assistant")
    messages = [message(roles[i % 2], text, f"m{i}") for i, text in enumerate(texts)]
    values: dict[str, object] = {
        "id": new_conversation_id(),
        "owner": owner,
        "title": "",
        "created_at": START,
        "updated_at": START,
        "version": 0,
        "prompt_class": "chatstream.prompts.presets.ChatPromptTogetherRedPajamaINCITEChat",
        "prompt_settings": {"system": "", "requester": "<human>", "responder": "<bot>"},
        "messages": messages,
    }
    values.update(fields)
    return Conversation(**values)  # type: ignore[arg-type]
