"""``create_app``: a complete FastAPI app around one ChatStream (what ``chatstream serve`` runs)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from chatstream.server.apis import append_apis
from chatstream.server.middlewares import append_middlewares
from chatstream.server.ops import drain_and_shutdown

if TYPE_CHECKING:
    from chatstream.chat_stream import ChatStream

logger = logging.getLogger(__name__)


def create_app(
    chat_stream: ChatStream,
    *,
    web_ui_params: Mapping[str, Any] | None = None,
    api_keys: Sequence[str] = (),
    drain_timeout: float = 30.0,
    middleware_opts: Mapping[str, Any] | None = None,
) -> FastAPI:
    """An app serving every API (native, OpenAI, web UI, /health, /metrics) of ``chat_stream``.

    The lifespan starts the engine and, on shutdown, stops admitting (503), lets running streams finish for up to
    ``drain_timeout`` seconds, then stops the engine. ``api_keys`` protect the OpenAI API (``Authorization:
    Bearer``); ``middleware_opts`` go to :func:`append_middlewares` (session cookie settings, CORS).
    """
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout={drain_timeout!r} must be >= 0")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await chat_stream.startup()
        try:
            yield
        finally:
            await drain_and_shutdown(chat_stream, drain_timeout)

    app = FastAPI(title=f"ChatStream ({chat_stream.name})", lifespan=lifespan)
    append_middlewares(chat_stream, app, middleware_opts)
    append_apis(
        chat_stream, app, {"all": True, "web_ui_params": dict(web_ui_params or {}), "api_keys": tuple(api_keys)}
    )
    return app
