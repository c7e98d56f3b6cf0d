"""The original package's README server runs unchanged: history, regenerate, wire format, errors, admission."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastsession import FastSessionMiddleware, MemoryStore
from tests.live_server import run_server

from chatstream import ChatPromptTogetherRedPajamaINCITEChat as ChatPrompt
from chatstream import ChatStream
from chatstream.engine.mock_engine import LONG_ANSWER, ROUND_ANSWERS

EOS = "<::EOS::>"

# The seed README registers its startup hook with @app.on_event, which FastAPI now deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:\\s*on_event is deprecated:DeprecationWarning")


def seed_readme_app(chat_stream: ChatStream) -> FastAPI:
    """The original README's server, line for line (model and tokenizer come from the caller)."""
    app = FastAPI()
    app.add_middleware(
        FastSessionMiddleware,
        secret_key="your-secret-key",
        store=MemoryStore(),
        http_only=True,
        secure=False,
    )

    @app.post("/chat_stream")
    async def stream_api(request: Request):  # type: ignore[no-untyped-def]
        response = await chat_stream.handle_chat_stream_request(request)
        return response

    @app.on_event("startup")
    async def startup():  # type: ignore[no-untyped-def]
        await chat_stream.start_queue_worker()

    return app


def segments(body: str) -> list[str]:
    """Split a native stream into its cumulative segments; the body must end with the finish token."""
    assert body.endswith(EOS), body[-50:]
    return body.split(EOS)[:-1]


async def chat(client: httpx.AsyncClient, url: str, body: Any) -> httpx.Response:
    return await client.post(f"{url}/chat_stream", content=json.dumps(body), timeout=60)


def mock_stream(**kw: Any) -> ChatStream:
    params = {"type": "round", "time_per_token_sec": 0.0}
    params.update(kw.pop("mock_params", {}))
    return ChatStream(use_mock_response=True, mock_params=params, chat_prompt_clazz=ChatPrompt, **kw)


async def test_two_turns_keep_history_and_regenerate_replaces_the_last_answer() -> None:
    with run_server(seed_readme_app(mock_stream())) as url:
        async with httpx.AsyncClient() as client:
            first = await chat(client, url, {"user_input": "hello"})
            second = await chat(client, url, {"user_input": "and again"})
            regen = await chat(client, url, {"user_input": None, "regenerate": True})
            third = await chat(client, url, {"user_input": "third"})
    assert first.headers["content-type"].startswith("text/plain")
    assert segments(first.text)[-1] == ROUND_ANSWERS[0]
    assert segments(second.text)[-1] == ROUND_ANSWERS[1]  # turn 2: the history was kept
    assert segments(regen.text)[-1] == ROUND_ANSWERS[1]  # still turn 2: the answer was replaced, not appended
    assert segments(third.text)[-1] == ROUND_ANSWERS[2]
    ids = [r.headers["X-ChatStream-Last-Generated-Message-Id"] for r in (first, second, regen, third)]
    assert len(set(ids)) == 4 and all(uuid.UUID(i).version == 4 for i in ids)


async def test_every_chunk_is_the_cumulative_answer() -> None:
    with run_server(seed_readme_app(mock_stream(mock_params={"type": "long"}))) as url:
        async with httpx.AsyncClient() as client:
            parts = []
            async with client.stream("POST", f"{url}/chat_stream", json={"user_input": "tell me"}) as resp:
                async for chunk in resp.aiter_text():
                    parts.append(chunk)
    body = "".join(parts)
    segs = segments(body)
    assert len(segs) > 10
    for before, after in itertools.pairwise(segs):
        assert after.startswith(before) and len(after) > len(before)


async def test_japanese_echo_streams_per_character() -> None:
    cs = mock_stream(mock_params={"type": "echo"})
    with run_server(seed_readme_app(cs)) as url:
        async with httpx.AsyncClient() as client:
            resp = await chat(client, url, {"user_input": "こんにちは、世界"})
    assert segments(resp.text) == ["こんにちは、世界"[: i + 1] for i in range(len("こんにちは、世界"))]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("not json", "JSON"),
        ("[1, 2]", "object"),
        ('{"text": "hi"}', "'user_input' is missing"),
        ('{"user_input": 5}', "'user_input' must be a string"),
        ('{"user_input": "x", "regenerate": "yes"}', "'regenerate' must be a boolean"),
        ('{"user_input": null, "regenerate": true}', "conversation is empty"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(body: str, detail: str) -> None:
    calls: list[str] = []
    cs = mock_stream(num_of_concurrent_executions=1, max_queue_size=0)
    app = seed_readme_app(cs)

    @app.post("/chat_cb")
    async def with_callback(request: Request):  # type: ignore[no-untyped-def]
        return await cs.handle_chat_stream_request(request, callback=lambda req, msg: calls.append(msg))

    with run_server(app) as url:
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"{url}/chat_cb", content=body)
            assert resp.status_code == 400
            assert resp.json()["error"] == "bad_request" and detail in resp.json()["detail"]
            ok = await chat(client, url, {"user_input": "still served"})  # the slot was released
    assert segments(ok.text)[-1] == ROUND_ANSWERS[0]
    assert len(calls) == 1 and calls[0].startswith("unknown_error_occurred")


