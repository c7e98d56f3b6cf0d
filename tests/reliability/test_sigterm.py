"""SIGTERM with streams in flight: ``chatstream serve`` stops taking connections, lets the running streams finish
within the drain timeout, and exits with status 0."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.servers import mock_serve, record_figure, serve

pytestmark = pytest.mark.reliability

DRAIN_TIMEOUT_SEC = 15.0
OPTIONS = ("--mock-type", "long", "--mock-time-per-token", "0.01", "--max-concurrency", "8")
OPTIONS += ("--drain-timeout", str(DRAIN_TIMEOUT_SEC))


async def stream(client: httpx.AsyncClient, index: int, started: asyncio.Event) -> str:
    if index % 2:
        body = {"messages": [{"role": "user", "content": "story"}], "stream": True, "max_tokens": 1000}
        request = client.build_request("POST", "/v1/chat/completions", json=body)
    else:
        request = client.build_request("POST", "/chat_stream", json={"user_input": "story"})
    response = await client.send(request, stream=True)
    parts = []
    async for text in response.aiter_text():
        parts.append(text)
        started.set()
    await response.aclose()
    return "".join(parts)


async def test_sigterm_lets_streams_in_flight_finish_and_exits_0(tmp_path: Path) -> None:
    with serve(mock_serve(*OPTIONS), tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            events = [asyncio.Event() for _ in range(6)]
            streams = [asyncio.ensure_future(stream(client, i, events[i])) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), 30)
            signalled = time.monotonic()
            exit_code = asyncio.get_running_loop().run_in_executor(None, server.terminate, DRAIN_TIMEOUT_SEC + 15)
            bodies = await asyncio.wait_for(asyncio.gather(*streams), DRAIN_TIMEOUT_SEC)
            finished = time.monotonic() - signalled
            assert await exit_code == 0, server.log()
            exited = time.monotonic() - signalled
    for index, body in enumerate(bodies):
        if index % 2:
            assert body.endswith("data: [DONE]\n\n") and '"finish_reason":"stop"' in body, body[-200:]
        else:
            assert body.endswith("always the right time to begin something new.<::EOS::>"), body[-200:]
    record_figure(
        "sigterm_drain",
        {"streams": len(bodies), "finished_after_s": round(finished, 2), "exited_after_s": round(exited, 2)},
    )
