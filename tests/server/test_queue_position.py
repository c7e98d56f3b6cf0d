"""Queue position: SSE comments for a waiting OpenAI stream, the native poll endpoint, and who counts as a user."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from tests.live_server import run_server
from tests.server.support import mock_chat_stream

from chatstream.server.access import ClientRoles
from chatstream.server.app import create_app
from chatstream.server.fairness import queue_ticket_id, user_key

SLOW = {"type": "long", "time_per_token_sec": 0.02}


def slow_app(**kw: Any) -> FastAPI:
    cs = mock_chat_stream(num_of_concurrent_executions=1, max_queue_size=5, mock_params=SLOW, **kw)
    return create_app(cs, middleware_opts={"session": {"secret_key": "k"}}, drain_timeout=1.0)


async def started_stream(response: httpx.Response) -> tuple[str, AsyncIterator[str]]:
    """The first text of a streaming response, and the iterator (keep it: dropping it closes the response)."""
    texts = response.aiter_text()
    return await anext(texts), texts


async def test_waiting_openai_stream_gets_queue_comments_then_the_answer() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400}
    with run_server(slow_app()) as url:
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as running,
        ):
            head, _texts = await started_stream(running)
            assert head.startswith("data: ")
            async with client.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 20}) as waiting:
                events = waiting.aiter_text()
                head = await anext(events)
                assert head.startswith(": queue position 1\n\n")
                await running.aclose()  # frees the slot
                rest = "".join([text async for text in events])
    assert '"chat.completion.chunk"' in rest and rest.endswith("data: [DONE]\n\n")


async def test_native_clients_poll_their_place_in_line() -> None:
    with run_server(slow_app()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as first, httpx.AsyncClient(base_url=url) as second:
            async with first.stream("POST", "/chat_stream", json={"user_input": "a"}) as running:
                _head, _texts = await started_stream(running)
                headers = {"X-ChatStream-Queue-Ticket": "ticket-12345"}
                waiting = asyncio.ensure_future(second.post("/chat_stream", json={"user_input": "b"}, headers=headers))
                position = await poll_until_waiting(second, "ticket-12345")
                assert position == {"waiting": True, "position": 1, "ahead": 0}
                waiting.cancel()  # the client gives up: its request leaves the line
                await asyncio.gather(waiting, return_exceptions=True)
            await asyncio.sleep(0.5)  # the server notices the disconnect within its poll interval
            after = (await second.get("/chat_stream/queue_position", params={"ticket": "ticket-12345"})).json()
    assert after["waiting"] is False and after["position"] is None


async def poll_until_waiting(client: httpx.AsyncClient, ticket: str) -> dict[str, Any]:
    for _ in range(100):
        data = (await client.get("/chat_stream/queue_position", params={"ticket": ticket})).json()
        if data["waiting"]:
            return {key: data[key] for key in ("waiting", "position", "ahead")}
        await asyncio.sleep(0.02)
    raise AssertionError("the request never showed up in line")


def request_with(headers: dict[str, str], client: tuple[str, int] = ("10.0.0.7", 5000)) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw, "client": client, "state": {}, "method": "POST", "path": "/"})


def test_who_counts_as_a_user() -> None:
    phrase_role = {"apis": {"allow": ["openai"], "auth_method": "header_phrase", "header_phrase": "secret-agent"}}
    roles = ClientRoles.from_config(
        {"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}}, "bot": phrase_role}
    )
    assert user_key(request_with({}), roles) == "address:10.0.0.7"
    keyed = user_key(request_with({"Authorization": "Bearer sk-one"}), roles)
    assert keyed.startswith("key:") and "sk-one" not in keyed
    assert keyed == user_key(request_with({"Authorization": "Bearer sk-one"}, ("10.0.0.8", 1)), roles)
    assert user_key(request_with({"X-ChatStream-Auth-Header": "secret-agent"}), roles) == "role:bot"


@pytest.mark.parametrize(("value", "expected"), [("abcdefgh", "abcdefgh"), ("short", None), ("bad ticket!", None)])
def test_queue_ticket_ids_are_checked(value: str, expected: str | None) -> None:
    assert queue_ticket_id(request_with({"X-ChatStream-Queue-Ticket": value})) == expected