async def test_missing_session_middleware_is_a_500_that_says_so() -> None:
    cs = mock_stream()
    app = FastAPI()

    @app.post("/chat_stream")
    async def stream_api(request: Request):  # type: ignore[no-untyped-def]
        return await cs.handle_chat_stream_request(request)

    with run_server(app) as url:
        async with httpx.AsyncClient() as client:
            resp = await chat(client, url, {"user_input": "hi"})
    assert resp.status_code == 500
    assert "session middleware" in resp.json()["detail"]


async def _ten_at_once(as_http_error: bool) -> list[httpx.Response]:
    cs = mock_stream(
        num_of_concurrent_executions=2,
        max_queue_size=5,
        too_many_request_as_http_error=as_http_error,
        mock_params={"type": "round", "time_per_token_sec": 0.02},
    )
    with run_server(seed_readme_app(cs)) as url:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client:
            return list(await asyncio.gather(*(chat(client, url, {"user_input": f"u{i}"}) for i in range(10))))


@pytest.mark.parametrize("as_http_error", [False, True])
async def test_ten_simultaneous_requests_seven_stream_three_rejected(as_http_error: bool) -> None:
    responses = await _ten_at_once(as_http_error)
    streamed = [r for r in responses if r.headers["content-type"].startswith("text/plain")]
    rejected = [r for r in responses if r.headers["content-type"].startswith("application/json")]
    assert len(streamed) == 7 and len(rejected) == 3
    assert all(segments(r.text)[-1] == ROUND_ANSWERS[0] for r in streamed)
    for r in rejected:
        assert r.json() == {"error": "too_many_requests"}
        if as_http_error:
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        else:
            assert r.status_code == 200 and "Retry-After" not in r.headers


class DisconnectingClient:
    """A slow "long" mock behind fastsession with one slot; ``read_five_and_leave`` disconnects mid-answer."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.chat_stream = mock_stream(
            num_of_concurrent_executions=1, max_queue_size=0, mock_params={"type": "long", "time_per_token_sec": 0.02}
        )
        self.store = MemoryStore()
        self.app = FastAPI()
        self.app.add_middleware(FastSessionMiddleware, secret_key="k", store=self.store, http_only=True, secure=False)

        @self.app.post("/chat_stream")
        async def stream_api(request: Request):  # type: ignore[no-untyped-def]
            return await self.chat_stream.handle_chat_stream_request(
                request, callback=lambda req, msg: self.calls.append(msg)
            )

    async def read_five_and_leave(self, client: httpx.AsyncClient, url: str) -> str:
        received = ""
        async with client.stream("POST", f"{url}/chat_stream", json={"user_input": "go"}) as resp:
            async for chunk in resp.aiter_text():
                received += chunk
                if received.count(EOS) >= 5:
                    break
        for _ in range(100):
            if self.calls:
                break
            await asyncio.sleep(0.05)
        return received

    def history(self) -> Any:
        (entry,) = self.store.raw_memory_store.values()
        return entry["store"]["chat_prompt"]


async def test_disconnect_mid_stream_frees_the_slot_and_regenerate_replaces_the_answer() -> None:
    env = DisconnectingClient()
    with run_server(env.app) as url:
        async with httpx.AsyncClient() as client:
            await env.read_five_and_leave(client, url)
            assert env.calls == ["client_disconnected_while_streaming"]
            assert env.chat_stream.admission.num_running == 0
            follow = await client.post(f"{url}/chat_stream", json={"user_input": None, "regenerate": True})
    assert follow.status_code == 200 and segments(follow.text)
    # the regenerated answer replaced the partial one: still one turn, with a complete long answer
    assert env.history().get_turn() == 1
    assert env.history().get_responder_last_msg() == segments(follow.text)[-1] == LONG_ANSWER


async def test_disconnect_keeps_the_partial_answer_in_the_history() -> None:
    env = DisconnectingClient()
    with run_server(env.app) as url:
        async with httpx.AsyncClient() as client:
            received = await env.read_five_and_leave(client, url)
    partial = segments(received)[-1]
    kept = env.history().get_responder_last_msg()
    assert kept.startswith(partial) and 0 < len(kept) < len(LONG_ANSWER)


async def test_tiny_model_behind_the_seed_readme_server(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = ChatStream(
        num_of_concurrent_executions=2,
        max_queue_size=5,
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        device="cpu",
        chat_prompt_clazz=ChatPrompt,
        max_new_tokens=12,
        temperature=0.0,
    )
    with run_server(seed_readme_app(cs)) as url:
        async with httpx.AsyncClient() as client:
            first = await chat(client, url, {"user_input": "hello there"})
            second = await chat(client, url, {"user_input": "more"})
            regen = await chat(client, url, {"user_input": None, "regenerate": True})
    for resp in (first, second, regen):
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        segs = segments(resp.text)
        for before, after in itertools.pairwise(segs):
            assert after.startswith(before)
    assert segments(second.text)[-1] == segments(regen.text)[-1]  # greedy: regenerating gives the same answer
