"""``create_app``: a complete FastAPI app around one ChatStream (what ``chatstream serve`` runs)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI

from chatstream.server.apis import append_apis
from chatstream.server.context import HasServerContext, ServerContext, context_of
from chatstream.server.middlewares import append_middlewares


def create_app(
    chat_stream: ServerContext | HasServerContext,
    *,
    web_ui_params: Mapping[str, Any] | None = None,
    api_keys: Sequence[str] = (),
    drain_timeout: float = 30.0,
    middleware_opts: Mapping[str, Any] | None = None,
) -> FastAPI:
    """An app serving every API (native, OpenAI, web UI, /health, /metrics) of a ChatStream (or a server context).

    The lifespan starts the engine and opens the conversation store (with its retention task) and, on shutdown,
    stops admitting (503), lets running streams finish for up to ``drain_timeout`` seconds, stops the engine, then
    closes the store. ``api_keys`` protect the OpenAI API (``Authorization:
    Bearer``); ``middleware_opts`` go to :func:`append_middlewares` (session cookie settings, CORS).
    """
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout={drain_timeout!r} must be >= 0")
    ctx = context_of(chat_stream)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ctx.service.startup()
        await ctx.conversations.startup()
        try:
            yield
        finally:
            try:
                await ctx.service.shutdown(drain_timeout)
            finally:
                await ctx.conversations.shutdown()  # after the drain: finishing streams still commit their turns

    app = FastAPI(title=f"ChatStream ({ctx.service.name})", lifespan=lifespan)
    append_middlewares(ctx, app, middleware_opts)
    append_apis(ctx, app, {"all": True, "web_ui_params": dict(web_ui_params or {}), "api_keys": tuple(api_keys)})
    return app
