"""ServerContext: what the HTTP layer serves, handed to every endpoint and middleware of server/.

The chat service itself has no HTTP in it; the context adds what only HTTP needs: who may call what (client roles),
the /chat_stream endpoint with its request handler and the conversations (where histories live), the API keys of
the OpenAI endpoints and the feedback hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from chatstream.server.access import ClientRoles
from chatstream.server.native import NativeChat
from chatstream.service import ChatService
from chatstream.sessions.handler import AbstractRequestHandler
from chatstream.sessions.keeper import ConversationKeeper

FeedbackHook = Callable[[dict[str, Any]], Any]
"""Called with the feedback record of POST /set_feedback (sync or async)."""


@dataclass(frozen=True)
class ServerContext:
    """The service plus the HTTP-only settings.

    Attributes:
        service: the chat service (engine, admission, metrics, sampling, prompts, locale).
        roles: the validated client roles.
        chat: the /chat_stream endpoint; it holds the request handler.
        api_keys: keys accepted by the OpenAI endpoints (none: the client role decides).
        on_feedback_received: the hook of POST /set_feedback.
    """

    service: ChatService
    roles: ClientRoles
    chat: NativeChat
    api_keys: tuple[str, ...] = ()
    on_feedback_received: FeedbackHook | None = None

    @property
    def request_handler(self) -> AbstractRequestHandler:
        return self.chat.handler

    @property
    def conversations(self) -> ConversationKeeper:
        """Where the users' conversations are kept (the store, its lifecycle, the session's user and current id)."""
        return self.chat.conversations

    @property
    def keeps_history_in_session(self) -> bool:
        """True when histories live in the HTTP session (the session APIs work only then)."""
        get_type = getattr(self.request_handler, "get_request_handler_type", None)
        return not callable(get_type) or get_type() == "http_session"


class HasServerContext(Protocol):
    """Anything that carries a server context (``ChatStream`` does)."""

    @property
    def server_context(self) -> ServerContext: ...


def context_of(source: ServerContext | HasServerContext) -> ServerContext:
    """The context itself, or the one ``source`` carries."""
    return source if isinstance(source, ServerContext) else source.server_context
