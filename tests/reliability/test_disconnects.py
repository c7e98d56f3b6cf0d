"""A disconnect storm: 200 clients start a stream and leave after its first bytes, four rounds in a row.

Half are native /chat_stream turns, half OpenAI streams; many wait in line when they leave (an SSE stream in line
has already received its first queue-position comment). After each round every slot is free within a second, and
the server's memory stays flat from round to round.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.servers import AGENT, mock_serve, record_figure, serve

pytestmark = pytest.mark.reliability

CLIENTS = 200
ROUNDS = 4
FREED_WITHIN_SEC = 1.0
RSS_GROWTH_LIMIT_MB = 16.0
OPTIONS = ("--mock-type", "long", "--mock-time-per-token", "0.01", "--max-concurrency", "32", "--max-queue", "256")


async def start_and_leave(client: httpx.AsyncClient, index: int) -> None:
    if index % 2:
        body = {"messages": [{"role": "user", "content": "tell me"}], "stream": True, "max_tokens": 500}
        request = client.build_request("POST", "/v1/chat/completions", json=body)
    else:
        request = client.build_request("POST", "/chat_stream", json={"user_input": "tell me"})
    response = await client.send(request, stream=True)
    try:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            if chunk:
                break
    finally:
        await response.aclose()  # leave mid-stream (or while in line): the connection is closed


async def load_of(client: httpx.AsyncClient) -> tuple[int, int]:
    worker = (await client.get("/get_load", headers=AGENT)).json()["chatstream_workers"][0]
    return worker["processing"], worker["waiting"]


async def one_round(url: str) -> float:
    """Seconds from the last client leaving to an idle server."""
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(start_and_leave(client, i) for i in range(CLIENTS))), 60)
    left = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=5) as ops:
        while await load_of(ops) != (0, 0):
            assert time.monotonic() - left < 5.0, "slots were not freed"
            await asyncio.sleep(0.02)
    return time.monotonic() - left


async def test_disconnect_storm_frees_slots_and_keeps_memory_flat(tmp_path: Path) -> None:
    freed: list[float] = []
    rss: list[float] = []
    with serve(mock_serve(*OPTIONS), tmp_path) as server:
        for _ in range(ROUNDS):
            freed.append(await one_round(server.url))
            await asyncio.sleep(0.2)
            rss.append(round(server.rss_mb(), 1))
    record_figure(
        "disconnect_storm",
        {"clients_per_round": CLIENTS, "freed_after_s": [round(f, 3) for f in freed], "rss_mb_per_round": rss},
    )
    assert max(freed) < FREED_WITHIN_SEC, freed
    assert max(rss[1:]) - rss[1] < RSS_GROWTH_LIMIT_MB, rss  # the first round warms up (imports, buffers)
