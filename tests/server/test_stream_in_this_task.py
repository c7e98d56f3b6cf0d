"""stream_in_this_task: a streaming response written in the request's own task, the disconnect watched beside it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.responses import StreamingResponse

from chatstream.server.http import stream_in_this_task


def scope(spec_version: str = "2.3") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}


class Client:
    """The ASGI receive/send pair of one request, recording what was sent and by which task."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.disconnect = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_the_body_is_written_in_the_calling_task(spec_version: str) -> None:
    writers: list[asyncio.Task[Any] | None] = []

    async def body() -> AsyncIterator[str]:
        for piece in ("a", "b"):
            writers.append(asyncio.current_task())
            yield piece

    client = Client()
    await stream_in_this_task(StreamingResponse(body()), scope(spec_version), client.receive, client.send)
    assert writers == [asyncio.current_task()] * 2
    assert client.sent[0]["type"] == "http.response.start" and client.body == b"ab"
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_disconnect_cancels_the_writing_and_the_watcher_ends_with_the_body() -> None:
    cancelled = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                yield "x"
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    client = Client()
    writing = asyncio.ensure_future(
        stream_in_this_task(StreamingResponse(endless()), scope(), client.receive, client.send)
    )
    await asyncio.sleep(0.03)
    client.disconnect.set()
    await asyncio.wait_for(writing, 2)  # returns: the disconnect ends the response, it is not an error
    assert cancelled.is_set() and b"x" in client.body
    # a body that ends by itself stops the watcher: no task is left waiting for a disconnect
    before = asyncio.all_tasks()
    await stream_in_this_task(StreamingResponse(iter(["done"])), scope(), Client().receive, client.send)
    assert asyncio.all_tasks() == before


async def test_a_failing_body_raises_its_own_exception() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "a"
        raise ValueError("broken body")

    client = Client()
    with pytest.raises(ValueError, match="broken body"):
        await stream_in_this_task(StreamingResponse(failing()), scope(), client.receive, client.send)
