"""/health, /metrics after real chats, graceful drain, create_app's lifespan."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatstream import ChatStream
from chatstream.server.apis import append_apis
from chatstream.server.app import create_app
from chatstream.server.middlewares import append_middlewares
from chatstream.server.ops import resource_usage

EOS = "<::EOS::>"


def build_app(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()
    append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "k", "secure": False}})
    append_apis(chat_stream.server_context, app, {"all": True})
    return app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


async def test_health_follows_the_engine_and_the_drain() -> None:
    cs = ChatStream(use_mock_response=True)
    async with client_for(build_app(cs)) as c:
        starting = await c.get("/health")
        assert (starting.status_code, starting.json()) == (503, {"status": "starting"})
        await cs.startup()
        ok = await c.get("/health")
        assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
        await cs.admission.drain(0.0)
        draining = await c.get("/health")
        assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
    await cs.shutdown(0.0)


async def test_metrics_after_chats_show_latency_and_token_counters(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_new_tokens=4, temperature=0.0)
    await cs.startup()
    async with client_for(build_app(cs)) as c:
        for text in ("hello", "how are you"):
            answer = await c.post("/chat_stream", json={"user_input": text})
            assert answer.status_code == 200 and answer.text.endswith(EOS)
        openai_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        completion = await c.post("/v1/chat/completions", json=openai_body)
        assert completion.status_code == 200, completion.text
        usage = completion.json()["usage"]
        assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 3
        response = await c.get("/metrics")
    await cs.shutdown(1.0)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "chatstream_requests_admitted_total") == 3
    assert metric(text, "chatstream_requests_rejected_total") == 0
    assert metric(text, "chatstream_time_to_first_token_seconds_count") == 3
    assert metric(text, "chatstream_time_to_first_token_seconds_sum") > 0
    assert metric(text, "chatstream_e2e_request_latency_seconds_count") == 3
    assert metric(text, "chatstream_queue_time_seconds_count") == 3
    assert metric(text, "chatstream_generation_tokens_total") >= 3
    assert metric(text, "chatstream_prompt_tokens_total") > 0
    assert metric(text, "chatstream_inter_token_latency_seconds_count") > 0
    assert metric(text, "chatstream_requests_running") == 0


@pytest.mark.local_engine("the transformers engine's own description is checked")
async def test_the_engine_reports_what_it_knows(tiny_model: Any, tiny_tokenizer: Any) -> None:
    roles = {"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}}}
    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, context_len=512, model_name="tiny", client_roles=roles)
    await cs.startup()
    async with client_for(build_app(cs)) as c:
        load = (await c.get("/get_load")).json()["chatstream_workers"][0]["engine"]
        usage = (await c.get("/get_resource_usage")).json()["memory_usage"][0]["engine"]
        models = (await c.get("/v1/models")).json()["data"][0]
        text = (await c.get("/metrics")).text
    await cs.shutdown(1.0)
    assert load == usage and load["engine"] == "transformers" and load["max_model_len"] == 512
    assert (load["num_running"], load["num_waiting"]) == (0, 0)
    assert (models["id"], models["max_model_len"]) == ("tiny", 512) and models.get("root") == load["model"]
    assert metric(text, "chatstream_engine_requests_running") == 0
    assert metric(text, "chatstream_engine_requests_waiting") == 0
    assert metric(text, "chatstream_engine_prefix_cache_bytes") == 0


async def test_drain_lets_running_streams_finish_and_rejects_new_ones() -> None:
    cs = ChatStream(use_mock_response=True, mock_params={"type": "long", "time_per_token_sec": 0.002})
    await cs.startup()
    async with client_for(build_app(cs)) as c:
        running = asyncio.create_task(c.post("/chat_stream", json={"user_input": "tell me a story"}))
        while cs.admission.num_running == 0:
            await asyncio.sleep(0.005)
        drain = asyncio.create_task(cs.shutdown(drain_timeout=30.0))
        await asyncio.sleep(0.01)
        assert (await c.get("/health")).status_code == 503
        refused = await c.post("/chat_stream", json={"user_input": "too late"})
        openai_refused = await c.post(
            "/v1/completions", json={"prompt": "too late"}, headers={"X-FastSession-Skip": "skip"}
        )
        story = await running
        await drain
    assert refused.status_code == 503
    assert openai_refused.status_code == 503 and openai_refused.json()["error"]["code"] == "draining"
    assert story.text.endswith("always the right time to begin something new." + EOS)
    assert not cs.engine.is_running


async def test_drain_timeout_aborts_what_is_still_running() -> None:
    cs = ChatStream(use_mock_response=True, mock_params={"type": "long", "time_per_token_sec": 0.05})
    await cs.startup()
    async with client_for(build_app(cs)) as c:
        running = asyncio.create_task(c.post("/chat_stream", json={"user_input": "long please"}))
        while cs.admission.num_running == 0:
            await asyncio.sleep(0.005)
        await cs.shutdown(drain_timeout=0.1)
        story = await asyncio.wait_for(running, 10)
    assert story.status_code == 200
    assert "begin something new" not in story.text  # cut short when the engine stopped
    assert not cs.engine.is_running


async def test_create_app_lifespan_starts_and_drains() -> None:
    cs = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0})
    app = create_app(
        cs, web_ui_params={"title": "Ops"}, drain_timeout=1.0, middleware_opts={"session": {"secure": False}}
    )
    paths = {getattr(route, "path", None) for route in app.routes}
    assert {"/", "/chatstream.js", "/chat_stream", "/health", "/metrics", "/v1/chat/completions"} <= paths
    async with app.router.lifespan_context(app):
        assert cs.engine.is_running
        async with client_for(app) as c:
            assert (await c.get("/health")).json() == {"status": "ok"}
            assert "<title>Ops</title>" in (await c.get("/")).text
            assert (await c.post("/chat_stream", json={"user_input": "ping"})).text.endswith("ping" + EOS)
    assert not cs.engine.is_running and cs.admission.draining


def test_create_app_rejects_a_negative_drain_timeout() -> None:
    with pytest.raises(ValueError, match="drain_timeout"):
        create_app(ChatStream(use_mock_response=True), drain_timeout=-1)


def test_resource_usage_without_gpus() -> None:
    usage = resource_usage(0, None)
    assert usage["gpus"] == [] and usage["num_gpus"] == 0
    assert usage["cpu"]["total_memory"] > 0 and usage["cpu"]["used_memory"] > 0
    assert resource_usage(None, "cpu")["gpus"] == []


def test_resource_usage_reports_gpus_through_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((10 + i) * gib, 80 * gib))
    one = resource_usage(1, torch.device("cuda:1"))["gpus"]
    assert one == [{"index": 1, "total_memory": 80.0, "used_memory": 69.0}]
    assert [g["index"] for g in resource_usage(None, "cuda")["gpus"]] == [0, 1]
    assert [g["used_memory"] for g in resource_usage(2, None)["gpus"]] == [70.0, 69.0]
    assert resource_usage(0, torch.device("cuda:0"))["gpus"] == []
    assert resource_usage(None, torch.device("cpu"))["gpus"] == []
