"""Conversations under stress: two tabs writing one conversation, damaged and foreign records, a store that is down.

Each failure is a clear error for the request that meets it; the server keeps serving every other conversation."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from tests.live_server import free_port
from tests.server.support import asgi_client, mock_chat_stream

from chatstream import ChatStream
from chatstream.server.apis import append_apis
from chatstream.server.middlewares import append_middlewares
from chatstream.sessions import open_store
from chatstream.sessions.store import MemoryStore

EOS = "<::EOS::>"
CONVERSATION_ID = "X-ChatStream-Conversation-Id"
MESSAGE_ID = "X-ChatStream-Last-Generated-Message-Id"


def build_app(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()
    append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "k", "secure": False}})
    append_apis(chat_stream.server_context, app, {"all": True})
    return app


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chatstream.db"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def slow_stream(store_url: str) -> AsyncIterator[ChatStream]:
    """An echo mock that streams one word every 20 ms, on the store."""
    cs = mock_chat_stream(store=store_url, mock_params={"time_per_token_sec": 0.02})
    await cs.startup()
    yield cs
    await cs.shutdown(1.0)


async def chat(client: httpx.AsyncClient, text: str | None, **body: Any) -> httpx.Response:
    response = await client.post("/chat_stream", json={"user_input": text, **body})
    assert response.status_code == 200 and response.text.endswith(EOS), response.text
    return response


async def texts(client: httpx.AsyncClient, conversation_id: str) -> list[str]:
    response = await client.get(f"/conversations/{conversation_id}/items")
    assert response.status_code == 200, response.text
    return [item["content"][0]["text"] for item in response.json()["data"]]


async def test_two_tabs_writing_one_conversation_keep_every_turn(slow_stream: ChatStream) -> None:
    async with asgi_client(build_app(slow_stream)) as tab_a:
        conversation_id = (await chat(tab_a, "start")).headers[CONVERSATION_ID]
        async with asgi_client(build_app(slow_stream)) as tab_b:
            tab_b.cookies = tab_a.cookies  # the same browser: one session, two tabs
            words = [" ".join(f"{tab}{i}" for i in range(8)) for tab in ("a", "b")]
            await asyncio.gather(chat(tab_a, words[0]), chat(tab_b, words[1], conversation_id=conversation_id))
        kept = await texts(tab_a, conversation_id)
    assert kept[:2] == ["start", "start"]
    assert sorted(kept[2:]) == sorted([words[0], words[0], words[1], words[1]])
    assert kept[2] == kept[3] and kept[4] == kept[5]  # each question is followed by its own answer


async def test_a_regenerate_and_a_turn_at_once_keep_both(slow_stream: ChatStream) -> None:
    long_question = " ".join(f"w{i}" for i in range(20))
    async with asgi_client(build_app(slow_stream)) as tab_a, asgi_client(build_app(slow_stream)) as tab_b:
        first = await chat(tab_a, long_question)
        conversation_id = first.headers[CONVERSATION_ID]
        tab_b.cookies = tab_a.cookies

        async def turn_in_between() -> httpx.Response:
            await asyncio.sleep(0.1)  # while the regenerated answer streams
            return await chat(tab_b, "short", conversation_id=conversation_id)

        regenerated, turn = await asyncio.gather(chat(tab_a, None, regenerate=True), turn_in_between())
        data = (await tab_a.get(f"/conversations/{conversation_id}/items")).json()["data"]
    assert [item["content"][0]["text"] for item in data] == [long_question, long_question, "short", "short"]
    assert data[1]["id"] == regenerated.headers[MESSAGE_ID] != first.headers[MESSAGE_ID]
    assert data[3]["id"] == turn.headers[MESSAGE_ID]


def _damage(store_url: str, conversation_id: str, what: str) -> None:
    """Break one record behind the store's back: its messages ("corrupt") or its prompt class ("foreign")."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            if what == "corrupt":
                conn.execute("UPDATE messages SET feedback = '{not json' WHERE conversation_id = ?", (conversation_id,))
            else:
                conn.execute("UPDATE conversations SET prompt_class = 'x.OtherPrompt' WHERE id = ?", (conversation_id,))
        return
    client = redis.Redis.from_url(store_url)
    try:
        if what == "corrupt":
            client.lset(f"chatstream:conv:{conversation_id}:messages", 0, b"{not json")
        else:
            client.hset(f"chatstream:conv:{conversation_id}", "prompt_class", "x.OtherPrompt")
    finally:
        client.close()


@pytest.mark.parametrize("what", ["corrupt", "foreign"])
async def test_a_damaged_record_fails_its_requests_only(slow_stream: ChatStream, store_url: str, what: str) -> None:
    async with asgi_client(build_app(slow_stream)) as user, asgi_client(build_app(slow_stream)) as other_user:
        damaged = (await chat(user, "soon damaged")).headers[CONVERSATION_ID]
        healthy = (await user.post("/conversations", json={"title": "healthy"})).json()["id"]
        _damage(store_url, damaged, what)
        refused = await user.post("/chat_stream", json={"user_input": "hi", "conversation_id": damaged})
        assert refused.status_code == 500 and damaged in refused.json()["detail"]
        if what == "corrupt":
            listed = await user.get(f"/conversations/{damaged}/items")
            assert listed.status_code == 500 and damaged in listed.json()["error"]["message"]
            assert listed.json()["error"]["code"] == "corrupt_record"
        await chat(user, "still fine", conversation_id=healthy)  # the user's other conversation
        assert await texts(user, healthy) == ["still fine", "still fine"]
        await chat(other_user, "others are served")
        assert (await user.get("/health")).status_code == 200


async def test_a_store_that_is_down_is_a_503_and_the_server_keeps_answering() -> None:
    cs = mock_chat_stream(store=f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=1")
    app = FastAPI()  # sessions in memory here: the conversations' store is the one that is down
    sessions = {"secret_key": "k", "secure": False, "store": MemoryStore()}
    append_middlewares(cs.server_context, app, {"session": sessions})
    append_apis(cs.server_context, app, {"all": True})
    async with asgi_client(app) as client:
        refused = await client.post("/chat_stream", json={"user_input": "hi"})
        assert refused.status_code == 503 and refused.json()["error"] == "service_unavailable"
        assert "unavailable" in refused.json()["detail"]
        assert cs.admission.num_running == 0  # the slot was released
        created = await client.post("/conversations", json={})
        assert created.status_code == 503 and created.json()["error"]["code"] == "store_unavailable"
        assert (await client.get("/health")).status_code == 200


async def test_sessions_in_a_durable_store_hold_json_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/chatstream.db"
    cs = mock_chat_stream(store=url)
    async with asgi_client(build_app(cs)) as client:
        conversation_id = (await chat(client, "json only")).headers[CONVERSATION_ID]
    await cs.shutdown(0)
    with sqlite3.connect(tmp_path / "chatstream.db") as conn:
        ((data,),) = list(conn.execute("SELECT data FROM sessions"))
    assert set(json.loads(data)) == {"user_id", "conversation_id"}
    async with open_store(url) as store:
        (summary,) = (await store.conversations.list_recent(json.loads(data)["user_id"])).items
    assert summary.id == conversation_id and summary.message_count == 2
