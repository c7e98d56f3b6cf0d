"""One /chat_stream turn's input: the body ``{"user_input": ..., "regenerate": ...}`` validated, and the history
changed for it (the user's message appended, or the last answer emptied to regenerate it), with its undo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatstream.server.errors import BadRequest
from chatstream.server.http import parse_json_object
from chatstream.sessions.handler import ChatRequestError

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt


@dataclass(frozen=True)
class ChatTurnInput:
    """A parsed /chat_stream body."""

    user_input: str | None
    regenerate: bool


def parse_chat_body(raw: bytes | str) -> ChatTurnInput:
    """Validate ``{"user_input": str, "regenerate": bool}``; regenerate needs no user_input. Raises ChatRequestError
    naming the field."""
    try:
        data = parse_json_object(raw, example='{"user_input": "..."}')
    except BadRequest as exc:
        raise bad_body(exc.message) from None
    regenerate = data.get("regenerate", False)
    if regenerate is not True and regenerate not in (False, None):
        raise bad_body("'regenerate' must be a boolean")
    user_input = data.get("user_input")
    if regenerate is True:
        if user_input is not None and not isinstance(user_input, str):
            raise bad_body("'user_input' must be a string or null")
        return ChatTurnInput(user_input=user_input, regenerate=True)
    if "user_input" not in data:
        raise bad_body("'user_input' is missing")
    if not isinstance(user_input, str):
        raise bad_body("'user_input' must be a string")
    return ChatTurnInput(user_input=user_input, regenerate=False)


def add_turn(chat_prompt: AbstractChatPrompt, turn: ChatTurnInput) -> Callable[[], None]:
    """Append the user's message and an empty answer slot, or (regenerate) empty the last answer; returns what undoes
    it (for a turn that could not start)."""
    if not turn.regenerate:
        chat_prompt.add_requester_msg(turn.user_input)
        chat_prompt.add_responder_msg(None)

        def remove() -> None:
            chat_prompt.remove_last_responder_msg()
            chat_prompt.remove_last_requester_msg()

        return remove
    if chat_prompt.is_empty():
        detail = "'regenerate' needs a previous answer; the conversation is empty"
        raise ChatRequestError(detail, reason="regenerate on an empty history")
    last = chat_prompt.chat_contents[-1]
    previous = last.get_message()
    chat_prompt.clear_last_responder_message()
    return lambda: last.set_message(previous)


def bad_body(detail: str) -> ChatRequestError:
    """A refused /chat_stream body: 400 naming the field."""
    return ChatRequestError(detail, reason=f"bad request: {detail}")
