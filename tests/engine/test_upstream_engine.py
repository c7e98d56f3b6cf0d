"""OpenAIUpstreamEngine and its wire format, against real upstream processes (``chatstream serve`` on 127.0.0.1)
and small faulty servers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tests.engine.upstream_server import UpstreamServer
from tests.live_server import free_port, run_server
from tests.tiny_model import collect, greedy

from chatstream.config import SamplingParams
from chatstream.engine.base import EngineError, EngineOverloaded, FinishReason, GenerationRequest
from chatstream.engine.mock_engine import LONG_ANSWER
from chatstream.engine.upstream_engine import OpenAIUpstreamEngine, UpstreamConfig
from chatstream.engine.upstream_protocol import (
    UNKNOWN_TOKEN_ID,
    UpstreamAPI,
    UpstreamFailure,
    chunk_logprobs,
    request_body,
    retry_after_seconds,
)

PROMPT = "The quick brown fox jumps over the lazy dog."
SLOW_MOCK = ["--mock", "--mock-type", "long", "--mock-time-per-token", "0.05"]


@pytest.fixture(scope="module")
def tiny_upstream(tiny_model_dir: Path) -> Iterator[UpstreamServer]:
    """ChatStream serving the tiny model (fp32, CPU)."""
    server = UpstreamServer(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mock_upstream() -> Iterator[UpstreamServer]:
    """ChatStream streaming the mock's long story, a word every 50 ms."""
    server = UpstreamServer(SLOW_MOCK).start()
    yield server
    server.stop()


@pytest.fixture
async def make_engine() -> AsyncIterator[Any]:
    engines: list[OpenAIUpstreamEngine] = []

    def make(base_url: str, **config: Any) -> OpenAIUpstreamEngine:
        engine = OpenAIUpstreamEngine(UpstreamConfig(base_url, **config))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def request(prompt: str = PROMPT, sampling: SamplingParams | None = None, **fields: Any) -> GenerationRequest:
    return GenerationRequest(f"r-{time.monotonic_ns()}", prompt, sampling or greedy(12), **fields)


