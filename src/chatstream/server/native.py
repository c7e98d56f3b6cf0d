"""POST /chat_stream end to end, in the native wire protocol that existing clients parse.

:class:`NativeChat` owns the request: the role check, the body, the admission wait (200/429 ``too_many_requests``,
499 when the client left while waiting, 503 while draining), then the request handler (sessions/handler.py) finds the
user's history and hands it back to :meth:`NativeChat.run_turn`: role promotion, regenerate or append, the streamed
answer stored in the history.

The body is ``text/plain``, chunked; every chunk is the *cumulative* answer so far followed by ``<::EOS::>``. The
message id of the answer travels in the header ``X-ChatStream-Last-Generated-Message-Id``. Errors are small JSON
bodies in the seed's shapes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from chatstream.admission.admission import Draining, QueueFull, Slot
from chatstream.admission.generation import GenerationStream
from chatstream.config import SamplingOverrides
from chatstream.engine.base import EngineError, EngineOverloaded, FinishReason, GenerationRequest
from chatstream.request_builder import UnsupportedSampling
from chatstream.server.access import ClientRoles, role_checked
from chatstream.server.errors import BadRequest, PayloadTooLarge
from chatstream.server.fairness import queue_ticket_id, user_key
from chatstream.server.http import (
    DEFAULT_MAX_BODY_BYTES,
    DEV_TOOL_HEADER,
    MESSAGE_ID_HEADER,
    check_body_size,
    parse_json_object,
    read_body,
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

FINISH_TOKEN = "<::EOS::>"

UserCallback = Callable[[Request, str], Any]
"""``callback(request, message)`` of ``handle_chat_stream_request``, sync or async."""


@dataclass(frozen=True)
class ChatTurnInput:
    """A parsed /chat_stream body."""

    user_input: str | None
    regenerate: bool


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
            raise _bad_body(exc.message) from None

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


def parse_chat_body(raw: bytes | str) -> ChatTurnInput:
    """Validate ``{"user_input": str, "regenerate": bool}``; regenerate needs no user_input. Raises ChatRequestError
    naming the field."""
    try:
        data = parse_json_object(raw, example='{"user_input": "..."}')
    except BadRequest as exc:
        raise _bad_body(exc.message) from None
    regenerate = data.get("regenerate", False)
    if regenerate is not True and regenerate not in (False, None):
        raise _bad_body("'regenerate' must be a boolean")
    user_input = data.get("user_input")
    if regenerate is True:
        if user_input is not None and not isinstance(user_input, str):
            raise _bad_body("'user_input' must be a string or null")
        return ChatTurnInput(user_input=user_input, regenerate=True)
    if "user_input" not in data:
        raise _bad_body("'user_input' is missing")
    if not isinstance(user_input, str):
        raise _bad_body("'user_input' must be a string")
    return ChatTurnInput(user_input=user_input, regenerate=False)


def add_turn(chat_prompt: AbstractChatPrompt, turn: ChatTurnInput) -> Callable[[], None]:
    """Append the user's message and an empty answer slot, or (regenerate) empty the last answer; returns what undoes
    it (for a turn that could not start)."""
    if not turn.regenerate:
        chat_prompt.add_requester_msg(turn.user_input)
        chat_prompt.add_responder_msg(None)

        def remove() -> None:
            chat_prompt.remove_last_responder_msg()
            chat_prompt.remove_last_requester_msg()

        return remove
    if chat_prompt.is_empty():
        detail = "'regenerate' needs a previous answer; the conversation is empty"
        raise ChatRequestError(detail, reason="regenerate on an empty history")
    last = chat_prompt.chat_contents[-1]
    previous = last.get_message()
    chat_prompt.clear_last_responder_message()
    return lambda: last.set_message(previous)


def _bad_body(detail: str) -> ChatRequestError:
    return ChatRequestError(detail, reason=f"bad request: {detail}")


async def call_user_callback(callback: UserCallback | None, request: Request, message: str) -> None:
    """Call the user's ``callback(request, message)``, awaiting it when it is async."""
    if callback is None:
        return
    result = callback(request, message)
    if inspect.isawaitable(result):
        await result


# ----- the wire format -----


class NativeStreamingResponse(StreamingResponse):
    """A streaming response that reports when its body iterator was never started.

    Starlette does not start (and so never closes) the body iterator when the client is gone before the headers are
    sent; ``on_abandoned`` then runs so that the admission slot and callbacks are still released.
    """

    def __init__(
        self,
        content: AsyncIterator[str],
        on_abandoned: Callable[[], Awaitable[None]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._started_body = False
        self._on_abandoned = on_abandoned
        super().__init__(self._track(content), media_type="text/plain; charset=utf-8", headers=headers)

    async def _track(self, content: AsyncIterator[str]) -> AsyncIterator[str]:
        self._started_body = True
        async for chunk in content:
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._started_body:
                await self._on_abandoned()


def native_chunk(cumulative_text: str) -> str:
    """One wire chunk: the whole answer so far plus the finish token."""
    return cumulative_text + FINISH_TOKEN


async def stream_fixed_text(text: str, on_finished: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
    """A short server-made answer (e.g. a role grant) streamed in the native format, one chunk per word."""
    words = text.split(" ")
    try:
        for i in range(1, len(words) + 1):
            yield native_chunk(" ".join(words[:i]))
    finally:
        await on_finished()


_ERROR_NAMES = {400: "bad_request", 404: "not_found", 409: "conflict", 503: "service_unavailable"}


def chat_error_response(exc: ChatRequestError) -> JSONResponse:
    """A refused /chat_stream request in the native shape: ``{"error": <name>, "detail": ...}`` with its status
    (400, 404, 409, 503; anything else is a 500)."""
    status = exc.status if exc.status in _ERROR_NAMES else 500
    return JSONResponse({"error": _ERROR_NAMES.get(status, "internal_server_error"), "detail": exc.detail}, status)


def bad_request(detail: str) -> JSONResponse:
    """400 in the native shape; ``detail`` names what is wrong."""
    return JSONResponse({"error": "bad_request", "detail": detail}, status_code=400)


def internal_error(detail: str) -> JSONResponse:
    """500 in the native shape."""
    return JSONResponse({"error": "internal_server_error", "detail": detail}, status_code=500)


def too_many_requests(as_http_error: bool, retry_after: int) -> JSONResponse:
    """The seed's rejection: 200 by default (as the original), or 429 with Retry-After."""
    if as_http_error:
        return JSONResponse({"error": "too_many_requests"}, status_code=429, headers={"Retry-After": str(retry_after)})
    return JSONResponse({"error": "too_many_requests"})


def payload_too_large(error: PayloadTooLarge) -> JSONResponse:
    """413 in the shape of /chat_stream's other errors; the limit is in ``detail``."""
    return JSONResponse({"error": "payload_too_large", "detail": error.message}, status_code=413, headers=error.headers)


def engine_error_response(error: EngineError, as_http_error: bool) -> JSONResponse:
    """An engine that cannot start a turn: full (EngineOverloaded) answers like a full queue, failing with 503."""
    if isinstance(error, EngineOverloaded):
        return too_many_requests(as_http_error, error.retry_after)
    return service_unavailable(f"the engine cannot serve requests: {error}")


def service_unavailable(detail: str) -> JSONResponse:
    """503 while the server drains or is not ready."""
    return JSONResponse({"error": "service_unavailable", "detail": detail}, status_code=503)
