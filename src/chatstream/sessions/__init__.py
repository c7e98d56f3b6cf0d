"""Sessions and conversations: the session middleware, and the stores behind one async interface.

``open_store(url)`` gives a :class:`Store` (memory, SQLite or Redis); ``store.sessions`` holds each HTTP session's
small JSON data, ``store.conversations`` the conversation records. The prompt-object bridge is
:mod:`chatstream.sessions.prompt_bridge`; the exports are :mod:`chatstream.sessions.export`.
"""

from chatstream.sessions.base import AsyncSessionStore, ConversationStore, SessionData, Store, run_retention
from chatstream.sessions.errors import (
    Conflict,
    ConversationNotFound,
    CorruptRecord,
    ForeignRecord,
    MessageNotFound,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from chatstream.sessions.records import (
    Conversation,
    ConversationPage,
    ConversationSummary,
    Feedback,
    Message,
)
from chatstream.sessions.retention import RetentionPolicy
from chatstream.sessions.urls import open_store

__all__ = [
    "AsyncSessionStore",
    "Conflict",
    "Conversation",
    "ConversationNotFound",
    "ConversationPage",
    "ConversationStore",
    "ConversationSummary",
    "CorruptRecord",
    "Feedback",
    "ForeignRecord",
    "Message",
    "MessageNotFound",
    "RetentionPolicy",
    "SchemaTooNew",
    "SessionData",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
    "run_retention",
]
