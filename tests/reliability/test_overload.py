"""An overload burst: 300 requests at once against 8 slots and 32 places in line.

Each is served (200, the whole answer) or refused at once (429 with Retry-After); none hangs; the load goes back to
zero. Half are native /chat_stream turns, half OpenAI streams.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.servers import AGENT, mock_serve, percentile, record_figure, serve

pytestmark = pytest.mark.reliability

BURST = 300
REQUEST_TIMEOUT_SEC = 60.0
OPTIONS = ("--mock-type", "round", "--mock-time-per-token", "0.005", "--max-concurrency", "8", "--max-queue", "32")


async def one_request(client: httpx.AsyncClient, index: int) -> tuple[int, float, str | None]:
    started = time.monotonic()
    if index % 2:
        body = {"messages": [{"role": "user", "content": f"hi {index}"}], "stream": True}
        request = client.build_request("POST", "/v1/chat/completions", json=body)
    else:
        request = client.build_request("POST", "/chat_stream", json={"user_input": f"hi {index}"})
    response = await client.send(request, stream=True)
    try:
        text = (await response.aread()).decode()
    finally:
        await response.aclose()
    if response.status_code == 200:
        assert text.endswith("data: [DONE]\n\n") if index % 2 else text.endswith("<::EOS::>"), text[-80:]
    return response.status_code, time.monotonic() - started, response.headers.get("retry-after")


async def burst(url: str) -> list[tuple[int, float, str | None]]:
    limits = httpx.Limits(max_connections=BURST + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_SEC, limits=limits) as client:
        tasks = [one_request(client, i) for i in range(BURST)]
        return await asyncio.wait_for(asyncio.gather(*tasks), 2 * REQUEST_TIMEOUT_SEC)


async def load_of(url: str) -> tuple[int, int]:
    async with httpx.AsyncClient(base_url=url, headers=AGENT) as client:
        worker = (await client.get("/get_load")).json()["chatstream_workers"][0]
    return worker["processing"], worker["waiting"]


async def test_overload_burst_is_served_or_refused_and_nothing_hangs(tmp_path: Path) -> None:
    with serve(mock_serve(*OPTIONS, "--too-many-requests-as-http-error"), tmp_path) as server:
        results = await burst(server.url)
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert all(int(after) >= 1 for status, _, after in results if status == 429 and after is not None)
        assert all(after is not None for status, _, after in results if status == 429)
        assert statuses.count(200) >= 40  # 8 running + 32 waiting at the peak, at least
        deadline = time.monotonic() + 2.0
        while await load_of(server.url) != (0, 0):
            assert time.monotonic() < deadline, "the load did not go back to zero"
            await asyncio.sleep(0.05)
    latencies = [elapsed for _, elapsed, _ in results]
    served = [elapsed for status, elapsed, _ in results if status == 200]
    record_figure(
        "overload_burst",
        {
            "requests": BURST,
            "served": statuses.count(200),
            "refused_429": statuses.count(429),
            "p50_s": round(percentile(latencies, 0.5), 3),
            "p99_s": round(percentile(latencies, 0.99), 3),
            "served_p99_s": round(percentile(served, 0.99), 3),
            "max_s": round(max(latencies), 3),
        },
    )
