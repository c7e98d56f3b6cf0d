"""Helpers shared by the server tests: a mock ChatStream, a recorder of engine requests, an in-process client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from chatstream import ChatStream
from chatstream.engine.base import GenerationRequest


def mock_chat_stream(**kw: Any) -> ChatStream:
    """A ChatStream on the mock engine ("echo", no delay unless ``mock_params`` says otherwise)."""
    params = {"type": "echo", "time_per_token_sec": 0.0}
    params.update(kw.pop("mock_params", {}))
    return ChatStream(use_mock_response=True, mock_params=params, **kw)


class Recorder:
    """Wraps engine.add_request to keep the GenerationRequests it sees."""

    def __init__(self, chat_stream: ChatStream) -> None:
        self.requests: list[GenerationRequest] = []
        original = chat_stream.engine.add_request

        def add_request(request: GenerationRequest) -> Any:
            self.requests.append(request)
            return original(request)

        chat_stream.engine.add_request = add_request  # type: ignore[method-assign]


@asynccontextmanager
async def started(chat_stream: ChatStream) -> AsyncIterator[ChatStream]:
    """The chat stream started, and shut down afterwards."""
    await chat_stream.startup()
    try:
        yield chat_stream
    finally:
        await chat_stream.shutdown(1.0)


@asynccontextmanager
async def asgi_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls the app in process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
        yield client