async def ask_directly(server: UpstreamServer, path: str = "/completions", **body: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(server.base_url + path, json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def load(server: UpstreamServer) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(server.root + "/get_load", headers={"X-FastSession-Skip": "skip"})  # an agent
    workers = response.json()["chatstream_workers"]
    return int(workers[0]["processing"])


# ----- against the tiny model -----


async def test_streamed_text_equals_the_upstreams_own_answer(tiny_upstream: UpstreamServer, make_engine: Any) -> None:
    engine = make_engine(tiny_upstream.base_url)
    out = await collect(engine.add_request(request(sampling=greedy(12))))
    direct = await ask_directly(tiny_upstream, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.text == direct["choices"][0]["text"] and out.text
    assert len(out.deltas) > 2  # streamed in pieces
    last = out.deltas[-1]
    assert last.finish_reason.value == direct["choices"][0]["finish_reason"]
    assert last.num_prompt_tokens == direct["usage"]["prompt_tokens"]
    assert last.num_generated_tokens == direct["usage"]["completion_tokens"]
    assert engine.stats().num_prompt_tokens_total == last.num_prompt_tokens
    assert engine.stats().num_running == 0


async def test_sampling_params_are_forwarded(tiny_upstream: UpstreamServer, make_engine: Any) -> None:
    engine = make_engine(tiny_upstream.base_url)
    texts = []
    for seed in (0, 1, 2):
        sampling = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=None, top_p=0.95, seed=seed)
        out = await collect(engine.add_request(request(sampling=sampling)))
        direct = await ask_directly(
            tiny_upstream, prompt=PROMPT, max_tokens=10, temperature=1.5, top_k=-1, top_p=0.95, seed=seed
        )
        assert out.text == direct["choices"][0]["text"]
        texts.append(out.text)
    assert len(set(texts)) > 1  # the seed reached the upstream


async def test_stop_strings_and_replacements_apply_to_the_streamed_text(
    tiny_upstream: UpstreamServer, make_engine: Any
) -> None:
    engine = make_engine(tiny_upstream.base_url)
    full = (await ask_directly(tiny_upstream, prompt=PROMPT, max_tokens=24, temperature=0))["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = await collect(engine.add_request(request(sampling=greedy(24, stop=(stop,)))))
    assert out.text == full[: full.index(stop)] and out.finish_reason is FinishReason.STOP
    old = full[3:7]  # most likely split across tokens
    out = await collect(engine.add_request(request(sampling=greedy(24), output_replacements=(((old, "<X>"),)))))
    assert out.text == full.replace(old, "<X>")


async def test_chat_mode_sends_the_messages(tiny_upstream: UpstreamServer, make_engine: Any) -> None:
    engine = make_engine(tiny_upstream.base_url, api="chat")
    messages = (("user", "Hello, how are you today?"),)
    out = await collect(engine.add_request(GenerationRequest("c1", "", greedy(8), messages=messages)))
    direct = await ask_directly(
        tiny_upstream,
        "/chat/completions",
        messages=[{"role": "user", "content": messages[0][1]}],
        max_tokens=8,
        temperature=0,
    )
    assert out.text == direct["choices"][0]["message"]["content"] and out.text
    with pytest.raises(EngineError, match="chat mode"):
        engine.add_request(request())


async def test_logprobs_are_forwarded_in_both_modes(tiny_upstream: UpstreamServer, make_engine: Any) -> None:
    out = await collect(make_engine(tiny_upstream.base_url).add_request(request(sampling=greedy(6), logprobs=2)))
    got = [lp for delta in out.deltas for lp in delta.logprobs]
    direct = await ask_directly(tiny_upstream, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    expected = direct["choices"][0]["logprobs"]
    assert [lp.token for lp in got] == expected["tokens"] and len(got) == out.deltas[-1].num_generated_tokens == 6
    assert [lp.logprob for lp in got] == pytest.approx(expected["token_logprobs"], abs=1e-4)
    for lp, top in zip(got, expected["top_logprobs"], strict=True):
        assert [t.token for t in lp.top] == list(top) and [t.logprob for t in lp.top] == pytest.approx(
            list(top.values())
        )
    assert {lp.token_id for lp in got} == {UNKNOWN_TOKEN_ID}

    messages = (("user", "Hello, how are you today?"),)
    chat = make_engine(tiny_upstream.base_url, api="chat")
    out = await collect(chat.add_request(GenerationRequest("c1", "", greedy(6), messages=messages, logprobs=1)))
    got = [lp for delta in out.deltas for lp in delta.logprobs]
    user = [{"role": "user", "content": messages[0][1]}]
    direct = await ask_directly(
        tiny_upstream, "/chat/completions", messages=user, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1
    )
    expected = direct["choices"][0]["logprobs"]["content"]
    assert [(lp.token, list(lp.token_bytes)) for lp in got] == [(e["token"], e["bytes"]) for e in expected]
    assert [lp.logprob for lp in got] == pytest.approx([e["logprob"] for e in expected], abs=1e-4)
    assert [[(t.token, list(t.token_bytes)) for t in lp.top] for lp in got] == [
        [(t["token"], t["bytes"]) for t in e["top_logprobs"]] for e in expected
    ]


# ----- against the slow mock: abort, 429, a killed upstream -----


async def test_abort_closes_the_upstream_request(mock_upstream: UpstreamServer, make_engine: Any) -> None:
    engine = make_engine(mock_upstream.base_url)
    stream = engine.add_request(request(sampling=greedy(200)))
    deltas = aiter(stream)
    first = await anext(deltas)
    assert first.text == "Once" and await load(mock_upstream) == 1
    engine.abort(stream.request_id)
    rest = [delta async for delta in deltas]
    assert rest[-1].finish_reason is FinishReason.ABORT
    deadline = time.monotonic() + 1.0
    while await load(mock_upstream) != 0:
        assert time.monotonic() < deadline, "the upstream still runs the aborted request"
        await asyncio.sleep(0.05)


async def test_stop_from_another_thread_aborts_running_requests(mock_upstream: UpstreamServer) -> None:
    engine = OpenAIUpstreamEngine(UpstreamConfig(mock_upstream.base_url))
    engine.start()
    deltas = aiter(engine.add_request(request(sampling=greedy(200))))
    await anext(deltas)
    await asyncio.to_thread(engine.stop)
    rest = [delta async for delta in deltas]
    assert rest[-1].finish_reason is FinishReason.ABORT and not engine.is_running
    with pytest.raises(EngineError, match="not running"):
        engine.add_request(request())


async def test_upstream_429_becomes_engine_overloaded_with_its_retry_after(make_engine: Any) -> None:
    server = UpstreamServer([*SLOW_MOCK, "--max-concurrency", "1", "--max-queue", "0"])
    server.argv.append("--too-many-requests-as-http-error")
    server.start()
    try:
        engine = make_engine(server.base_url)
        first = aiter(engine.add_request(request(sampling=greedy(200))))
        await anext(first)
        async with httpx.AsyncClient() as client:
            direct = await client.post(server.base_url + "/completions", json={"prompt": "x"})
        assert direct.status_code == 429
        with pytest.raises(EngineOverloaded) as info:
            await collect(engine.add_request(request()))
        assert info.value.retry_after == int(direct.headers["retry-after"])
        assert server.base_url in str(info.value)
    finally:
        server.stop()


async def test_killed_upstream_ends_streams_with_an_error_and_recovers(make_engine: Any) -> None:
    server = UpstreamServer(SLOW_MOCK).start()
    try:
        engine = make_engine(server.base_url)
        deltas = aiter(engine.add_request(request(sampling=greedy(200))))
        await anext(deltas)
        server.kill()
        killed = time.monotonic()
        rest = [delta async for delta in deltas]
        assert time.monotonic() - killed < 1.0
        assert rest[-1].finish_reason is FinishReason.ERROR and server.base_url in (rest[-1].error or "")
        with pytest.raises(EngineError, match="cannot connect"):
            await collect(engine.add_request(request()))
        server.start()
        out = await collect(engine.add_request(request(sampling=greedy(3))))
        assert out.text == " ".join(LONG_ANSWER.split()[:3]) and out.finish_reason is FinishReason.LENGTH
    finally:
        server.stop()


async def test_abort_before_the_request_ran_still_ends_its_stream(make_engine: Any) -> None:
    engine = make_engine(f"http://127.0.0.1:{free_port()}/v1")
    stream = engine.add_request(request())
    engine.abort(stream.request_id)  # its task has not started yet
    out = await asyncio.wait_for(collect(stream), 5)
    assert out.finish_reason is FinishReason.ABORT and engine.stats().num_running == 0


async def test_unreachable_upstream_fails_with_an_error_naming_it(make_engine: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = make_engine(url, connect_timeout_sec=2)
    started = time.monotonic()
    with pytest.raises(EngineError, match=re.escape(f"upstream {url}/completions: cannot connect")):
        await collect(engine.add_request(request()))
    assert time.monotonic() - started < 2


async def test_api_key_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch, make_engine: Any) -> None:
    server = UpstreamServer(["--mock", "--mock-time-per-token", "0", "--api-key", "secret-1"]).start()
    try:
        monkeypatch.setenv("UPSTREAM_TEST_KEY", "secret-1")
        out = await collect(make_engine(server.base_url, api_key_env="UPSTREAM_TEST_KEY").add_request(request()))
        assert out.finish_reason is FinishReason.LENGTH
        with pytest.raises(EngineError, match="401"):
            await collect(make_engine(server.base_url).add_request(request()))
        monkeypatch.delenv("UPSTREAM_TEST_KEY")
        with pytest.raises(EngineError, match="UPSTREAM_TEST_KEY"):
            OpenAIUpstreamEngine(UpstreamConfig(server.base_url, api_key_env="UPSTREAM_TEST_KEY")).start()
    finally:
        server.stop()


# ----- against small faulty servers -----


def faulty_app() -> Starlette:
    async def garbage(request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            yield 'data: {"choices": [{"text": "Hi", "finish_reason": null}]}\n\n'
            yield "data: this is not JSON\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def broken(request: Request) -> Response:
        return JSONResponse({"error": {"message": "the model crashed"}}, status_code=500)

    async def silent(request: Request) -> Response:
        await asyncio.sleep(2)  # longer than the engine waits
        return Response()

    routes = [
        Route(f"/{name}/v1/completions", handler, methods=["POST"])
        for name, handler in (("garbage", garbage), ("broken", broken), ("silent", silent))
    ]
    return Starlette(routes=routes)


@pytest.fixture(scope="module")
def faulty_root() -> Iterator[str]:
    with run_server(faulty_app()) as url:
        yield url


async def test_malformed_stream_after_text_ends_with_an_error_delta(faulty_root: str, make_engine: Any) -> None:
    out = await collect(make_engine(f"{faulty_root}/garbage/v1").add_request(request()))
    assert out.text == "Hi"
    assert out.finish_reason is FinishReason.ERROR and "not a JSON object" in (out.deltas[-1].error or "")


async def test_upstream_5xx_and_silence_fail_with_engine_errors(faulty_root: str, make_engine: Any) -> None:
    with pytest.raises(EngineError, match="500 Internal Server Error: the model crashed"):
        await collect(make_engine(f"{faulty_root}/broken/v1").add_request(request()))
    engine = make_engine(f"{faulty_root}/silent/v1", read_timeout_sec=0.5)
    with pytest.raises(EngineError, match=r"no data for 0\.5 s"):
        await collect(engine.add_request(request()))


# ----- units -----


def test_request_body_maps_sampling_params() -> None:
    sampling = SamplingParams(
        max_new_tokens=7,
        temperature=0.7,
        top_k=None,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        seed=3,
        stop=("\nUser:",),
        stop_token_ids=(5,),
        ignore_eos=True,
    )
    body = request_body(request(sampling=sampling, add_special_tokens=False), UpstreamConfig("http://h/v1", "m"))
    assert body == {
        "stream": True,
        "stream_options": {"include_usage": True},
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.0,
        "seed": 3,
        "stop": ["\nUser:"],
        "top_k": -1,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "ignore_eos": True,
        "stop_token_ids": [5],
        "add_special_tokens": False,
    }
    assert request_body(request(sampling=greedy(4)), UpstreamConfig("http://h/v1"))["temperature"] == 0.0


def test_request_body_asks_for_logprobs_in_each_api_s_shape() -> None:
    asked = request(logprobs=3, messages=(("user", "hi"),))
    assert request_body(asked, UpstreamConfig("http://h/v1"))["logprobs"] == 3
    chat = request_body(asked, UpstreamConfig("http://h/v1", api="chat"))
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
    assert "logprobs" not in request_body(request(), UpstreamConfig("http://h/v1"))


def test_chunk_logprobs_read_both_shapes_and_refuse_others() -> None:
    completion = {
        "text": " é",
        "logprobs": {"tokens": [" \u00e9"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -2.0, " \u00e9": -0.5}]},
    }
    (lp,) = chunk_logprobs(completion, UpstreamAPI.COMPLETIONS)
    assert (lp.token_id, lp.token, lp.logprob, lp.token_bytes) == (UNKNOWN_TOKEN_ID, " é", -0.5, " é".encode())
    assert [(t.token, t.logprob) for t in lp.top] == [(" é", -0.5), ("a", -2.0)]  # best first
    piece = {
        "token": "\ufffd",
        "logprob": -1.0,
        "bytes": [195],
        "top_logprobs": [{"token": "\ufffd", "logprob": -1.0, "bytes": [195]}],
    }
    (lp,) = chunk_logprobs({"delta": {"content": ""}, "logprobs": {"content": [piece]}}, UpstreamAPI.CHAT)
    assert (lp.token, lp.token_bytes, lp.top[0].token_bytes) == ("\ufffd", b"\xc3", b"\xc3")
    assert chunk_logprobs({"text": "x", "logprobs": None}, UpstreamAPI.COMPLETIONS) == ()
    for bad in ({"tokens": ["a"], "token_logprobs": []}, {"tokens": "a"}, ["a"]):
        with pytest.raises(UpstreamFailure, match="malformed logprobs"):
            chunk_logprobs({"text": "a", "logprobs": bad}, UpstreamAPI.COMPLETIONS)


def test_request_body_refuses_what_the_upstream_cannot_be_asked() -> None:
    subtractive = SamplingParams(repetition_penalty=0.5, repetition_penalty_method="subtractive")
    with pytest.raises(ValueError, match="repetition_penalty_method='subtractive'"):
        request_body(request(sampling=subtractive), UpstreamConfig("http://h/v1"))
    plain = UpstreamConfig("https://api.example.com/v1", sampling_extensions=False)
    with pytest.raises(ValueError, match="top_k=50"):
        request_body(request(sampling=SamplingParams()), plain)
    with pytest.raises(ValueError, match="stop_token_ids"):
        OpenAIUpstreamEngine(plain).check_sampling(SamplingParams(top_k=None, stop_token_ids=(5,)))
    body = request_body(request(sampling=SamplingParams(top_k=None), add_special_tokens=False), plain)
    assert "top_k" not in body and "min_p" not in body and "add_special_tokens" not in body


def test_config_is_validated() -> None:
    assert UpstreamConfig("http://h:8000/v1/").endpoint == "http://h:8000/v1/completions"
    assert UpstreamConfig("http://h/v1", api="chat").endpoint == "http://h/v1/chat/completions"
    for bad in (
        {"base_url": "h:8000"},
        {"base_url": "http://h", "api": "embeddings"},
        {"base_url": "http://h", "read_timeout_sec": 0},
    ):
        with pytest.raises(ValueError):
            UpstreamConfig(**bad)


def test_retry_after_seconds() -> None:
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds(None) == 1 and retry_after_seconds("soon") == 1
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= retry_after_seconds(later) <= 31
