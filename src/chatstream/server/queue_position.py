"""Telling a waiting client its place in line, without changing either protocol's answers.

- OpenAI (SSE): a streaming request that has to wait gets its response at once, and SSE comment lines
  ``: queue position N`` (N = 1: served next) each time its place changes; clients ignore comments, and a proxy sees
  traffic. Once admitted, the usual ``data:`` events follow.
- Native (/chat_stream): the wire format stays as it is (the response starts when the request is admitted). A client
  that wants the place in line sends ``X-ChatStream-Queue-Ticket: <id of its choice>`` with the POST and polls
  ``GET /chat_stream/queue_position?ticket=<id>`` while the POST has not answered (the web UI does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.admission.admission import Draining, QueueFull, Ticket
from chatstream.server.access import HasClientRoles, role_checked
from chatstream.server.errors import openai_error_body
from chatstream.server.openai_render import sse
from chatstream.service import ChatService

QUEUE_POSITION_PATH: Final = "/chat_stream/queue_position"
"""Where a native client polls its place in line (mounted with the "chat_stream" API)."""

SSE_DONE: Final = "data: [DONE]\n\n"


def queue_comment(position: int) -> str:
    """The SSE comment line that tells a waiting stream its place in line."""
    return f": queue position {position}\n\n"


async def queued_events(
    service: ChatService, ticket: Ticket, answer: Callable[[], AsyncIterator[str]]
) -> AsyncIterator[str]:
    """The SSE events of a request still in line: a comment per place in line, then, once admitted, ``answer()``'s
    events. Pushed out of a full line or shut down meanwhile: an error event and ``[DONE]``."""
    try:
        async for position in ticket.positions():
            yield queue_comment(position)
    except (QueueFull, Draining) as exc:
        if isinstance(exc, QueueFull):
            service.metrics.rejected.inc()
        yield sse(openai_error_body(exc))
        yield SSE_DONE
        return
    if ticket.slot is not None:
        service.record_admission(ticket.slot)
    async for event in answer():
        yield event


class HasQueue(HasClientRoles, Protocol):
    """What the queue-position endpoint needs: the client roles and the service."""

    @property
    def service(self) -> ChatService: ...


@role_checked("chat_stream")
async def handle_queue_position_request(owner: HasQueue, request: Request) -> Response:
    """GET /chat_stream/queue_position?ticket=<id>: where the /chat_stream request sent with
    ``X-ChatStream-Queue-Ticket: <id>`` stands. ``waiting`` is false once it runs (or when the id is unknown)."""
    ticket_id = request.query_params.get("ticket", "")
    ticket = owner.service.admission.find_ticket(ticket_id) if ticket_id else None
    position = ticket.position() if ticket is not None else None
    if position is None:
        body = {"success": True, "message": "not waiting", "waiting": False, "position": None, "ahead": None}
    else:
        body = {"success": True, "message": "waiting", "waiting": True, "position": position, "ahead": position - 1}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
