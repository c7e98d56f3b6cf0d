"""ChatStream(devices=["cpu", "cpu"]): two engines of the tiny model behind one server on 127.0.0.1.

The turns of a conversation stay on one engine (its KV cache answers them), new conversations spread over both, and
an engine that dies mid-run leaves the other serving while /health names it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from chatstream import ChatStream
from chatstream.engine.async_engine import TransformersEngine
from chatstream.engine.base import FinishReason, GenerationRequest
from chatstream.pool import PoolEngine
from chatstream.server.app import create_app
from chatstream.server.openai import conversation_key
from tests.live_server import run_server

MODEL = "tiny"
AGENT = {"X-FastSession-Skip": "skip"}


@pytest.fixture
def served(tiny_model: Any, tiny_tokenizer: Any) -> Iterator[tuple[PoolEngine, httpx.Client]]:
    chat_stream = ChatStream(
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        devices=["cpu", "cpu"],
        num_of_concurrent_executions=2,
        max_queue_size=32,
        max_new_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        model_name=MODEL,
        context_len=2048,
    )
    pool = chat_stream.engine
    assert isinstance(pool, PoolEngine)
    with run_server(create_app(chat_stream, drain_timeout=1.0)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield pool, c


def chat(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int = 6) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def turns(pool: PoolEngine) -> dict[str, int]:
    return {w.name: w.turns_total for w in pool.workers()}


def test_five_turns_of_a_conversation_stay_on_one_engine_and_reuse_its_cache(
    served: tuple[PoolEngine, httpx.Client],
) -> None:
    pool, client = served
    messages = [{"role": "system", "content": "Be brief."}]
    cached = []
    for i in range(5):
        messages.append({"role": "user", "content": f"Question number {i}?"})
        completion = chat(client, messages)
        cached.append(completion["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages.append({"role": "assistant", "content": completion["choices"][0]["message"]["content"]})
    owner = pool.owner_of(conversation_key(messages[:2], None))
    assert sorted(turns(pool).values()) == [0, 5] and turns(pool)[owner or ""] == 5
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    assert pool.moves == 0
    load = client.get("/get_load", headers=AGENT).json()
    by_name = {w["name"]: w for w in load["chatstream_workers"]}
    assert by_name[f"node:0/{owner}"]["turns"] == 5 and by_name[f"node:0/{owner}"]["max_processing"] == 2
    assert load["admission"]["max_processing"] == 4
    metrics = client.get("/metrics", headers=AGENT).text
    assert re.search(rf'^chatstream_engine_turns_total{{engine="{re.escape(owner or "")}"}} 5\.0$', metrics, re.M)


def test_sixteen_new_conversations_spread_over_both_engines(served: tuple[PoolEngine, httpx.Client]) -> None:
    pool, client = served

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as c:
            bodies = [
                {"model": MODEL, "messages": [{"role": "user", "content": f"New chat {i}"}], "max_tokens": 4}
                for i in range(16)
            ]
            responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))
            return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 16
    counts = sorted(turns(pool).values())
    assert sum(counts) == 16 and counts[0] >= 6, counts
    assert {w.name: w.conversations for w in pool.workers()} == turns(pool)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's crash
def test_an_engine_that_dies_mid_run_leaves_the_other_serving_and_health_names_it(
    served: tuple[PoolEngine, httpx.Client],
) -> None:
    pool, client = served
    messages = [{"role": "user", "content": "Tell me a long story."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 1500, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        victim = pool.owner_of(conversation_key(messages, None)) or ""
        kill_engine_thread(member_engine(pool, victim))
        died = time.monotonic()
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert time.monotonic() - died < 5.0
    error = json.loads(events[-2])["error"]
    assert error["code"] == "generation_error" and f"engine {victim} failed" in error["message"]

    health = client.get("/health", headers=AGENT)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    failed = [e for e in health.json()["engines"] if e["status"] == "failed"]
    assert [e["name"] for e in failed] == [victim] and "thread died" in failed[0]["error"]

    messages.append({"role": "assistant", "content": "Once upon a time"})
    messages.append({"role": "user", "content": "Go on."})
    assert chat(client, messages)["choices"][0]["finish_reason"] == "length"  # the other engine took it
    assert pool.owner_of(conversation_key(messages, None)) != victim and pool.moves == 1
    for i in range(3):
        chat(client, [{"role": "user", "content": f"Another chat {i}"}])
    assert turns(pool)[victim] == 1
    assert f'chatstream_engine_healthy{{engine="{victim}"}} 0.0' in client.get("/metrics", headers=AGENT).text


async def test_engine_steps_that_keep_failing_take_the_engine_out_and_the_request_moves(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    chat_stream = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, devices=["cpu", "cpu"], max_new_tokens=4)
    pool = chat_stream.engine
    assert isinstance(pool, PoolEngine)
    pool.start()
    try:
        await run(pool, "warm-up", "c1")
        broken = pool.owner_of("c1") or ""
        member_engine(pool, broken).llm.model_runner.run = _device_lost  # type: ignore[method-assign]
        reasons = [await run(pool, f"turn {i}", "c1") for i in range(3)]
    finally:
        await asyncio.to_thread(pool.stop)
    assert reasons[:2] == [FinishReason.ERROR, FinishReason.ERROR]
    # the third error took the engine out, and the request, which had produced nothing, went to the other engine
    assert reasons[2] in (FinishReason.STOP, FinishReason.LENGTH)
    worker = {w.name: w for w in pool.workers()}[broken]
    assert not worker.healthy and "3 requests in a row failed" in (worker.error or "")


async def run(pool: PoolEngine, prompt: str, conversation: str) -> FinishReason | None:
    request = GenerationRequest(f"r-{prompt}", prompt, conversation_id=conversation)
    deltas = [delta async for delta in pool.add_request(request)]
    return deltas[-1].finish_reason


def _device_lost(*_: Any) -> Any:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def member_engine(pool: PoolEngine, name: str) -> TransformersEngine:
    engine = pool.engines[name]
    assert isinstance(engine, TransformersEngine)
    return engine


def kill_engine_thread(engine: TransformersEngine) -> None:
    """End the engine thread as a crash would (SystemExit ends a thread without a traceback)."""

    def exit_thread() -> Any:
        raise SystemExit

    engine.llm.step = exit_thread  # type: ignore[method-assign]
    deadline = time.monotonic() + 5
    while engine._thread is not None and engine._thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
