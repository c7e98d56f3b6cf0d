"""Small rendering helpers shared by the preset prompt classes."""

from __future__ import annotations

from collections.abc import Iterable

from chatstream.prompts.content import ChatContent


def render_role_turns(
    contents: Iterable[ChatContent],
    *,
    line_end: str = "\n",
    slot: str = ":",
    replacements: Iterable[tuple[str, str]] = (),
) -> str:
    """Render ``"role: message<line_end>"`` per message; a message that is None renders as ``"role<slot>"``.

    Messages with an empty role name are left out. ``replacements`` are applied to each message text (e.g. a
    newline → ``<NL>`` for models that use a token for line breaks).
    """
    pairs = tuple(replacements)
    parts: list[str] = []
    for content in contents:
        role, message = content.get_role(), content.get_message()
        if not role:
            continue
        if message is None:
            parts.append(f"{role}{slot}")
            continue
        for old, new in pairs:
            message = message.replace(old, new)
        parts.append(f"{role}: {message}{line_end}")
    return "".join(parts)


def render_concatenated(contents: Iterable[ChatContent]) -> str:
    """The messages' texts joined with nothing between them (plain text-completion models)."""
    return "".join(content.get_message() or "" for content in contents)
