"""Filling a chat prompt from OpenAI-style chat messages (``[{"role": "user", "content": "..."}]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chatstream.prompts.content import RoleType

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

__all__ = ["load_openai_messages", "role_messages"]


def load_openai_messages(
    chat_prompt: AbstractChatPrompt, messages: Sequence[Mapping[str, Any]], *, add_generation_slot: bool = True
) -> AbstractChatPrompt:
    """Replace ``chat_prompt``'s history with OpenAI-style messages and return it.

    ``system`` / ``developer`` messages replace the prompt's system text (through
    :meth:`AbstractChatPrompt.format_system_message`; several are joined by newlines), ``user`` messages become
    requester messages and ``assistant`` messages responder messages. ``content`` is a string or a list of
    ``{"type": "text", "text": ...}`` parts. With ``add_generation_slot`` an empty responder slot is appended unless
    the last message is the assistant's, so that ``create_prompt()`` ends with the generation prefix.

    Raises:
        ValueError: an unknown role or a content that is not text; the message names the offending field.
    """
    chat_prompt.clear_history()
    system_texts: list[str] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        text = _message_text(message.get("content"), index)
        if role in ("system", "developer"):
            system_texts.append(text)
        elif role == "user":
            chat_prompt.add_requester_msg(text)
        elif role == "assistant":
            chat_prompt.add_responder_msg(text)
        else:
            raise ValueError(f"messages[{index}].role must be system, developer, user or assistant, got {role!r}")
    if system_texts:
        chat_prompt.set_system(chat_prompt.format_system_message("\n".join(system_texts)))
    last = chat_prompt.chat_contents[-1] if chat_prompt.chat_contents else None
    if add_generation_slot and (last is None or last.get_role_type() is not RoleType.RESPONDER):
        chat_prompt.add_responder_msg(None)
    return chat_prompt


def _message_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content[{part_index}] must be a text part, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(
        f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
    )


_ROLES = {RoleType.REQUESTER: "user", RoleType.RESPONDER: "assistant"}


def role_messages(chat_prompt: AbstractChatPrompt) -> tuple[tuple[str, str], ...]:
    """The conversation as ``(role, content)`` pairs ("system", "user", "assistant"), for engines that render prompts
    themselves (an upstream in chat mode).

    The system text comes first (stripped; a preset's system text is already in its model's format), then every
    message that has text; the empty answer slot is left out. With chat mode off, only the user's last message.
    """
    if not chat_prompt.is_chat_mode_enabled():
        return (("user", chat_prompt.get_requester_last_msg() or ""),)
    to_messages = getattr(chat_prompt, "to_messages", None)
    if callable(to_messages):  # ChatTemplatePrompt: its own OpenAI-style messages
        return tuple((str(m["role"]), str(m["content"])) for m in to_messages())
    pairs: list[tuple[str, str]] = [("system", chat_prompt.system.strip())] if chat_prompt.system.strip() else []
    for content in chat_prompt.get_contents():
        role, text = _ROLES.get(content.get_role_type()), content.get_message()
        if role is not None and text is not None:
            children = content.get_child_messages() if content.has_child_messages() else None
            pairs.append((role, "\n\n".join([text, *(children or ())])))
    return tuple(pairs)
