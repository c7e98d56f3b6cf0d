"""Exports of one conversation: the JSON record (readable back with ``conversation_from_json``) and Markdown."""

from __future__ import annotations

import datetime
import json

from chatstream.sessions.records import Conversation, Message, conversation_to_json

__all__ = ["export_json", "export_markdown"]

_ROLE_HEADINGS = {"user": "User", "assistant": "Assistant", "other": "Other"}


def export_json(conversation: Conversation) -> str:
    """The conversation as an indented JSON document (``"object": "chatstream.conversation"``)."""
    return json.dumps(conversation_to_json(conversation), ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def export_markdown(conversation: Conversation) -> str:
    """The conversation as Markdown: the title, then one section per message (role, time, feedback, text)."""
    lines = [
        f"# {conversation.derived_title() or 'Untitled conversation'}",
        "",
        f"_Created {_utc(conversation.created_at)}, updated {_utc(conversation.updated_at)}._",
    ]
    for message in conversation.messages:
        lines += ["", f"## {_heading(message)}", ""]
        lines.append(message.text if message.text else "_(no text)_")
        for child in message.children or ():
            lines += ["", *(f"> {line}" if line else ">" for line in child.splitlines() or [""])]
    return "\n".join(lines) + "\n"


def _heading(message: Message) -> str:
    heading = f"{_ROLE_HEADINGS[message.role]} · {_utc(message.created_at)}"
    if message.feedback is not None:
        heading += " · 👍" if message.feedback.is_like else " · 👎"
    return heading


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
