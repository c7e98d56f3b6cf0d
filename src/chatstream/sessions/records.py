"""Conversations as plain records: dataclasses, and their JSON form that every durable store writes.

A record is data only. Reading one back never imports or runs anything named in it (a store shared between machines
must not execute code from its data): the prompt class is a name that is compared with the class the application
passes in (see :mod:`chatstream.sessions.prompt_bridge`).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chatstream.sessions.errors import CorruptRecord, ForeignRecord

__all__ = [
    "RECORD_SCHEMA_VERSION",
    "ROLES",
    "Conversation",
    "ConversationPage",
    "ConversationSummary",
    "Feedback",
    "Message",
    "RecordFields",
    "check_conversation_id",
    "clean_title",
    "conversation_from_fields",
    "conversation_from_json",
    "conversation_to_json",
    "decode_json",
    "derive_title",
    "encode_json",
    "message_from_json",
    "message_to_json",
    "new_conversation_id",
    "new_message_id",
    "summary_fields_to_json",
    "title_from_messages",
]

RECORD_SCHEMA_VERSION = 1
"""The version of the JSON form of a conversation; a record with a higher one is a :class:`ForeignRecord`."""

ROLES = ("user", "assistant", "other")
"""Who wrote a message: the user (requester), the model (responder), or neither."""

_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_TITLE_LENGTH = 60
MAX_TITLE_LENGTH = 200


def new_conversation_id() -> str:
    return f"conv_{uuid.uuid4().hex}"


def new_message_id() -> str:
    # The same form as the ids the request handler gives answers (X-ChatStream-Last-Generated-Message-Id).
    return str(uuid.uuid4())


def check_conversation_id(conversation_id: str) -> None:
    """Conversation ids are 1 to 100 ASCII letters, digits, ``_``, ``-`` or ``.`` (they become parts of keys).

    Raises:
        ValueError: any other id.
    """
    if not isinstance(conversation_id, str) or not _ID_PATTERN.fullmatch(conversation_id):
        raise ValueError(f"a conversation id is 1 to 100 of A-Z a-z 0-9 _ - . , got {conversation_id!r:.120}")


def derive_title(text: str | None) -> str:
    """A title from the first user message: its words on one line, at most 60 characters."""
    words = " ".join((text or "").split())
    return words if len(words) <= _TITLE_LENGTH else words[: _TITLE_LENGTH - 1].rstrip() + "…"


def clean_title(title: str) -> str:
    """A title given by the user, on one line and trimmed.

    Raises:
        ValueError: not a string, or longer than 200 characters.
    """
    if not isinstance(title, str):
        raise ValueError(f"a title must be a string, got {type(title).__name__}")
    cleaned = " ".join(title.split())
    if len(cleaned) > MAX_TITLE_LENGTH:
        raise ValueError(f"a title has at most {MAX_TITLE_LENGTH} characters, got {len(cleaned)}")
    return cleaned


@dataclass(frozen=True)
class Feedback:
    """A like or dislike of one answer, with whatever the feedback form sent (any JSON value)."""

    is_like: bool
    form_data: Any = ""
    created_at: float = 0.0


@dataclass
class Message:
    """One message of a conversation.

    Attributes:
        id: unique within the conversation; for answers, the id the client saw in the response header.
        role: ``"user"``, ``"assistant"`` or ``"other"`` (see :data:`ROLES`).
        text: the text; None for an answer slot that was never filled.
        created_at: Unix time in seconds.
        name: the role label of the prompt format (e.g. ``"<human>"``), kept so that the prompt renders as before.
        children: extra inputs attached to a user message (the prompt classes' child messages).
        feedback: the user's like/dislike of an answer.
        generation_params: the sampling settings an answer was generated with (temperature, top_k_value, ...).
    """

    id: str
    role: str
    text: str | None
    created_at: float
    name: str = ""
    children: list[str] | None = None
    feedback: Feedback | None = None
    generation_params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError(f"a message needs a non-empty id, got {self.id!r}")
        if self.role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {self.role!r}")


def title_from_messages(messages: Sequence[Message]) -> str:
    """The title derived from the first user message with text ("" when there is none)."""
    first = next((m for m in messages if m.role == "user" and m.text), None)
    return derive_title(first.text) if first is not None else ""


@dataclass(frozen=True)
class ConversationSummary:
    """What a conversation list shows: everything but the prompt settings and the messages."""

    id: str
    owner: str
    title: str
    created_at: float
    updated_at: float
    version: int
    message_count: int


@dataclass
class Conversation:
    """One conversation of one owner.

    Attributes:
        id: the conversation id (``conv_`` + 32 hex digits when the store makes one).
        owner: who may read it; the stores treat another owner's id exactly like a missing one.
        title: derived from the first user message until it is renamed.
        created_at / updated_at: Unix time in seconds; lists are ordered by ``updated_at``, newest first.
        version: counts changes to the messages and prompt settings (not renames); writes based on a stale version
            fail with :class:`~chatstream.sessions.errors.Conflict`.
        prompt_class: the prompt class's ``module.QualName``; a name only, never imported.
        prompt_settings: what the prompt class needs besides the messages (its ``to_dict()`` without the history).
        messages: the history, oldest first.
    """

    id: str
    owner: str
    title: str
    created_at: float
    updated_at: float
    version: int
    prompt_class: str
    prompt_settings: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_conversation_id(self.id)
        if not self.owner:
            raise ValueError(f"a conversation needs an owner, got {self.owner!r}")
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version!r}")

    def summary(self) -> ConversationSummary:
        return ConversationSummary(
            self.id, self.owner, self.title, self.created_at, self.updated_at, self.version, len(self.messages)
        )

    def find_message(self, message_id: str) -> Message | None:
        return next((m for m in self.messages if m.id == message_id), None)

    def derived_title(self) -> str:
        """The title, or one derived from the first user message while there is none."""
        return self.title or title_from_messages(self.messages)


@dataclass(frozen=True)
class ConversationPage:
    """One page of an owner's conversations, newest first; pass ``next_after`` as ``after`` for the next page."""

    items: list[ConversationSummary]
    has_more: bool

    @property
    def next_after(self) -> str | None:
        return self.items[-1].id if self.has_more and self.items else None


# ---------------------------------------------------------------------------------------------- JSON


def encode_json(value: Any) -> str:
    """Compact JSON, UTF-8 text kept as is; NaN and infinities are refused (other tools could not read them)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def decode_json(text: str | bytes, key: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecord(key, f"not JSON ({exc})") from None


def message_to_json(message: Message) -> dict[str, Any]:
    feedback = message.feedback
    return {
        "id": message.id,
        "role": message.role,
        "name": message.name,
        "text": message.text,
        "children": list(message.children) if message.children is not None else None,
        "created_at": message.created_at,
        "feedback": None
        if feedback is None
        else {"is_like": feedback.is_like, "form_data": feedback.form_data, "created_at": feedback.created_at},
        "generation_params": message.generation_params,
    }


def message_from_json(data: Any, key: str) -> Message:
    """The inverse of :func:`message_to_json`; anything malformed raises :class:`CorruptRecord` naming ``key``."""
    fields = RecordFields(data, key, "message")
    feedback_data = fields.optional("feedback", dict)
    try:
        return Message(
            id=fields.required("id", str),
            role=fields.required("role", str),
            text=fields.optional("text", str),
            created_at=fields.number("created_at"),
            name=fields.optional("name", str) or "",
            children=_string_list(fields.optional("children", list), key),
            feedback=_feedback_from_json(feedback_data, key) if feedback_data is not None else None,
            generation_params=fields.optional("generation_params", dict),
        )
    except ValueError as exc:
        raise CorruptRecord(key, str(exc)) from None


def conversation_to_json(conversation: Conversation) -> dict[str, Any]:
    """The conversation as a self-describing JSON document (what exports and the Redis store hold)."""
    return {
        "object": "chatstream.conversation",
        "schema_version": RECORD_SCHEMA_VERSION,
        **summary_fields_to_json(conversation.summary()),
        "prompt_class": conversation.prompt_class,
        "prompt_settings": conversation.prompt_settings,
        "messages": [message_to_json(m) for m in conversation.messages],
    }


def summary_fields_to_json(summary: ConversationSummary) -> dict[str, Any]:
    return {
        "id": summary.id,
        "owner": summary.owner,
        "title": summary.title,
        "created_at": summary.created_at,
        "updated_at": summary.updated_at,
        "version": summary.version,
        "message_count": summary.message_count,
    }


def conversation_from_json(data: Any, key: str | None = None) -> Conversation:
    """The inverse of :func:`conversation_to_json`.

    Raises:
        CorruptRecord: a field is missing or has the wrong type (the message names ``key``, else the record's id).
        ForeignRecord: the document is not a conversation or has a newer schema version.
    """
    if key is None:
        found = data.get("id") if isinstance(data, dict) else None
        key = found if isinstance(found, str) else "?"
    fields = RecordFields(data, key, "conversation")
    if data.get("object") != "chatstream.conversation":
        raise ForeignRecord(key, f"not a chatstream conversation (object={data.get('object')!r})")
    schema = fields.integer("schema_version")
    if schema > RECORD_SCHEMA_VERSION:
        raise ForeignRecord(key, f"record schema version {schema} is newer than {RECORD_SCHEMA_VERSION}")
    messages = [message_from_json(m, key) for m in fields.required("messages", list)]
    return conversation_from_fields(fields, messages)


def conversation_from_fields(fields: RecordFields, messages: list[Message]) -> Conversation:
    """A Conversation from validated top-level fields (shared by the JSON form and the stores' rows)."""
    try:
        return Conversation(
            id=fields.required("id", str),
            owner=fields.required("owner", str),
            title=fields.required("title", str),
            created_at=fields.number("created_at"),
            updated_at=fields.number("updated_at"),
            version=fields.integer("version"),
            prompt_class=fields.required("prompt_class", str),
            prompt_settings=fields.required("prompt_settings", dict),
            messages=messages,
        )
    except ValueError as exc:
        raise CorruptRecord(fields.key, str(exc)) from None


class RecordFields:
    """Typed access to the fields of one decoded record; every failure is a :class:`CorruptRecord`."""

    def __init__(self, data: Any, key: str, what: str) -> None:
        if not isinstance(data, dict):
            raise CorruptRecord(key, f"the {what} is a {type(data).__name__}, not a JSON object")
        self.data = data
        self.key = key
        self.what = what

    def required(self, name: str, kind: type) -> Any:
        value = self.data.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise CorruptRecord(self.key, f"{self.what} field {name!r} must be a {kind.__name__}, got {value!r:.80}")
        return value

    def optional(self, name: str, kind: type) -> Any:
        return None if self.data.get(name) is None else self.required(name, kind)

    def number(self, name: str) -> float:
        value = self.data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CorruptRecord(self.key, f"{self.what} field {name!r} must be a number, got {value!r:.80}")
        return float(value)

    def integer(self, name: str) -> int:
        value = self.required(name, int)
        return int(value)


def _string_list(value: list[Any] | None, key: str) -> list[str] | None:
    if value is not None and not all(isinstance(item, str) for item in value):
        raise CorruptRecord(key, f"message children must be strings, got {value!r:.80}")
    return value


def _feedback_from_json(data: dict[str, Any], key: str) -> Feedback:
    fields = RecordFields(data, key, "feedback")
    return Feedback(
        is_like=fields.required("is_like", bool),
        form_data=data.get("form_data", ""),
        created_at=fields.number("created_at") if "created_at" in data else 0.0,
    )
