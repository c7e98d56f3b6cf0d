"""The values a chat prompt is made of: one message (:class:`ChatContent`), its role, and the render options."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class RoleType(enum.Enum):
    """Which side of the conversation a message comes from."""

    REQUESTER = enum.auto()
    """The user."""
    RESPONDER = enum.auto()
    """The model (AI assistant)."""
    UNKNOWN = enum.auto()
    """Neither (e.g. a message built by hand without a role type)."""


class PromptTTL(enum.Enum):
    """How much of the history a rendered prompt contains."""

    MULTI_TURN = enum.auto()
    """Every turn so far."""
    SINGLE_TURN = enum.auto()
    """Only the latest turn (question and answer slot); earlier turns are kept but not rendered."""


class ChatContent:
    """One message of a conversation: who said it (role name and :class:`RoleType`), the text, and its id.

    ``message`` is None for a responder slot that is still to be generated. ``child_messages`` are extra inputs
    attached to a requester message (some instruction formats render them as an "input" section).
    """

    def __init__(
        self,
        role: str,
        msg: str | None = "",
        msg_id: str | None = None,
        role_type: RoleType = RoleType.UNKNOWN,
        child_msgs: list[str] | None = None,
    ) -> None:
        self.role = role
        self.role_type = role_type
        self.message = msg
        self.message_id = msg_id
        self.child_messages = child_msgs

    def __repr__(self) -> str:
        return (
            f"ChatContent(role={self.role!r}, role_type={self.role_type.name}, message={self.message!r}, "
            f"message_id={self.message_id!r}, child_messages={self.child_messages!r})"
        )

    def get_role(self) -> str:
        return self.role

    def get_role_type(self) -> RoleType:
        return self.role_type

    def get_message(self) -> str | None:
        return self.message

    def set_message(self, msg: str | None) -> None:
        self.message = msg

    def get_message_id(self) -> str | None:
        return self.message_id

    def set_message_id(self, message_id: str | None) -> None:
        self.message_id = message_id

    def add_child_message(self, msg: str) -> None:
        if self.child_messages is None:
            self.child_messages = []
        self.child_messages.append(msg)

    def get_child_messages(self) -> list[str] | None:
        return self.child_messages

    def has_child_messages(self) -> bool:
        """True when at least one child message is attached."""
        return bool(self.child_messages)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the seed's keys)."""
        return {
            "role": self.role,
            "role_type": self.role_type.name,
            "message": self.message,
            "message_id": self.message_id,
            "child_messages": list(self.child_messages) if self.child_messages is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatContent:
        """The inverse of :meth:`to_dict`; missing optional keys get their defaults."""
        child_msgs = data.get("child_messages")
        return cls(
            role=data["role"],
            msg=data.get("message"),
            msg_id=data.get("message_id"),
            role_type=RoleType[data.get("role_type", RoleType.UNKNOWN.name)],
            child_msgs=list(child_msgs) if child_msgs is not None else None,
        )


@dataclass(frozen=True)
class PromptOptions:
    """How to render a prompt (the seed passed these as an ``opts`` dict, which is still accepted).

    Attributes:
        omit_last_message: render the last message as an empty slot (its text left out), as if it were still to be
            generated.
        to_message_id: render the history only up to and including the message with this id.
    """

    omit_last_message: bool = False
    to_message_id: str | None = None

    @classmethod
    def coerce(cls, opts: PromptOptions | Mapping[str, Any] | None) -> PromptOptions:
        """Accept None, a :class:`PromptOptions` or the seed's dict (unknown keys are ignored, as the seed did)."""
        if opts is None:
            return cls()
        if isinstance(opts, PromptOptions):
            return opts
        if not isinstance(opts, Mapping):
            raise TypeError(f"opts must be a dict or PromptOptions, got {type(opts).__name__}")
        return cls(
            omit_last_message=bool(opts.get("omit_last_message", False)),
            to_message_id=opts.get("to_message_id"),
        )
