"""The OpenAI-compatible API: validation, SSE framing, admission, API keys, roles, disconnects, the official SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from tests.live_server import run_server
from tests.server.support import Recorder, asgi_client, mock_chat_stream, started

from chatstream import ChatStream
from chatstream.engine.base import Delta, FinishReason, GenerationRequest, RequestStream
from chatstream.server.apis import append_apis
from chatstream.server.app import create_app
from chatstream.server.openai import api_key_matches

MOCK = "chatstream-mock"


def build_app(chat_stream: ChatStream, **opts: Any) -> FastAPI:
    app = FastAPI()
    append_apis(chat_stream.server_context, app, {"include": ["openai"], **opts})
    return app


@pytest.fixture
async def chat_stream() -> AsyncIterator[ChatStream]:
    async with started(mock_chat_stream()) as cs:
        yield cs


@pytest.fixture
async def client(chat_stream: ChatStream) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(chat_stream)) as c:
        yield c


def chat_body(text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": MOCK, "messages": [{"role": "user", "content": text}], **extra}


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n"), text[-40:]
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: ") :] for event in events]


# ----- success -----


async def test_chat_completion_non_streaming(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body("one two three"))
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == MOCK
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "one two three"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3


async def test_chat_completion_streaming_with_usage(client: httpx.AsyncClient) -> None:
    body = chat_body("one two three", stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_streaming_without_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body("a b", stream=True))
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)


async def test_max_tokens_gives_finish_reason_length(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=chat_body("a b c d e", max_tokens=2))).json()
    assert body["choices"][0]["message"]["content"] == "a b"
    assert body["choices"][0]["finish_reason"] == "length"
    newer = chat_body("a b c d e", max_tokens=4, max_completion_tokens=1)
    assert (await client.post("/v1/chat/completions", json=newer)).json()["choices"][0]["message"]["content"] == "a"


async def test_sampling_parameters_reach_the_engine(client: httpx.AsyncClient, chat_stream: ChatStream) -> None:
    recorder = Recorder(chat_stream)
    extra = {
        "temperature": 0,
        "top_p": 0.5,
        "top_k": -1,
        "min_p": 0.1,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.2,
        "seed": 7,
        "ignore_eos": True,
        "stop": "END",
        "max_tokens": 9,
        "user": "someone",
        "unknown_field": {"ignored": True},
    }
    assert (await client.post("/v1/chat/completions", json=chat_body(**extra))).status_code == 200
    sampling = recorder.requests[-1].sampling
    assert sampling.greedy and sampling.top_p == 0.5 and sampling.top_k is None and sampling.min_p == 0.1
    assert (sampling.frequency_penalty, sampling.presence_penalty) == (0.5, -0.5)
    assert (sampling.repetition_penalty, sampling.seed, sampling.max_new_tokens) == (1.2, 7, 9)
    assert "END" in sampling.stop and sampling.ignore_eos
    assert recorder.requests[-1].request_id.startswith("chatcmpl-")


async def test_system_and_history_messages_build_the_prompt(client: httpx.AsyncClient, chat_stream: ChatStream) -> None:
    recorder = Recorder(chat_stream)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
    ]
    response = await client.post("/v1/chat/completions", json={"model": MOCK, "messages": messages})
    assert response.json()["choices"][0]["message"]["content"] == "second"
    prompt = recorder.requests[-1].prompt
    assert all(part in prompt for part in ("Be brief.", "first", "answer one", "second"))
    assert prompt.index("first") < prompt.index("answer one") < prompt.index("second")


async def test_completions(client: httpx.AsyncClient, chat_stream: ChatStream) -> None:
    recorder = Recorder(chat_stream)
    body = (await client.post("/v1/completions", json={"model": MOCK, "prompt": "x y"})).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "x y" and body["choices"][0]["finish_reason"] == "stop"
    assert recorder.requests[-1].prompt == "x y" and recorder.requests[-1].sampling.max_new_tokens == 16
    streamed = await client.post("/v1/completions", json={"model": MOCK, "prompt": ["x y"], "stream": True})
    events = sse_events(streamed.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and "".join(c["choices"][0]["text"] for c in chunks) == "x y"


async def test_models(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MOCK]


# ----- validation -----


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat_body(n=0), "n"),
        ("/v1/chat/completions", chat_body(n=17), "n"),
        ("/v1/chat/completions", chat_body(temperature=2.5), "temperature"),
        ("/v1/chat/completions", chat_body(temperature="hot"), "temperature"),
        ("/v1/chat/completions", chat_body(top_p=0), "top_p"),
        ("/v1/chat/completions", chat_body(max_tokens=0), "max_tokens"),
        ("/v1/chat/completions", chat_body(frequency_penalty=3), "frequency_penalty"),
        ("/v1/chat/completions", chat_body(stream="yes"), "stream"),
        ("/v1/chat/completions", chat_body(stop=[""]), "stop"),
        ("/v1/chat/completions", chat_body(stop=[str(i) for i in range(17)]), "stop"),
        ("/v1/chat/completions", chat_body(top_logprobs=2), "top_logprobs"),
        ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
        ("/v1/chat/completions", chat_body(tools=[{"type": "function"}]), "tools[0].function.name"),
        ("/v1/chat/completions", chat_body(tools=[{"type": "retrieval"}]), "tools[0]"),
        ("/v1/chat/completions", chat_body(tool_choice="required"), "tool_choice"),
        ("/v1/chat/completions", chat_body(functions=[{"name": "f"}]), "functions"),
        ("/v1/chat/completions", chat_body(response_format={"type": "xml"}), "response_format.type"),
        ("/v1/chat/completions", chat_body(response_format={"type": "json_schema"}), "response_format.json_schema"),
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
        ("/v1/chat/completions", {"model": MOCK}, "messages"),
        ("/v1/chat/completions", {"model": MOCK, "messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "a", "echo": True}, "echo"),
        ("/v1/completions", {}, "prompt"),
    ],
)
async def test_bad_input_is_400_in_the_openai_shape(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("raw", [b"", b"{oops", b"[]", b'"text"'])
async def test_bodies_that_are_not_json_objects(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post("/v1/chat/completions", content=raw)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


async def test_an_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-4"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and response.json()["error"]["param"] == "model"


# ----- admission, draining -----


async def test_queue_full_is_429_with_retry_after() -> None:
    cs = mock_chat_stream(
        num_of_concurrent_executions=1, max_queue_size=0, mock_params={"type": "long", "time_per_token_sec": 0.01}
    )
    await cs.startup()
    transport = httpx.ASGITransport(app=build_app(cs))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as c:
        running = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        while cs.admission.num_running == 0:
            await asyncio.sleep(0.005)
        rejected = await c.post("/v1/chat/completions", json=chat_body())
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    await cs.shutdown(0.0)
    assert rejected.status_code == 429 and int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert b"chatstream_requests_rejected_total 1.0" in cs.metrics.render()


async def test_draining_is_503(client: httpx.AsyncClient, chat_stream: ChatStream) -> None:
    await chat_stream.admission.drain(0.0)
    response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 503 and response.json()["error"]["code"] == "draining"


def fail_generations(chat_stream: ChatStream) -> None:
    """Make the engine answer every request with one piece of text and then an error."""

    def add_request(request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request.request_id)
        stream.put_nowait(Delta(text="partial", token_ids=(1,), num_generated_tokens=1))
        stream.put_nowait(Delta(text="", finish_reason=FinishReason.ERROR, error="CUDA out of memory"))
        return stream

    chat_stream.engine.add_request = add_request  # type: ignore[method-assign]


async def test_an_engine_error_is_500_or_an_error_event(client: httpx.AsyncClient, chat_stream: ChatStream) -> None:
    fail_generations(chat_stream)
    plain = await client.post("/v1/chat/completions", json=chat_body())
    assert plain.status_code == 500
    assert plain.json()["error"]["code"] == "generation_error" and "out of memory" in plain.json()["error"]["message"]
    streamed = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "generation_error"
    assert chat_stream.admission.num_running == 0


# ----- access -----


def test_api_key_matching() -> None:
    assert api_key_matches("Bearer k2", ("k1", "k2"))
    assert api_key_matches("bearer  k1 ", ("k1",))
    assert not api_key_matches("Bearer k3", ("k1", "k2"))
    assert not api_key_matches("k1", ("k1",))
    assert not api_key_matches(None, ("k1",))
    assert not api_key_matches("Bearer ", ("k1",))


async def test_api_keys_are_required_when_configured(chat_stream: ChatStream) -> None:
    transport = httpx.ASGITransport(app=build_app(chat_stream, api_keys=("sk-test",)))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        missing = await c.post("/v1/chat/completions", json=chat_body())
        wrong = await c.get("/v1/models", headers={"Authorization": "Bearer sk-nope"})
        right = await c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sk-test"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert right.status_code == 200


ROLES = {
    "user": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing", "use_session": True}},
    "agent": {"apis": {"allow": ["get_load"], "auth_method": "nothing", "use_session": False}},
    "bot": {"apis": {"allow": ["openai"], "auth_method": "header_phrase", "header_phrase": "bot-pass"}},
}


async def test_roles_govern_the_openai_api() -> None:
    cs = mock_chat_stream(client_roles=ROLES)
    await cs.startup()
    for keys in ((), ("sk-test",)):
        transport = httpx.ASGITransport(app=build_app(cs, api_keys=keys))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            denied = await c.post("/v1/chat/completions", json=chat_body())
            by_phrase = await c.post(
                "/v1/chat/completions", json=chat_body(), headers={"X-ChatStream-Auth-Header": "bot-pass"}
            )
        assert denied.status_code == (401 if keys else 403)
        assert set(denied.json()["error"]) == {"message", "type", "param", "code"}
        assert by_phrase.status_code == 200
    await cs.shutdown(1.0)


# ----- real server: disconnects and the official SDK -----


def test_client_disconnect_aborts_the_generation() -> None:
    cs = mock_chat_stream(mock_params={"type": "long", "time_per_token_sec": 0.02})
    with run_server(create_app(cs, drain_timeout=1.0)) as url, httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{url}/v1/chat/completions", json=chat_body(stream=True)) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        deadline = time.monotonic() + 5
        while cs.admission.num_running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cs.admission.num_running == 0
        metrics = c.get(f"{url}/metrics").text
    assert 'chatstream_requests_finished_total{reason="abort"} 1.0' in metrics


def test_the_official_openai_sdk_streams_and_completes() -> None:
    cs = mock_chat_stream(mock_params={"type": "echo", "time_per_token_sec": 0.001})
    with run_server(create_app(cs, api_keys=("sk-local",))) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=20)
        models = sdk.models.list()
        assert [m.id for m in models.data] == [MOCK]

        completion = sdk.chat.completions.create(model=MOCK, messages=[{"role": "user", "content": "Hello SDK"}])
        assert completion.choices[0].message.content == "Hello SDK"
        assert completion.usage is not None and completion.usage.completion_tokens == 2

        stream = sdk.chat.completions.create(
            model=MOCK,
            messages=[{"role": "user", "content": "streamed words here"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "streamed words here"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

        legacy = sdk.completions.create(model=MOCK, prompt="raw prompt", max_tokens=1)
        assert legacy.choices[0].text == "raw" and legacy.choices[0].finish_reason == "length"

        with pytest.raises(openai.BadRequestError) as bad:
            sdk.chat.completions.create(model=MOCK, messages=[{"role": "user", "content": "x"}], n=0)
        assert bad.value.status_code == 400
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_conversation_key_follows_the_opening_of_the_chat() -> None:
    from chatstream.server.openai import conversation_key

    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye"}]
    assert conversation_key(turn1, None) == conversation_key(turn2, None)
    assert conversation_key(turn1, None) != conversation_key(other, None)
    assert conversation_key(turn1, "alice") != conversation_key(turn1, "bob")


@pytest.mark.local_engine("the per-conversation KV cache and its cached-token counts are our engine's")
async def test_the_next_turn_of_an_openai_chat_reuses_its_kv_cache(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, temperature=0.0, max_new_tokens=6)
    async with started(cs), asgi_client(build_app(cs)) as client:
        first_messages = [{"role": "user", "content": "hello there, how are you today?"}]
        first = (await client.post("/v1/chat/completions", json={"messages": first_messages})).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        answer = first["choices"][0]["message"]["content"]
        second_messages = [*first_messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "ok"}]
        second = (await client.post("/v1/chat/completions", json={"messages": second_messages})).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] < second["usage"]["prompt_tokens"]


async def test_completions_with_logprobs_and_several_choices(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/completions", json={"prompt": "one two", "logprobs": 1, "n": 2})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 4
    logprobs = body["choices"][1]["logprobs"]
    assert logprobs == {
        "tokens": ["one", " two"],
        "token_logprobs": [0.0, 0.0],
        "top_logprobs": [{"one": 0.0}, {" two": 0.0}],
        "text_offset": [0, 3],
    }
    streamed = await client.post("/v1/completions", json={"prompt": "one two", "logprobs": 0, "stream": True})
    chunks = [json.loads(e) for e in sse_events(streamed.text)[:-1]]
    assert [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] == [
        "one",
        " two",
    ]


async def test_chat_logprobs_on_the_mock(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=chat_body("a b", logprobs=True, top_logprobs=3))).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["logprob"], e["bytes"]) for e in content] == [("a", 0.0, [97]), (" b", 0.0, [32, 98])]
    assert content[0]["top_logprobs"] == [{"token": "a", "logprob": 0.0, "bytes": [97]}]
