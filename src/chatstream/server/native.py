"""POST /chat_stream end to end, in the native wire protocol that existing clients parse.

:class:`NativeChat` owns the request: the role check, the body, the admission wait (200/429 ``too_many_requests``,
499 when the client left while waiting, 503 while draining), then the request handler (sessions/handler.py) finds the
user's history and hands it back to :meth:`NativeChat.run_turn`: role promotion, regenerate or append, the streamed
answer stored in the history.

The body is ``text/plain``, chunked; every chunk is the *cumulative* answer so far followed by ``<::EOS::>``. The
message id of the answer travels in the header ``X-ChatStream-Last-Generated-Message-Id``. Errors are small JSON
bodies in the seed's shapes. The wire format is in native_wire.py, the turn's body and its change to the history in
native_turn.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from chatstream.admission.admission import Draining, QueueFull, Slot
from chatstream.admission.generation import GenerationStream
from chatstream.config import SamplingOverrides
from chatstream.engine.base import EngineError, EngineOverloaded, FinishReason, GenerationRequest
from chatstream.request_builder import UnsupportedSampling
from chatstream.server.access import ClientRoles, role_checked
from chatstream.server.errors import PayloadTooLarge
from chatstream.server.fairness import queue_ticket_id, user_key
from chatstream.server.http import (
    DEFAULT_MAX_BODY_BYTES,
    DEV_TOOL_HEADER,
    MESSAGE_ID_HEADER,
    check_body_size,
    read_body,
)
from chatstream.server.native_turn import add_turn, bad_body, parse_chat_body
from chatstream.server.native_wire import (
    NativeStreamingResponse,
    chat_error_response,
    engine_error_response,
    internal_error,
    native_chunk,
    payload_too_large,
    service_unavailable,
    stream_fixed_text,
    too_many_requests,
)
from chatstream.service import ChatService
from chatstream.sessions.handler import (
    DISCONNECTED_BEFORE_STREAMING,
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    AbstractRequestHandler,
    ChatRequestError,
    Conversation,
    StreamingFinishedCallback,
)
from chatstream.sessions.keeper import ConversationKeeper

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

UserCallback = Callable[[Request, str], Any]
"""``callback(request, message)`` of ``handle_chat_stream_request``, sync or async."""


class NativeChat:
    """The /chat_stream endpoint of one service, serving histories through ``handler`` (attached here, together
    with the conversations: the store the default handler keeps them in)."""

    def __init__(
        self,
        service: ChatService,
        roles: ClientRoles,
        handler: AbstractRequestHandler,
        handler_logger: logging.Logger | None = None,
        conversations: ConversationKeeper | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={max_body_bytes!r} must be >= 1")
        self.service = service
        self.roles = roles
        self.handler = handler
        self.logger = handler_logger or logger
        self.max_body_bytes = max_body_bytes
        """The largest request body accepted (longer ones get 413 before they are read whole)."""
        self.conversations = conversations or ConversationKeeper("memory://", service.prompts)
        handler.attach(self, service.prompts, handler_logger, self.conversations)

    @role_checked("chat_stream")
    async def handle(
        self, request: Request, request_body: bytes | str | None = None, callback: UserCallback | None = None
    ) -> Response:
        """The response to POST /chat_stream; ``callback(request, message)`` is called once when it is done."""
        try:  # read before waiting: the wait polls for a disconnect
            if request_body is None:
                request_body = await read_body(request, self.max_body_bytes)
            else:
                check_body_size(request_body, self.max_body_bytes)
        except PayloadTooLarge as exc:
            return payload_too_large(exc)
        await self.service.startup()
        user, ticket_id = user_key(request, self.roles), queue_ticket_id(request)
        try:
            slot = await self.service.acquire_slot(request.is_disconnected, user, ticket_id)
        except QueueFull as exc:
            self.logger.info("queue full (%d waiting); rejected", self.service.admission.num_waiting)
            return too_many_requests(self.service.config.admission.reject_as_http_error, exc.retry_after)
        except Draining:
            return service_unavailable("the server is shutting down")
        if slot is None:
            await call_user_callback(callback, request, DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=499)
        return await self._serve(request, request_body, slot, callback)

    async def _serve(self, request: Request, body: bytes | str, slot: Slot, callback: UserCallback | None) -> Response:
        async def finished(req: Request, message: str) -> None:
            slot.release()
            await call_user_callback(callback, req, message)

        try:
            return await self.handler.process_request(request, body, finished)
        except ChatRequestError as exc:
            await finished(request, f"{UNKNOWN_ERROR},{exc.reason}")
            return chat_error_response(exc)
        except Exception:
            self.logger.exception("the request handler failed")
            await finished(request, f"{UNKNOWN_ERROR},while process_request")
            return internal_error("generating response")

    # ----- the turn (what request handlers call back into) -----

    async def run_turn(
        self,
        request: Request,
        request_body: bytes | str | None,
        conversation: Conversation,
        finished: StreamingFinishedCallback,
    ) -> Response:
        """Run one turn on ``conversation`` and return the streaming response. Raises ChatRequestError."""
        turn = parse_chat_body(request_body if request_body is not None else await self._read_body(request))

        async def commit(message: str) -> None:
            if message in (SUCCESS, DISCONNECTED_WHILE_STREAMING):
                saved = conversation.save()
                if inspect.isawaitable(saved):
                    await saved

        async def finish(message: str) -> None:
            await finished(request, message)

        promoted = self.promote(request, turn.user_input, finish)
        if promoted is not None:
            return promoted
        undo = add_turn(conversation.chat_prompt, turn)
        opened = await self._open(request, conversation, undo, finish)
        if isinstance(opened, Response):
            return opened
        message_id = str(uuid.uuid4())
        chunks = self._chunks(conversation.chat_prompt, opened, finish, message_id, commit)

        async def abandoned() -> None:
            await opened.aclose()  # the body never started: abort the request and report the disconnect ourselves
            await finish(DISCONNECTED_BEFORE_STREAMING)

        return NativeStreamingResponse(chunks, abandoned, headers={MESSAGE_ID_HEADER: message_id})

    async def _read_body(self, request: Request) -> bytes:
        try:
            return await read_body(request, self.max_body_bytes)
        except PayloadTooLarge as exc:
            raise bad_body(exc.message) from None

    async def _open(
        self,
        request: Request,
        conversation: Conversation,
        undo: Callable[[], None],
        finish: Callable[[str], Awaitable[None]],
    ) -> GenerationStream | Response:
        """Start the turn's generation and wait for its first delta; when it cannot start, undo the turn and answer
        in the native shape (the engine full: as a full queue; the engine failing: 503; the client gone: 499)."""
        try:
            gen_request = await self._prepare(
                conversation.chat_prompt, conversation.overrides, conversation.conversation_id
            )
        except ChatRequestError:
            undo()
            raise
        try:
            opened = await self.service.open_generation(gen_request, request.is_disconnected)
        except EngineError as exc:
            undo()
            self.logger.warning("the engine cannot start the turn: %s", exc)
            overloaded = isinstance(exc, EngineOverloaded)
            await finish(f"{UNKNOWN_ERROR},{'engine overloaded' if overloaded else 'engine unavailable'}")
            return engine_error_response(exc, self.service.config.admission.reject_as_http_error)
        if opened is None:
            undo()
            await finish(DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=499)
        return opened

    async def _prepare(
        self, chat_prompt: AbstractChatPrompt, overrides: SamplingOverrides | None, conversation_id: str | None
    ) -> GenerationRequest:
        """The engine request (fitted to the context off the event loop); ChatRequestError for sampling the engine
        cannot do."""
        try:
            return await self.service.requests.prepare_request(chat_prompt, overrides, conversation_id)
        except UnsupportedSampling as exc:
            raise ChatRequestError(str(exc), reason=f"bad request: {exc}") from None

    def _build_request(
        self, chat_prompt: AbstractChatPrompt, overrides: SamplingOverrides | None, conversation_id: str | None
    ) -> GenerationRequest:
        try:
            return self.service.requests.build_request(chat_prompt, overrides, conversation_id)
        except UnsupportedSampling as exc:
            raise ChatRequestError(str(exc), reason=f"bad request: {exc}") from None

    def stream_answer(
        self,
        chat_prompt: AbstractChatPrompt,
        finished: Callable[[str], Awaitable[None]],
        overrides: SamplingOverrides | None,
        message_id: str | None,
        conversation_id: str | None,
        commit: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """Native chunks for the pending answer of ``chat_prompt``; the answer (partial on disconnect) is stored in
        it with ``message_id``, ``commit`` is awaited before the last chunk (a failed commit cuts the stream short),
        then ``finished`` gets "success", "client_disconnected_while_streaming" or "unknown_error_occurred,...".
        Raises ChatRequestError for sampling the engine cannot do."""
        gen_request = self._build_request(chat_prompt, overrides, conversation_id)
        return self._chunks(chat_prompt, self.service.start_generation(gen_request), finished, message_id, commit)

    async def _chunks(
        self,
        chat_prompt: AbstractChatPrompt,
        stream: GenerationStream,
        finished: Callable[[str], Awaitable[None]],
        message_id: str | None,
        commit: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[str, None]:
        answer = _KeptAnswer(chat_prompt, message_id, commit)
        outcome = stream.outcome
        message = f"{UNKNOWN_ERROR},while generating"
        try:
            shown = ""
            async with aclosing(stream.deltas()) as deltas:  # closing aborts the request on disconnect
                async for delta in deltas:
                    text = outcome.text.lstrip()
                    if delta.text and text and not delta.finished:  # the last piece waits for the commit
                        shown = text
                        yield native_chunk(text)
            ended = SUCCESS
            if outcome.finish_reason is FinishReason.ERROR:
                self.logger.warning("generation %s failed: %s", stream.request.request_id, outcome.error)
                ended = message
            message = f"{UNKNOWN_ERROR},while saving the conversation"
            await answer.keep(outcome.text, ended)
            message = ended
            if outcome.text.lstrip() != shown or not shown:
                yield native_chunk(outcome.text.lstrip())
        except EngineError as exc:  # a stream that was not opened first failed before its first delta
            self.logger.warning("generation %s failed: %s", stream.request.request_id, exc)
        except (asyncio.CancelledError, GeneratorExit):
            message = DISCONNECTED_WHILE_STREAMING
            raise
        finally:
            try:
                await answer.keep(outcome.text, message)  # a disconnect or a failure: the partial answer
            finally:
                await finished(message)

    def promote(
        self, request: Request, user_input: str | None, finish: Callable[[str], Awaitable[None]]
    ) -> Response | None:
        """When ``user_input`` is a role pass phrase, grant the role and answer with a short native stream."""
        granted = self.roles.try_promote(request, user_input)
        if granted is None:
            return None
        self.logger.info("client role %r granted by pass phrase", granted.name)
        headers = {DEV_TOOL_HEADER: "enabled"} if granted.enable_dev_tool else {}

        async def done() -> None:
            await finish(SUCCESS)

        async def abandoned() -> None:
            await finish(DISCONNECTED_BEFORE_STREAMING)

        body = stream_fixed_text(f"New role: '{granted.name}' has been granted", done)
        return NativeStreamingResponse(body, abandoned, headers=headers)


class _KeptAnswer:
    """Stores the answer in the prompt object and commits it, once, whichever way the stream ends."""

    def __init__(
        self,
        chat_prompt: AbstractChatPrompt,
        message_id: str | None,
        commit: Callable[[str], Awaitable[None]] | None,
    ) -> None:
        self.chat_prompt = chat_prompt
        self.message_id = message_id
        self.commit = commit
        self.done = False

    async def keep(self, text: str, message: str) -> None:
        """Store ``text`` as the answer and commit it with the stream's outcome ``message``; a failed commit is
        logged and raised (the stream is cut short)."""
        if self.done:
            return
        self.done = True
        if self.chat_prompt.is_chat_mode_enabled():
            self.chat_prompt.set_responder_last_msg(text.strip())
            if self.message_id:
                self.chat_prompt.set_responder_last_msg_id(self.message_id)
        if self.commit is not None:
            try:
                await asyncio.shield(self.commit(message))  # a disconnect must not cut a write in half
            except Exception:
                logger.exception("the turn could not be saved; the answer is cut short")
                raise


async def call_user_callback(callback: UserCallback | None, request: Request, message: str) -> None:
    """Call the user's ``callback(request, message)``, awaiting it when it is async."""
    if callback is None:
        return
    result = callback(request, message)
    if inspect.isawaitable(result):
        await result
