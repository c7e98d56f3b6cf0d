"""BodyLimitMiddleware: every request body is bounded, on every endpoint, before the application sees it.

A request that announces a body (``Content-Length`` or ``Transfer-Encoding``) has it read here first, up to the limit:
a ``Content-Length`` above the limit is answered at once, without reading anything; a chunked body is read until it
passes the limit and then cut off. Either way the answer is 413 in the error shape of the endpoint's protocol, with
``Connection: close`` (the rest of the body is never read, so the connection cannot be reused). A body within the
limit is handed to the application unchanged; endpoints that never read their body (GET /get_load with a body) are
covered too. The limit is also recorded in ``request.state`` for the endpoints' own reader (``server/http.py``).

Pure ASGI: a streaming response and client disconnects pass through unchanged.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream.server.errors import PayloadTooLarge, native_error_response, openai_error_response
from chatstream.server.http import BODY_LIMIT_STATE, declared_length
from chatstream.server.native_wire import payload_too_large

logger = logging.getLogger(__name__)

CHAT_STREAM_PATH = "/chat_stream"
OPENAI_PATH_PREFIX = "/v1/"
CONVERSATIONS_PATH = "/conversations"
"""The conversations API answers errors in OpenAI's shape (server/conversations.py)."""
_DISCONNECTED = b"\0disconnected"  # a marker, compared by identity


class BodyLimitMiddleware:
    """Answer 413 to request bodies longer than ``max_body_bytes``; pass the others on unchanged."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={max_body_bytes!r} must be >= 1")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[BODY_LIMIT_STATE] = self.max_body_bytes
        headers = Headers(scope=scope)
        if "content-length" not in headers and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        if declared_length(headers.get("content-length")) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is _DISCONNECTED:
            return  # the client left while sending: nobody to answer
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body; None once it passes the limit (the rest is not read); ``_DISCONNECTED`` when the client
        left before it was complete."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _DISCONNECTED
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        logger.info("request body over %d bytes refused: %s %s", self.max_body_bytes, scope["method"], scope["path"])
        await too_large_response(scope["path"], self.max_body_bytes)(scope, receive, send)


def too_large_response(path: str, limit: int) -> JSONResponse:
    """413 in the error shape of the endpoint at ``path`` (OpenAI's under /v1 and for the conversations API, the
    original's shapes elsewhere)."""
    error = PayloadTooLarge(limit)
    if OPENAI_PATH_PREFIX in path or CONVERSATIONS_PATH in path:
        return openai_error_response(error)
    if path.rstrip("/").endswith(CHAT_STREAM_PATH):
        return payload_too_large(error)
    return native_error_response(error)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that returns the buffered body first, then whatever the server sends next (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
