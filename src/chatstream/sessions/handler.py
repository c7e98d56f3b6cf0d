"""Request handlers: where a user's chat history lives and how one chat turn is handled.

``AbstractRequestHandler`` holds the turn itself (parse the body, role promotion, regenerate or append, stream the
answer in the native format, keep the answer in the history). Subclasses decide only where the history is loaded
from and saved to; :class:`SimpleSessionRequestHandler` keeps it in the HTTP session, as the original did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from chatstream.admission.generation import GenerationOutcome, run_generation
from chatstream.engine.base import FinishReason
from chatstream.server import native
from chatstream.sessions.middleware import session_skipped

if TYPE_CHECKING:
    from chatstream.chat_stream import ChatStream
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

StreamingFinishedCallback = Callable[[Request, str], Awaitable[None]]
"""Called once per request with "success", "client_disconnected_while_streaming", "unknown_error_occurred...",
or "client_disconnected_before_streaming" (the last only by ChatStream's admission wait)."""

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"


class BadChatRequest(ValueError):
    """The request body is not a valid chat turn; the message names the field."""


@dataclass(frozen=True)
class ChatTurnInput:
    """A parsed /chat_stream body."""

    user_input: str | None
    regenerate: bool


def parse_chat_body(raw: bytes | str) -> ChatTurnInput:
    """Validate ``{"user_input": str, "regenerate": bool}``; regenerate needs no user_input."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadChatRequest('the request body must be JSON like {"user_input": "..."}') from None
    if not isinstance(data, dict):
        raise BadChatRequest("the request body must be a JSON object")
    regenerate = data.get("regenerate", False)
    if regenerate is not True and regenerate not in (False, None):
        raise BadChatRequest("'regenerate' must be a boolean")
    user_input = data.get("user_input")
    if regenerate is True:
        if user_input is not None and not isinstance(user_input, str):
            raise BadChatRequest("'user_input' must be a string or null")
        return ChatTurnInput(user_input=user_input, regenerate=True)
    if "user_input" not in data:
        raise BadChatRequest("'user_input' is missing")
    if not isinstance(user_input, str):
        raise BadChatRequest("'user_input' must be a string")
    return ChatTurnInput(user_input=user_input, regenerate=False)


class AbstractRequestHandler(ABC):
    """Handles one /chat_stream request: loads the user's history, runs the turn, saves the history.

    ChatStream sets ``chat_stream``, ``chat_prompt_clazz``, ``tokenizer`` and ``logger`` on its handler. Subclass
    and implement :meth:`process_request` (usually by loading the history and calling :meth:`handle_turn`) to keep
    histories elsewhere, e.g. in a database keyed by a logged-in user.
    """

    def __init__(self) -> None:
        self.chat_stream: ChatStream | None = None
        self.chat_prompt_clazz: type[AbstractChatPrompt] | None = None
        self.tokenizer: Any = None
        self.logger: logging.Logger = logger

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
        """Return the response for one chat request; ``streaming_finished_callback`` must be called exactly once."""

    @abstractmethod
    def get_request_handler_type(self) -> str:
        """A short name of where histories are kept."""

    async def handle_turn(
        self,
        request: Request,
        request_body: bytes | str | None,
        chat_prompt: AbstractChatPrompt,
        save: Callable[[], None],
        streaming_finished_callback: StreamingFinishedCallback,
        generation_params: dict[str, Any] | None = None,
        conversation_id: str | None = None,
    ) -> Response:
        """Run one turn on ``chat_prompt`` and return the native streaming response (or a JSON error)."""

        async def finish(message: str) -> None:
            if message in (SUCCESS, DISCONNECTED_WHILE_STREAMING):
                save()
            await streaming_finished_callback(request, message)

        try:
            raw = request_body if request_body is not None else await request.body()
            turn = parse_chat_body(raw)
        except BadChatRequest as e:
            await streaming_finished_callback(request, f"{UNKNOWN_ERROR},bad request: {e}")
            return native.bad_request(str(e))

        promoted = self.detect_special_command_for_role_promotion(request, turn.user_input, finish)
        if promoted is not None:
            return promoted

        if turn.regenerate:
            if chat_prompt.is_empty():
                await streaming_finished_callback(request, f"{UNKNOWN_ERROR},regenerate on an empty history")
                return native.bad_request("'regenerate' needs a previous answer; the conversation is empty")
            chat_prompt.clear_last_responder_message()
        else:
            chat_prompt.add_requester_msg(turn.user_input)
            chat_prompt.add_responder_msg(None)

        message_id = str(uuid.uuid4())
        chunks = self.generate(chat_prompt, finish, request, generation_params, message_id, conversation_id)

        async def abandoned() -> None:
            await chunks.aclose()  # never started: closing runs nothing, so report the disconnect ourselves
            await finish(DISCONNECTED_BEFORE_STREAMING)

        return native.NativeStreamingResponse(chunks, abandoned, headers={native.MESSAGE_ID_HEADER: message_id})

    async def generate(
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
        chat_stream = self._require_chat_stream()
        gen_request = chat_stream.build_generation_request(chat_prompt, custom_generation_params, conversation_id)
        outcome = GenerationOutcome()
        message = f"{UNKNOWN_ERROR},while generating"
        sent = False
        try:
            deltas = run_generation(chat_stream.engine, gen_request, chat_stream.metrics, outcome)
            async with contextlib.aclosing(deltas):  # closing aborts the engine request on disconnect
                async for delta in deltas:
                    shown = outcome.text.lstrip()
                    if delta.text and shown:
                        sent = True
                        yield native.native_chunk(shown)
            if not sent:
                yield native.native_chunk("")
            if outcome.finish_reason is FinishReason.ERROR:
                self.logger.warning("generation %s failed: %s", gen_request.request_id, outcome.error)
            else:
                message = SUCCESS
        except (asyncio.CancelledError, GeneratorExit):
            message = DISCONNECTED_WHILE_STREAMING
            raise
        finally:
            if chat_prompt.is_chat_mode_enabled():
                chat_prompt.set_responder_last_msg(outcome.text.strip())
                if message_id:
                    chat_prompt.set_responder_last_msg_id(message_id)
            await chat_generation_finished_callback(message)

    def detect_special_command_for_role_promotion(
        self, request: Request, user_input: str | None, finish: Callable[[str], Awaitable[None]]
    ) -> Response | None:
        """When ``user_input`` is a role pass phrase, grant the role and answer with a short native stream."""
        chat_stream = self._require_chat_stream()
        granted = chat_stream.client_roles.try_promote(request, user_input)
        if granted is None:
            return None
        headers = {native.DEV_TOOL_HEADER: "enabled"} if granted.enable_dev_tool else {}
        text = f"New role: '{granted.name}' has been granted"
        self.logger.info("client role %r granted by pass phrase", granted.name)

        async def done() -> None:
            await finish(SUCCESS)

        body = native.stream_fixed_text(text, done)

        async def abandoned() -> None:
            await finish(DISCONNECTED_BEFORE_STREAMING)

        return native.NativeStreamingResponse(body, abandoned, headers=headers)

    def _require_chat_stream(self) -> ChatStream:
        if self.chat_stream is None:
            raise RuntimeError("this request handler is not attached to a ChatStream")
        return self.chat_stream


class SimpleSessionRequestHandler(AbstractRequestHandler):
    """Keeps each user's history (a prompt-class object) in the HTTP session under "chat_prompt".

    Works with fastsession's FastSessionMiddleware and with ChatStream's own session middleware: both put an object
    with ``get_session()`` / ``save_session()`` at ``request.state.<session_attr_name>``.
    """

    def __init__(self, session_attr_name: str = "session") -> None:
        super().__init__()
        self.session_attr = session_attr_name

    def get_request_handler_type(self) -> str:
        return "http_session"

    async def process_request(
        self, request: Request, request_body: bytes | str | None, streaming_finished_callback: StreamingFinishedCallback
    ) -> Response:
        session_mgr = getattr(request.state, self.session_attr, None)
        if session_mgr is None and session_skipped(request):
            await streaming_finished_callback(request, f"{UNKNOWN_ERROR},no session")
            return native.bad_request(
                "/chat_stream keeps the conversation in a session, and this request asked for none (session skip "
                "header); send the session cookie instead, or use POST /v1/chat/completions"
            )
        if session_mgr is None:
            await streaming_finished_callback(request, f"{UNKNOWN_ERROR},no session")
            return native.internal_error(
                "Sessions are not available. Add a session middleware: chat_stream.append_middlewares(app) or "
                "fastsession's FastSessionMiddleware, so that each user's conversation can be kept."
            )
        session = session_mgr.get_session()
        chat_prompt = session.get("chat_prompt")
        if chat_prompt is None:
            chat_prompt = self._require_chat_stream().new_chat_prompt()
            session["chat_prompt"] = chat_prompt
            session_mgr.save_session()
        return await self.handle_turn(
            request,
            request_body,
            chat_prompt,
            session_mgr.save_session,
            streaming_finished_callback,
            generation_params=session.get("generation_params"),
            conversation_id=_session_id(session_mgr),
        )


def _session_id(session_mgr: Any) -> str | None:
    get_id = getattr(session_mgr, "get_session_id", None)
    return str(get_id()) if callable(get_id) else None
