"""What every endpoint shares about HTTP itself: the header names of the protocol and the one body reader.

Every body is bounded: :func:`read_body` stops reading (PayloadTooLarge, 413) as soon as more than the limit has
arrived, or at once when ``Content-Length`` announces more, so a huge or endless body is never read whole.
"""

from __future__ import annotations

import json
from typing import Any, Final

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatstream.server.errors import BadRequest, PayloadTooLarge

MESSAGE_ID_HEADER: Final = "X-ChatStream-Last-Generated-Message-Id"
"""The id of the answer /chat_stream streams (the original's header)."""
DEV_TOOL_HEADER: Final = "X-ChatStream-API-DevTool-Enabled"
"""Sent as ``enabled`` to callers whose role may use the web UI's developer tools."""
AUTH_HEADER: Final = "X-ChatStream-Auth-Header"
"""An agent's pass phrase for a ``header_phrase`` role (docs/roles.md)."""
SKIP_SESSION_HEADER: Final = {"header_name": "X-FastSession-Skip", "header_value": "skip"}
"""Requests that carry it get no session (agents); fastsession's convention."""
QUEUE_TICKET_HEADER: Final = "X-ChatStream-Queue-Ticket"
"""A client-chosen id of one /chat_stream request, to look up its place in line while it waits (docs/api.md)."""

DEFAULT_MAX_BODY_BYTES: Final = 1024 * 1024
"""The default limit of a request body (1 MiB)."""
BODY_LIMIT_STATE: Final = "chatstream_max_body_bytes"
"""``request.state`` attribute: the body limit the body-limit middleware enforced (it wins over an endpoint's own)."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes`` long (the body-limit middleware's limit wins when it ran).

    Raises PayloadTooLarge without reading further once the body is longer. The body stays available to
    ``request.body()`` afterwards (request handlers written for the original read it again).
    """
    limit = getattr(request.state, BODY_LIMIT_STATE, None) or max_bytes
    cached = getattr(request, "_body", None)
    if isinstance(cached, bytes):
        if len(cached) > limit:
            raise PayloadTooLarge(limit)
        return cached
    if declared_length(request.headers.get("content-length")) > limit:
        raise PayloadTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # what Request.body() returns from now on
    return body


async def read_json_object(request: Request, max_bytes: int, *, example: str | None = None) -> dict[str, Any]:
    """:func:`read_body` parsed by :func:`parse_json_object`."""
    return parse_json_object(await read_body(request, max_bytes), example=example)


def check_body_size(body: bytes | str, max_bytes: int) -> None:
    """PayloadTooLarge when a body that was read elsewhere is longer than ``max_bytes``."""
    size = len(body) if isinstance(body, bytes) else len(body.encode())
    if size > max_bytes:
        raise PayloadTooLarge(max_bytes)


def declared_length(value: str | None) -> int:
    """The ``Content-Length`` value as a number (0 when absent or not a number)."""
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def parse_json_object(raw: bytes | str, *, example: str | None = None) -> dict[str, Any]:
    """A request body as a JSON object; BadRequest otherwise (``example`` shows the expected shape)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise BadRequest(f"The request body must be a JSON object{f' like {example}' if example else ''}.")
    return data


async def stream_in_this_task(response: StreamingResponse, scope: Scope, receive: Receive, send: Send) -> None:
    """Send ``response`` as ``StreamingResponse.__call__`` does, but write the body in the calling task.

    Where the server speaks ASGI before 2.4 (uvicorn), Starlette writes the body in a task it starts and waits for
    the client's disconnect in the request's own task; here the request's task writes the body and a side task
    listens for the disconnect (which cancels the writing, as in Starlette). Our streaming endpoints answer once the
    first delta is there, so the task that got it writes it without queueing a new task behind the rest of a burst;
    the first-token latency this saves was within the benchmark's noise (bench/README.md, rounds 9 and 10).
    """
    version = tuple(int(part) for part in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
    if scope["type"] != "http" or version >= (2, 4):  # Starlette writes in this task already
        await StreamingResponse.__call__(response, scope, receive, send)
        return
    try:
        async with anyio.create_task_group() as group:

            async def until_disconnect() -> None:
                await response.listen_for_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(until_disconnect)
            await response.stream_response(send)
            group.cancel_scope.cancel()
    except BaseExceptionGroup as failures:  # one failure (the writing's) as itself, as Starlette's own group does
        if len(failures.exceptions) == 1:
            raise failures.exceptions[0] from failures.exceptions[0].__cause__
        raise
    if response.background is not None:
        await response.background()
