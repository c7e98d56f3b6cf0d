"""Fair queueing on a real server: user A sends 40 requests at once, then user B sends one; B's request starts
before every one of A's that were waiting (the order is asserted, not the time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.reliability.servers import AGENT, mock_serve, serve

pytestmark = pytest.mark.reliability

BURST = 40
# every answer takes about three seconds: the burst is all in line before the first slot frees
OPTIONS = (
    "--mock-initial-wait",
    "3.0",
    "--mock-time-per-token",
    "0.005",
    "--max-concurrency",
    "2",
    "--max-queue",
    "64",
)


class StartOrder:
    """Records which request's response started (was admitted) in which order."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def chat(self, client: httpx.AsyncClient, name: str) -> None:
        request = client.build_request("POST", "/chat_stream", json={"user_input": name})
        response = await client.send(request, stream=True)  # returns when the headers arrive: at admission
        self.order.append(name)
        try:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
            await response.aread()
        finally:
            await response.aclose()


async def session_client(url: str) -> httpx.AsyncClient:
    """A client with a session cookie of its own (one user)."""
    client = httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=BURST + 5))
    assert (await client.post("/clear_context")).status_code == 200
    assert "sid" in client.cookies
    return client


async def wait_for_load(url: str, **expected: int) -> None:
    """Until ``/get_load`` shows these counts (``processing``, ``waiting``)."""
    async with httpx.AsyncClient(base_url=url, headers=AGENT) as ops:
        for _ in range(500):
            load = (await ops.get("/get_load")).json()["chatstream_workers"][0]
            if all(load[key] == count for key, count in expected.items()):
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"never saw {expected} in /get_load")


async def test_a_single_request_is_not_starved_by_another_users_burst(tmp_path: Path) -> None:
    with serve(mock_serve(*OPTIONS), tmp_path) as server:
        user_a, user_b = await session_client(server.url), await session_client(server.url)
        starts = StartOrder()
        try:
            first = asyncio.ensure_future(starts.chat(user_a, "a0"))
            await asyncio.sleep(0.1)  # a0 and a1 end at different times: one slot frees at a time
            # a1 takes the second slot before the rest of the burst is sent: sent together, its requests race to
            # the server on their own connections, and any of them could take that slot
            burst = [asyncio.ensure_future(starts.chat(user_a, "a1"))]
            await wait_for_load(server.url, processing=2)
            burst += [asyncio.ensure_future(starts.chat(user_a, f"a{i}")) for i in range(2, BURST)]
            await wait_for_load(server.url, waiting=BURST - 2)
            single = asyncio.ensure_future(starts.chat(user_b, "b"))
            await asyncio.wait_for(single, 30)
            assert len(starts.order) >= 3
        finally:
            for task in (first, *burst):
                task.cancel()  # the rest of the burst would only confirm a's own order
            await asyncio.gather(first, *burst, return_exceptions=True)
            await user_a.aclose()
            await user_b.aclose()
    assert starts.order[:3] == ["a0", "a1", "b"], starts.order[:6]  # b got the first slot freed after it arrived
