"""The JSON shapes of the conversations API, after OpenAI's Conversations API where it fits, and the exports.

A conversation is ``{"id", "object": "conversation", "created_at", "metadata"}`` as in OpenAI, plus ``title``,
``updated_at``, ``message_count``, ``version`` and ``current``; a message is an OpenAI message item (``type``,
``id``, ``status``, ``role``, ``content`` parts) plus ``created_at`` and ``feedback``. Lists are OpenAI's list
objects (``data``, ``first_id``, ``last_id``, ``has_more``). Times are Unix seconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from starlette.responses import Response

from chatstream.server.errors import BadRequest
from chatstream.sessions.export import export_json, export_markdown
from chatstream.sessions.records import Conversation, ConversationSummary, Message

__all__ = ["EXPORT_FORMATS", "conversation_json", "export_response", "item_json", "list_json"]

EXPORT_FORMATS = {
    "json": ("application/json; charset=utf-8", "json"),
    "markdown": ("text/markdown; charset=utf-8", "md"),
}
"""``?format=`` of an export: its media type and file extension."""

_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def conversation_json(summary: ConversationSummary, current_id: str | None = None) -> dict[str, Any]:
    """One conversation without its messages."""
    return {
        "id": summary.id,
        "object": "conversation",
        "created_at": int(summary.created_at),
        "updated_at": int(summary.updated_at),
        "title": summary.title,
        "message_count": summary.message_count,
        "version": summary.version,
        "current": summary.id == current_id,
        "metadata": {"title": summary.title},
    }


def item_json(message: Message) -> dict[str, Any]:
    """One message as an OpenAI message item; an answer that was never filled is ``"incomplete"``."""
    part = "input_text" if message.role == "user" else "output_text"
    feedback = message.feedback
    return {
        "type": "message",
        "id": message.id,
        "status": "incomplete" if message.text is None else "completed",
        "role": message.role,
        "content": [{"type": part, "text": message.text or ""}],
        "created_at": message.created_at,
        "feedback": None if feedback is None else {"is_like": feedback.is_like, "created_at": feedback.created_at},
    }


def list_json(data: Sequence[dict[str, Any]], has_more: bool, **extra: Any) -> dict[str, Any]:
    """An OpenAI list object around ``data`` (each with an ``id``)."""
    return {
        "object": "list",
        "data": list(data),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
        **extra,
    }


def export_response(conversation: Conversation, export_format: str) -> Response:
    """The conversation as a file to download: ``json`` (the record, readable back) or ``markdown``.

    Raises:
        BadRequest: an unknown format (names the ``format`` parameter).
    """
    if export_format not in EXPORT_FORMATS:
        raise BadRequest(f"'format' must be one of {sorted(EXPORT_FORMATS)}, got {export_format!r:.40}", param="format")
    media_type, extension = EXPORT_FORMATS[export_format]
    text = export_json(conversation) if export_format == "json" else export_markdown(conversation)
    title = conversation.derived_title()
    name = _UNSAFE_FILE_CHARS.sub("-", title)[:60].strip("-.") or conversation.id  # ASCII for every browser
    utf8_name = quote(title[:60] or name)
    disposition = f"attachment; filename=\"{name}.{extension}\"; filename*=UTF-8''{utf8_name}.{extension}"
    headers = {"Content-Disposition": disposition, "Cache-Control": "no-store"}
    return Response(text, media_type=media_type, headers=headers)
