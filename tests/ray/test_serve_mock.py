"""The Ray application on the mock engine: both protocols through Serve's proxy, and overload (429, never a hang)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from chatstream.config import EngineConfig, MockConfig, MockType
from chatstream.ray.app import FrontSettings
from chatstream.ray.spec import EngineSpec, ReplicaSettings
from tests.ray.cluster import AGENT, deployed, routing

pytestmark = pytest.mark.ray

MOCK = EngineSpec(
    mock=MockConfig(type=MockType.LONG, time_per_token_sec=0.02), engine_config=EngineConfig(max_batch_size=2)
)
REPLICAS = ReplicaSettings(num_replicas=2, num_cpus=0.5, max_queued_requests=2, retry_after_s=2)
# Every answer takes 2 s (100 tokens x 0.02 s), longer than a burst takes to arrive on a busy machine.
FRONT = FrontSettings(chat_stream_options={"max_new_tokens": 100})


@pytest.fixture(scope="module")
def mock_app(ray_cluster: str) -> Iterator[str]:
    with deployed(ray_cluster, MOCK, REPLICAS, FRONT) as url:
        yield url


def test_both_protocols_stream_through_the_proxy(mock_app: str) -> None:
    with httpx.Client(base_url=mock_app, timeout=30) as client:
        chunks = []
        with client.stream("POST", "/chat_stream", json={"user_input": "Hi"}) as response:
            assert response.status_code == 200
            chunks = [c for c in response.iter_text() if c]
        assert len(chunks) > 3 and chunks[-1].endswith("<::EOS::>")
        body = {
            "model": "chatstream-mock",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "max_tokens": 5,
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text.startswith("Once upon a time")
        assert sum(routing(client)["turns_by_replica"].values()) >= 2
        load = client.get("/get_load", headers=AGENT).json()  # one entry per replica this front has used
        assert load["chatstream_workers"] and all(w["max_processing"] == 2 for w in load["chatstream_workers"])
        assert sum(w["turns"] for w in load["chatstream_workers"]) >= 2
        assert client.get("/health").json()["status"] == "ok"


async def _burst(url: str, bodies: list[tuple[str, dict[str, object]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def call(path: str, body: dict[str, object]) -> httpx.Response:
            response = await client.post(path, json=body)
            await response.aread()
            return response

        return await asyncio.gather(*(call(path, body) for path, body in bodies))


def _chat(stream: bool) -> dict[str, object]:
    return {
        "model": "chatstream-mock",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": stream,
        "max_tokens": 25,
    }


def test_a_burst_beyond_capacity_gets_429_with_retry_after_in_both_protocols(mock_app: str) -> None:
    # 2 replicas x 2 slots run, the front's queue holds 2 more (max_queued_requests); the rest is refused at once.
    bodies = [("/chat_stream", {"user_input": "Hi"}), ("/v1/chat/completions", _chat(stream=True))] * 6
    started = time.monotonic()
    responses = asyncio.run(_burst(mock_app, bodies))
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= 6 and codes.count(429) >= 4, codes
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)  # the front's admission estimates it
    assert {r.request.url.path for r in refused} == {"/chat_stream", "/v1/chat/completions"}
    assert elapsed < 20


def test_ray_backpressure_becomes_429_with_retry_after(ray_cluster: str, mock_app: str) -> None:
    # The front admits everything; Ray's own queue (2 + 4 slots) overflows, and the refusal is still a 429. Every
    # answer takes 5 s (250 tokens x 0.02 s; the body's max_tokens, which would cap it, is raised to match), longer
    # than a burst takes to arrive on a busy machine: with 0.5 s answers slots freed mid-burst (2 refused). The burst
    # is 32, not 16: Ray's per-caller queue bound is approximate, and bursts of 16 saw 8 to 14 accepted where 10 fit
    # (twice only 2 refused); bursts of 32 saw 10 accepted every time.
    options = {"num_of_concurrent_executions": 64, "max_queue_size": 0, "max_new_tokens": 250}
    front = FrontSettings(chat_stream_options=options)
    body = _chat(stream=False) | {"max_tokens": 250}
    with deployed(ray_cluster, MOCK, REPLICAS, front) as url:  # replaces the module's app (same name and route)
        responses = asyncio.run(_burst(url, [("/v1/chat/completions", body)] * 32))
        with httpx.Client(base_url=url, timeout=30) as client:
            report = routing(client)
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(429) >= 4 and codes.count(200) >= 8, codes  # 4 run, 6 wait
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" or "busy" in refused.json()["error"]["message"]
    assert sum(report["turns_by_replica"].values()) == codes.count(200)
