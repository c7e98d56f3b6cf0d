"""An engine that cannot start a request: both protocols wait for the first delta before committing a streaming 200,
so a full engine answers 429 + Retry-After and a failing one 503, each in its protocol's shape; sampling the engine
cannot do is a 400 naming the field; a client that leaves while the first delta is awaited aborts the request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.live_server import run_server
from tests.server.support import Recorder, asgi_client, started

from chatstream import ChatStream
from chatstream.config import MockConfig, SamplingParams
from chatstream.engine.base import EngineError, EngineOverloaded, GenerationRequest, RequestStream
from chatstream.engine.mock_engine import MockEngine
from chatstream.server.app import create_app

EOS = "<::EOS::>"


class ScriptedEngine(MockEngine):
    """The echo mock, except while ``error`` is set (each stream fails with it) or ``hold`` is (no delta comes)."""

    def __init__(self) -> None:
        super().__init__(MockConfig(type="echo", time_per_token_sec=0.0))
        self.error: EngineError | None = None
        self.hold = False
        self.held: dict[str, RequestStream] = {}
        self.aborted: list[str] = []

    def add_request(self, request: GenerationRequest) -> RequestStream:
        if self.error is None and not self.hold:
            return super().add_request(request)
        stream = RequestStream(request.request_id)
        if self.error is not None:
            stream.fail(self.error)
        else:
            self.held[request.request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        super().abort(request_id)

    def check_sampling(self, sampling: SamplingParams) -> None:
        if sampling.top_k == 7:
            raise ValueError("top_k=7 is not supported by this engine")


@pytest.fixture
async def engine_and_client() -> AsyncIterator[tuple[ScriptedEngine, ChatStream, httpx.AsyncClient]]:
    engine = ScriptedEngine()
    roles = {"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}}}
    cs = ChatStream(engine=engine, too_many_request_as_http_error=True, client_roles=roles)
    app = FastAPI()
    cs.append_middlewares(app, {"session": {"secret_key": "k", "secure": False}})
    cs.append_apis(app, {"include": ["chat_stream", "openai", "set_generation_params"]})
    async with started(cs), asgi_client(app) as client:
        yield engine, cs, client


def chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


async def test_native_overloaded_and_failing_engines_answer_before_streaming(
    engine_and_client: tuple[ScriptedEngine, ChatStream, httpx.AsyncClient],
) -> None:
    engine, cs, client = engine_and_client
    engine.error = EngineOverloaded("the upstream is full", retry_after=7)
    full = await client.post("/chat_stream", json={"user_input": "lost turn"})
    assert (full.status_code, full.json(), full.headers["retry-after"]) == (429, {"error": "too_many_requests"}, "7")
    engine.error = EngineError("the upstream is gone")
    gone = await client.post("/chat_stream", json={"user_input": "lost turn"})
    assert gone.status_code == 503 and gone.json()["error"] == "service_unavailable"
    assert "the upstream is gone" in gone.json()["detail"]
    engine.error = None
    recorder = Recorder(cs)
    ok = await client.post("/chat_stream", json={"user_input": "kept turn"})
    assert ok.status_code == 200 and ok.text.endswith("kept turn" + EOS)
    assert "lost turn" not in recorder.requests[-1].prompt  # the turns that never started were undone
    assert cs.admission.num_running == 0


async def test_openai_overloaded_and_failing_engines_in_the_openai_shape(
    engine_and_client: tuple[ScriptedEngine, ChatStream, httpx.AsyncClient],
) -> None:
    engine, cs, client = engine_and_client
    for stream in (True, False):
        engine.error = EngineOverloaded("the upstream is full", retry_after=3)
        full = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert full.status_code == 429 and full.headers["retry-after"] == "3"
        assert full.json()["error"]["type"] == "rate_limit_error"
        engine.error = EngineError("the upstream is gone")
        gone = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert gone.status_code == 503 and gone.json()["error"]["code"] == "engine_unavailable"
        assert "the upstream is gone" in gone.json()["error"]["message"]
    engine.error = None
    assert (await client.post("/v1/chat/completions", json=chat_body(stream=True))).status_code == 200
    assert cs.admission.num_running == 0


async def test_sampling_the_engine_cannot_do_is_a_400_naming_the_field(
    engine_and_client: tuple[ScriptedEngine, ChatStream, httpx.AsyncClient],
) -> None:
    _, cs, client = engine_and_client
    refused = await client.post("/v1/chat/completions", json=chat_body(top_k=7))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"
    refused = await client.post("/v1/completions", json={"prompt": "p", "top_k": 7, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"
    stored = await client.post("/set_generation_params", json={"top_k_value": 7})  # the conversation's own value
    assert stored.json()["success"], stored.text
    native = await client.post("/chat_stream", json={"user_input": "hi"})
    assert native.status_code == 400 and "top_k=7" in native.json()["detail"]
    assert cs.admission.num_running == 0


async def test_the_openai_extensions_reach_the_engine(
    engine_and_client: tuple[ScriptedEngine, ChatStream, httpx.AsyncClient],
) -> None:
    _, cs, client = engine_and_client
    recorder = Recorder(cs)
    body = chat_body(stop_token_ids=[5, 9], add_special_tokens=True)
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    request = recorder.requests[-1]
    assert request.sampling.stop_token_ids == (5, 9) and request.add_special_tokens is True
    bad = await client.post("/v1/completions", json={"prompt": "p", "stop_token_ids": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop_token_ids"


async def test_a_default_the_engine_cannot_do_stops_the_start() -> None:
    cs = ChatStream(engine=ScriptedEngine(), top_k=7)
    with pytest.raises(ValueError, match="top_k=7"):
        await cs.startup()


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
def test_a_client_that_leaves_before_the_first_delta_aborts_the_request(path: str) -> None:
    engine = ScriptedEngine()
    engine.hold = True
    cs = ChatStream(engine=engine)
    body = {"user_input": "hi"} if path == "/chat_stream" else chat_body(stream=True)
    with run_server(create_app(cs, drain_timeout=1.0)) as url, httpx.Client(timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"{url}{path}", json=body)  # no header comes while the first delta is awaited
        deadline = time.monotonic() + 5
        while not engine.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(engine.held) == engine.aborted and cs.admission.num_running == 0
