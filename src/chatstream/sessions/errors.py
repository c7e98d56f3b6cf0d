"""The exceptions of the session and conversation stores.

Each one names the record it is about, so that a request that meets it fails with a clear message while the server
keeps serving everyone else. The HTTP layer maps them to status codes in one place.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "ConversationNotFound",
    "CorruptRecord",
    "ForeignRecord",
    "MessageNotFound",
    "SchemaTooNew",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(Exception):
    """Base class of every store error."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or opened (a missing directory, Redis down, a locked file past its timeout)."""


class ConversationNotFound(StoreError):
    """No conversation with this id belongs to this owner (another owner's conversation reads as missing too)."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"conversation {conversation_id!r} not found")
        self.conversation_id = conversation_id


class MessageNotFound(StoreError):
    """The conversation has no message with this id."""

    def __init__(self, conversation_id: str, message_id: str) -> None:
        super().__init__(f"conversation {conversation_id!r} has no message {message_id!r}")
        self.conversation_id = conversation_id
        self.message_id = message_id


class Conflict(StoreError):
    """A write was based on a stale version: someone else changed the conversation first (HTTP 409)."""

    def __init__(self, conversation_id: str, expected_version: int | None, actual_version: int | None) -> None:
        if expected_version is None:
            text = f"conversation {conversation_id!r} already exists"
        else:
            text = (
                f"conversation {conversation_id!r} is at version {actual_version}, not {expected_version}: "
                "it was changed by another request; reload it and try again"
            )
        super().__init__(text)
        self.conversation_id = conversation_id
        self.expected_version = expected_version
        self.actual_version = actual_version


class CorruptRecord(StoreError):
    """A stored record cannot be read: broken JSON, a missing field, a value of the wrong type.

    ``key`` names the record (a conversation id or ``"session:<id>"``); ``reason`` says what is wrong with it.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"stored record {key!r} cannot be read: {reason}")
        self.key = key
        self.reason = reason


class ForeignRecord(CorruptRecord):
    """A well-formed record this application cannot use: a newer record schema, or a conversation of another prompt
    class than the one it is asked to rebuild."""


class SchemaTooNew(StoreUnavailable):
    """The database was written by a newer ChatStream (its schema version is above the newest this one knows)."""

    def __init__(self, location: str, found: int, newest: int) -> None:
        super().__init__(
            f"{location} has schema version {found}, newer than {newest} (the newest this ChatStream knows); "
            "upgrade ChatStream or use another store"
        )
        self.found = found
        self.newest = newest
