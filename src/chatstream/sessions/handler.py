"""Request handlers: where a user's chat history lives.

The /chat_stream endpoint (server/native.py) checks the role, waits for a slot, then asks the request handler for the
response. A handler finds the user's history and hands it back to the endpoint's turn (:meth:`handle_turn`): body,
role promotion, regenerate or append, the streamed answer, the history saved. Subclasses decide only where histories
are loaded from and saved to; :class:`SimpleSessionRequestHandler` keeps them in the HTTP session, as the original did.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from chatstream.config import SamplingOverrides
from chatstream.sessions.errors import Conflict, ConversationNotFound, StoreError, StoreUnavailable
from chatstream.sessions.keeper import ConversationKeeper
from chatstream.sessions.lookup import find_session
from chatstream.sessions.middleware import session_skipped
from chatstream.sessions.turns import CONVERSATION_ID_HEADER, commit_turn, open_for_turn, requested_conversation_id

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt
    from chatstream.service import PromptFactory

logger = logging.getLogger(__name__)

StreamingFinishedCallback = Callable[[Request, str], Awaitable[None]]
"""Called once per request with "success", "client_disconnected_while_streaming", "unknown_error_occurred...",
or "client_disconnected_before_streaming"."""

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"

SaveHistory = Callable[[], Awaitable[None] | None]
"""Persists a history: a plain function (the original's handlers) or a coroutine function (a store write)."""


class ChatRequestError(Exception):
    """A chat request that cannot be served as sent; the endpoint answers ``status`` with ``detail``.

    Attributes:
        detail: what is wrong, for the client (names the field for bad input).
        status: 400 for the client's mistakes (404: an unknown conversation, 409: a conflicting write), 500 for the
            server's (503: the store is unreachable).
        reason: what the finished-callback is told after "unknown_error_occurred,".
    """

    def __init__(self, detail: str, *, status: int = 400, reason: str = "bad request") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.reason = reason


@dataclass
class Conversation:
    """One user's chat as a request handler found it.

    Attributes:
        chat_prompt: the history (a prompt-class object); the turn appends to it and stores the answer in it.
        save: persists the history (called once the answer is complete, or cut short by a disconnect, before the
            stream's last chunk); may be a coroutine function.
        overrides: the conversation's own sampling values (POST /set_generation_params).
        conversation_id: a stable id of the conversation (lets the engine keep its KV cache between turns).
    """

    chat_prompt: AbstractChatPrompt
    save: SaveHistory
    overrides: SamplingOverrides | None = None
    conversation_id: str | None = None


class ChatTurns(Protocol):
    """What a request handler asks of the /chat_stream endpoint that calls it (server/native.py implements it)."""

    async def run_turn(
        self,
        request: Request,
        request_body: bytes | str | None,
        conversation: Conversation,
        finished: StreamingFinishedCallback,
    ) -> Response:
        """Run one turn on ``conversation`` and return the native streaming response."""

    def stream_answer(
        self,
        chat_prompt: AbstractChatPrompt,
        finished: Callable[[str], Awaitable[None]],
        overrides: SamplingOverrides | None,
        message_id: str | None,
        conversation_id: str | None,
        commit: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """Native chunks for the pending answer of ``chat_prompt``; the answer is stored in it and ``commit`` is
        awaited with the outcome before the last chunk."""

    def promote(
        self, request: Request, user_input: str | None, finish: Callable[[str], Awaitable[None]]
    ) -> Response | None:
        """The role-grant response when ``user_input`` is a pass phrase, else None."""


class AbstractRequestHandler(ABC):
    """Handles one /chat_stream request: finds the user's history, runs the turn on it, saves it.

    ChatStream attaches its handler to the /chat_stream endpoint (:meth:`attach`), which also sets the original's
    ``chat_prompt_clazz``, ``tokenizer`` and ``logger``. Subclass and implement :meth:`process_request` (usually by
    loading the history and calling :meth:`handle_turn`) to keep histories elsewhere, e.g. in a database keyed by a
    logged-in user.
    """

    def __init__(self) -> None:
        self.turns: ChatTurns | None = None
        self.chat_prompt_clazz: type[AbstractChatPrompt] | None = None
        self.tokenizer: Any = None
        self.logger: logging.Logger = logger
        self.conversations: ConversationKeeper | None = None

    def attach(
        self,
        turns: ChatTurns,
        prompts: PromptFactory,
        handler_logger: logging.Logger | None = None,
        conversations: ConversationKeeper | None = None,
    ) -> None:
        """Connect this handler to the endpoint that calls it, to the service's prompt class and tokenizer, and to
        the ChatStream's conversation store (``self.conversations``, for handlers that keep histories there)."""
        self.turns = turns
        self.chat_prompt_clazz = prompts.prompt_class
        self.tokenizer = prompts.tokenizer
        if handler_logger is not None:
            self.logger = handler_logger
        if conversations is not None:
            self.conversations = conversations

    def require_conversations(self) -> ConversationKeeper:
        """The conversation store this handler is attached to."""
        if self.conversations is None:
            raise RuntimeError("this request handler is not attached to a ChatStream's conversations (see attach)")
        return self.conversations

    def create_chat_prompt(self) -> AbstractChatPrompt:
        """A new, empty history of the configured prompt class, with the tokenizer attached."""
        if self.chat_prompt_clazz is None:
            raise RuntimeError("chat_prompt_clazz is not set; pass chat_prompt_clazz= to ChatStream")
        chat_prompt = self.chat_prompt_clazz()
        chat_prompt.set_tokenizer(self.tokenizer)
        return chat_prompt

    @abstractmethod
    async def process_request(
        self, request: Request, request_body: bytes | str | None, streaming_finished_callback: StreamingFinishedCallback
    ) -> Response:
        """Return the response for one chat request; ``streaming_finished_callback`` must be called exactly once
        (unless :class:`ChatRequestError` is raised: the endpoint then calls it)."""

    @abstractmethod
    def get_request_handler_type(self) -> str:
        """A short name of where histories are kept."""

    async def handle_turn(
        self,
        request: Request,
        request_body: bytes | str | None,
        chat_prompt: AbstractChatPrompt,
        save: SaveHistory,
        streaming_finished_callback: StreamingFinishedCallback,
        generation_params: dict[str, Any] | None = None,
        conversation_id: str | None = None,
    ) -> Response:
        """Run one turn on ``chat_prompt`` and return the native streaming response.

        ``generation_params`` is the session's ``{"temperature", "top_k_value", "top_p_value"}``; ``save`` persists
        the history (a plain or a coroutine function, called before the stream's last chunk). Raises
        :class:`ChatRequestError` for a body that is no valid chat turn.
        """
        overrides = SamplingOverrides.from_seed_params(generation_params)
        conversation = Conversation(chat_prompt, save, overrides, conversation_id)
        return await self._require_turns().run_turn(request, request_body, conversation, streaming_finished_callback)

    def generate(
        self,
        chat_prompt: AbstractChatPrompt,
        chat_generation_finished_callback: Callable[[str], Awaitable[None]],
        request: Request | None,
        custom_generation_params: dict[str, Any] | None,
        message_id: str | None = None,
        conversation_id: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """Native chunks (cumulative answer + ``<::EOS::>``) for the pending answer of ``chat_prompt``.

        The answer (partial on disconnect) is stored as the last responder message with ``message_id``; the callback
        gets "success", "client_disconnected_while_streaming" or "unknown_error_occurred,...".
        """
        overrides = SamplingOverrides.from_seed_params(custom_generation_params)
        turns = self._require_turns()
        return turns.stream_answer(
            chat_prompt, chat_generation_finished_callback, overrides, message_id, conversation_id
        )

    def detect_special_command_for_role_promotion(
        self, request: Request, user_input: str | None, finish: Callable[[str], Awaitable[None]]
    ) -> Response | None:
        """When ``user_input`` is a role pass phrase, grant the role and answer with a short native stream."""
        return self._require_turns().promote(request, user_input, finish)

    def _require_turns(self) -> ChatTurns:
        if self.turns is None:
            raise RuntimeError("this request handler is not attached to a /chat_stream endpoint (see ChatStream)")
        return self.turns


class SimpleSessionRequestHandler(AbstractRequestHandler):
    """Keeps each user's conversations in ChatStream's store, and in the HTTP session who the user is and which
    conversation is current (see :mod:`chatstream.sessions.turns`).

    Works with ChatStream's own session middleware and with fastsession's FastSessionMiddleware: both put an object
    with ``get_session()`` / ``save_session()`` at ``request.state.<session_attr_name>``. Where the session holds
    live objects (fastsession, a memory store) the prompt object of the last turn is also left at
    ``session["chat_prompt"]``, as the original package kept it, for code that reads it.
    """

    def __init__(self, session_attr_name: str = "session") -> None:
        super().__init__()
        self.session_attr = session_attr_name

    def get_request_handler_type(self) -> str:
        return "http_session"

    async def process_request(
        self, request: Request, request_body: bytes | str | None, streaming_finished_callback: StreamingFinishedCallback
    ) -> Response:
        found = find_session(request, self.session_attr)
        if found is None:
            raise _no_session_error(request)
        keeper = self.require_conversations()
        body = request_body if request_body is not None else await request.body()
        try:
            requested = requested_conversation_id(body, request.headers.get(CONVERSATION_ID_HEADER))
            turn = await open_for_turn(keeper, found, requested)
        except ValueError as exc:
            raise ChatRequestError(str(exc), reason=f"bad request: {exc}") from None
        except StoreError as exc:
            raise store_request_error(exc) from None
        params = found.data.get("generation_params")

        async def save() -> None:
            await commit_turn(keeper, found, turn, params)

        response = await self.handle_turn(
            request, body, turn.prompt, save, streaming_finished_callback, params, turn.conversation_id
        )
        response.headers[CONVERSATION_ID_HEADER] = turn.conversation_id
        return response


def store_request_error(exc: StoreError) -> ChatRequestError:
    """The /chat_stream answer to a store failure: 404 for a conversation the user does not have, 409 for a
    conflict, 503 when the store is unreachable, 500 naming the record for one that cannot be read."""
    if isinstance(exc, ConversationNotFound):
        return ChatRequestError(str(exc), status=404, reason="conversation not found")
    if isinstance(exc, Conflict):
        return ChatRequestError(str(exc), status=409, reason="conversation changed")
    if isinstance(exc, StoreUnavailable):
        logger.error("the conversation store is unavailable: %s", exc)
        return ChatRequestError(f"the conversation store is unavailable: {exc}", status=503, reason="store down")
    logger.error("%s", exc)
    return ChatRequestError(str(exc), status=500, reason="unreadable conversation")


def _no_session_error(request: Request) -> ChatRequestError:
    if session_skipped(request):
        return ChatRequestError(
            "/chat_stream keeps the conversation in a session, and this request asked for none (session skip "
            "header); send the session cookie instead, or use POST /v1/chat/completions",
            reason="no session",
        )
    return ChatRequestError(
        "Sessions are not available. Add a session middleware: chat_stream.append_middlewares(app) or "
        "fastsession's FastSessionMiddleware, so that each user's conversation can be kept.",
        status=500,
        reason="no session",
    )
