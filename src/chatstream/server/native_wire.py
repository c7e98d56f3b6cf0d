"""The native wire format of /chat_stream: cumulative text chunks, and the JSON errors in the seed's shapes.

Every chunk of the ``text/plain`` body is the *cumulative* answer so far followed by ``<::EOS::>``; a refused request
gets a small JSON body (``{"error": <name>, "detail": ...}``; the seed's ``{"error": "too_many_requests"}`` with 200 or
429).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from chatstream.engine.base import EngineError, EngineOverloaded
from chatstream.server.errors import PayloadTooLarge
from chatstream.server.http import stream_in_this_task
from chatstream.sessions.handler import ChatRequestError

FINISH_TOKEN = "<::EOS::>"


class NativeStreamingResponse(StreamingResponse):
    """A streaming response that reports when its body iterator was never started.

    Starlette does not start (and so never closes) the body iterator when the client is gone before the headers are
    sent; ``on_abandoned`` then runs so that the admission slot and callbacks are still released. The body is
    written in the request's own task (:func:`~chatstream.server.http.stream_in_this_task`).
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
            await stream_in_this_task(self, scope, receive, send)
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
