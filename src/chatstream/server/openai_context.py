"""What every OpenAI endpoint shares: its context (the server context, the API keys, the models' creation time),
access (API keys or client roles), the model check, and admission."""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from chatstream.admission.admission import Slot, Ticket
from chatstream.server.context import ServerContext
from chatstream.server.errors import Forbidden, NotFound, ServiceUnavailable, Unauthorized
from chatstream.service import ChatService

__all__ = ["OpenAIContext", "admitted", "api_key_matches", "authorize", "check_model", "model_object"]


@dataclasses.dataclass(frozen=True)
class OpenAIContext:
    """What every OpenAI handler needs: the server context, the API keys in force and the models' creation time."""

    server: ServerContext
    api_keys: tuple[str, ...] = ()
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def service(self) -> ChatService:
        return self.server.service


def model_object(ctx: OpenAIContext) -> dict[str, Any]:
    """The served model as OpenAI's model object, with what the engine knows named as vLLM names it (``root``: the
    model the engine loaded, ``max_model_len``)."""
    model = {"id": ctx.service.model_name, "object": "model", "created": ctx.created, "owned_by": "chatstream"}
    info = ctx.service.engine_info()
    if info.get("model"):
        model["root"] = info["model"]
    if info.get("max_model_len"):
        model["max_model_len"] = info["max_model_len"]
    return model


def authorize(ctx: OpenAIContext, request: Request) -> None:
    """API key (when configured) or client role; raises Unauthorized / Forbidden.

    With API keys configured, a valid ``Authorization: Bearer <key>`` is required, unless the request carries a
    header phrase of an agent role that allows "openai". Without keys, the client role decides; OpenAI clients are
    agents, so a session is ignored.
    """
    roles = ctx.server.roles
    role = roles.resolve(request, as_agent=True)
    if ctx.api_keys:
        if api_key_matches(request.headers.get("authorization"), ctx.api_keys):
            return
        if role.auth_method.is_header_phrase and role.allows("openai"):
            return
        raise Unauthorized("Incorrect or missing API key: send 'Authorization: Bearer <key>'.", param="api_key")
    if not roles.is_allowed(request, "openai", as_agent=True):
        raise Forbidden(f"The OpenAI API is not allowed for client role '{role.name}'.")


def api_key_matches(authorization: str | None, api_keys: Sequence[str]) -> bool:
    """True when the header is ``Bearer <one of api_keys>``; every key is compared in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


def check_model(service: ChatService, model: str | None) -> None:
    """NotFound unless ``model`` is empty or the model this server runs."""
    if model and model != service.model_name:
        raise NotFound(
            f"The model '{model}' does not exist; this server runs '{service.model_name}' (GET /v1/models).",
            param="model",
            code="model_not_found",
        )


async def admitted(service: ChatService, ticket: Ticket, request: Request) -> Slot | None:
    """The slot of ``ticket`` (a place in line from ``service.enqueue``) with the engine running (None: the client
    left while waiting); raises QueueFull, Draining, or ServiceUnavailable when the engine is not ready."""
    slot = await service.wait_for_slot(ticket, request.is_disconnected)
    if slot is None:
        return None
    try:
        await service.startup()
        if not service.engine.is_running:
            raise ServiceUnavailable("The model is not ready yet.", code="engine_not_ready")
    except BaseException:
        slot.release()
        raise
    return slot
