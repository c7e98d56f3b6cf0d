"""A pool behind ChatStream on mock engines: the same endpoints and admission, per-engine /get_load, /metrics and
/health, and ChatStreamPool over ChatStream instances."""

from __future__ import annotations

from typing import Any

from chatstream import ChatStream, ChatStreamPool
from chatstream.config import MockConfig, MockType
from chatstream.engine.mock_engine import MockEngine
from chatstream.pool import PoolEngine
from chatstream.server.app import create_app
from tests.server.support import asgi_client, started

AGENT = {"X-FastSession-Skip": "skip"}


def echo_pool(**options: Any) -> ChatStream:
    engines = [MockEngine(MockConfig(type=MockType.ECHO, time_per_token_sec=0.0)) for _ in range(2)]
    return ChatStream(engine=engines, num_of_concurrent_executions=2, model_name="chatstream-mock", **options)


async def test_a_list_of_engines_is_a_pool_behind_the_same_endpoints_and_admission() -> None:
    chat_stream = echo_pool()
    assert isinstance(chat_stream.engine, PoolEngine)
    assert chat_stream.admission_config.max_concurrency == 4  # 2 per engine
    async with started(chat_stream), asgi_client(create_app(chat_stream)) as client:
        answer = await client.post("/chat_stream", json={"user_input": "Hello pool"})
        assert answer.text.endswith("Hello pool<::EOS::>")  # the mock behind the pool got the user's input
        body = {"model": "chatstream-mock", "messages": [{"role": "user", "content": "Hi there"}]}
        completion = (await client.post("/v1/chat/completions", json=body)).json()
        assert completion["choices"][0]["message"]["content"] == "Hi there"
        load = (await client.get("/get_load", headers=AGENT)).json()
        assert [w["name"] for w in load["chatstream_workers"]] == ["node:0/engine-0", "node:0/engine-1"]
        assert sum(w["turns"] for w in load["chatstream_workers"]) == 2
        assert load["admission"]["max_processing"] == 4
        health = await client.get("/health", headers=AGENT)
        assert health.json() == {
            "status": "ok",
            "engines": [{"name": "engine-0", "status": "ok"}, {"name": "engine-1", "status": "ok"}],
        }
        metrics = (await client.get("/metrics", headers=AGENT)).text
        assert 'chatstream_engine_max_running{engine="engine-1"} 2.0' in metrics


async def test_health_is_degraded_while_one_engine_is_out_and_failed_when_all_are() -> None:
    chat_stream = echo_pool()
    pool = chat_stream.engine
    assert isinstance(pool, PoolEngine)
    async with started(chat_stream), asgi_client(create_app(chat_stream)) as client:
        pool.take_out("engine-1", "device lost")
        degraded = await client.get("/health", headers=AGENT)
        assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
        assert degraded.json()["engines"][1] == {"name": "engine-1", "status": "failed", "error": "device lost"}
        answer = await client.post("/chat_stream", json={"user_input": "still here"})
        assert answer.text.endswith("still here<::EOS::>")
        load = (await client.get("/get_load", headers=AGENT)).json()
        assert [w["status"] for w in load["chatstream_workers"]] == ["ok", "failed"]
        pool.take_out("engine-0", "device lost")
        failed = await client.get("/health", headers=AGENT)
        assert failed.status_code == 503 and failed.json()["status"] == "failed"
        body = {"model": "chatstream-mock", "messages": [{"role": "user", "content": "Hi"}]}
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 503 and "engine-0: device lost" in refused.json()["error"]["message"]


async def test_chat_stream_pool_serves_its_members_engines_with_their_totals() -> None:
    members = [
        ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0.0}, max_queue_size=3)
        for _ in range(2)
    ]
    pool = ChatStreamPool(members, name="pool")
    assert pool.admission_config.max_concurrency == 4 and pool.admission_config.max_queue_size == 6
    assert [w.name for w in pool.pool.workers()] == ["node:0#0", "node:0#1"]
    assert pool.model_name == "chatstream-mock"
    async with started(pool), asgi_client(create_app(pool)) as client:
        answer = await client.post("/chat_stream", json={"user_input": "Hi members"})
        assert answer.text.endswith("Hi members<::EOS::>")
    assert sum(w.turns_total for w in pool.pool.workers()) == 1


def test_devices_and_a_pool_of_engines_refuse_what_does_not_fit() -> None:
    import pytest

    with pytest.raises(ValueError, match="devices needs model and tokenizer"):
        ChatStream(use_mock_response=True, devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="ChatStreamPool needs at least one"):
        ChatStreamPool([])
    with pytest.raises(ValueError, match="takes its engines from chat_streams"):
        ChatStreamPool([ChatStream(use_mock_response=True)], devices=["cpu"])
