"""The conversations API and /chat_stream on records, in process, on each store (memory, SQLite, Redis)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.server.support import asgi_client, mock_chat_stream

from chatstream import ChatStream
from chatstream.server.apis import append_apis
from chatstream.server.middlewares import append_middlewares
from chatstream.sessions import Store
from chatstream.sessions.records import conversation_from_json
from chatstream.sessions.store import MemoryStore

EOS = "<::EOS::>"
MESSAGE_ID = "X-ChatStream-Last-Generated-Message-Id"
CONVERSATION_ID = "X-ChatStream-Conversation-Id"
OPEN_ROLES = {
    "user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}},
    "agent": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": False}},
}


def build_app(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()
    append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "k", "secure": False}})
    append_apis(chat_stream.server_context, app, {"all": True})
    return app


@pytest.fixture
async def chat_stream(store: Store) -> AsyncIterator[ChatStream]:
    cs = mock_chat_stream(store=store)
    await cs.startup()
    yield cs
    await cs.shutdown(1.0)


@pytest.fixture
async def client(chat_stream: ChatStream) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(chat_stream)) as c:
        yield c


async def chat(client: httpx.AsyncClient, text: str, **body: Any) -> httpx.Response:
    response = await client.post("/chat_stream", json={"user_input": text, **body})
    assert response.status_code == 200, response.text
    assert response.text.endswith(EOS)
    return response


async def listing(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/conversations", params=params)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def items(client: httpx.AsyncClient, conversation_id: str) -> list[tuple[str, str]]:
    response = await client.get(f"/conversations/{conversation_id}/items")
    assert response.status_code == 200, response.text
    return [(item["role"], item["content"][0]["text"]) for item in response.json()["data"]]


async def test_a_visitor_has_no_conversations_and_gets_no_session(client: httpx.AsyncClient) -> None:
    response = await client.get("/conversations")
    assert response.json() == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
        "current_id": None,
    }
    assert "set-cookie" not in response.headers


async def test_turns_are_records_of_the_current_conversation(client: httpx.AsyncClient) -> None:
    first = await chat(client, "hello there")
    second = await chat(client, "and again")
    conversation_id = first.headers[CONVERSATION_ID]
    assert second.headers[CONVERSATION_ID] == conversation_id
    page = await listing(client)
    assert page["current_id"] == conversation_id
    (summary,) = page["data"]
    assert summary["id"] == conversation_id and summary["object"] == "conversation"
    assert (summary["title"], summary["message_count"], summary["current"]) == ("hello there", 4, True)
    assert await items(client, conversation_id) == [
        ("user", "hello there"),
        ("assistant", "hello there"),
        ("user", "and again"),
        ("assistant", "and again"),
    ]
    answer_ids = [i["id"] for i in (await client.get(f"/conversations/{conversation_id}/items")).json()["data"]][1::2]
    assert answer_ids == [first.headers[MESSAGE_ID], second.headers[MESSAGE_ID]]


async def test_regenerate_replaces_the_last_answer_in_the_record(client: httpx.AsyncClient) -> None:
    first = await chat(client, "question")
    regenerated = await client.post("/chat_stream", json={"user_input": None, "regenerate": True})
    conversation_id = first.headers[CONVERSATION_ID]
    data = (await client.get(f"/conversations/{conversation_id}/items")).json()["data"]
    assert [item["role"] for item in data] == ["user", "assistant"]
    assert data[1]["id"] == regenerated.headers[MESSAGE_ID] != first.headers[MESSAGE_ID]


async def test_create_open_rename_delete(client: httpx.AsyncClient) -> None:
    first_id = (await chat(client, "first chat")).headers[CONVERSATION_ID]
    created = (await client.post("/conversations", json={"title": "  Second\n chat "})).json()
    assert (created["title"], created["message_count"], created["current"]) == ("Second chat", 0, True)
    assert (await chat(client, "into the second")).headers[CONVERSATION_ID] == created["id"]
    page = await listing(client)
    assert [c["id"] for c in page["data"]] == [created["id"], first_id]  # newest first
    opened = (await client.post(f"/conversations/{first_id}/open")).json()
    assert opened["current"] is True and (await listing(client))["current_id"] == first_id
    await chat(client, "back in the first")
    assert [text for _, text in await items(client, first_id)][-1] == "back in the first"
    renamed = await client.post(f"/conversations/{first_id}", json={"metadata": {"title": "Renamed"}})
    assert renamed.json()["title"] == "Renamed"
    assert (await client.post(f"/conversations/{first_id}", json={"title": ""})).json()["title"] == "first chat"
    deleted = await client.delete(f"/conversations/{first_id}")
    assert deleted.json() == {"id": first_id, "object": "conversation.deleted", "deleted": True}
    assert (await client.get(f"/conversations/{first_id}")).status_code == 404
    assert (await listing(client))["current_id"] is None  # it was current: the next turn starts a new one
    assert (await chat(client, "new")).headers[CONVERSATION_ID] not in (first_id, created["id"])


async def test_a_turn_can_name_its_conversation(client: httpx.AsyncClient) -> None:
    first_id = (await chat(client, "one")).headers[CONVERSATION_ID]
    second_id = (await client.post("/conversations", json={})).json()["id"]
    response = await chat(client, "to the first", conversation_id=first_id)
    assert response.headers[CONVERSATION_ID] == first_id
    assert (await listing(client))["current_id"] == first_id  # and it became current
    assert len(await items(client, first_id)) == 4 and await items(client, second_id) == []


async def test_pages(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/conversations", json={"title": f"c{i}"})).json()["id"] for i in range(5)]
    first = await listing(client, limit=2)
    assert [c["id"] for c in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = await listing(client, limit=2, after=first["last_id"])
    assert [c["id"] for c in second["data"]] == ids[::-1][2:4]


async def test_exports(client: httpx.AsyncClient) -> None:
    conversation_id = (await chat(client, "export me")).headers[CONVERSATION_ID]
    as_json = await client.get(f"/conversations/{conversation_id}/export", params={"format": "json"})
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.headers["content-disposition"].startswith('attachment; filename="export-me.json"')
    record = conversation_from_json(json.loads(as_json.text))
    assert [m.text for m in record.messages] == ["export me", "export me"]
    as_markdown = await client.get(f"/conversations/{conversation_id}/export", params={"format": "markdown"})
    assert as_markdown.headers["content-type"].startswith("text/markdown")
    assert as_markdown.text.startswith("# export me\n") and "## User" in as_markdown.text


async def test_feedback_and_prompt_come_from_the_record(store: Store) -> None:
    async with asgi_client(build_app(mock_chat_stream(store=store, client_roles=OPEN_ROLES))) as client:
        await _feedback_and_prompt(client)


async def _feedback_and_prompt(client: httpx.AsyncClient) -> None:
    response = await chat(client, "rate me")
    conversation_id, message_id = response.headers[CONVERSATION_ID], response.headers[MESSAGE_ID]
    feedback = await client.post("/set_feedback", json={"message_id": message_id, "is_like": True, "form_data": {}})
    assert feedback.json()["success"] is True, feedback.text
    data = (await client.get(f"/conversations/{conversation_id}/items")).json()["data"]
    assert data[1]["feedback"]["is_like"] is True and data[0]["feedback"] is None
    prompt = (await client.get("/get_prompt")).json()
    assert "rate%20me" in prompt["prompt"]


async def test_clear_context_detaches_the_conversation(client: httpx.AsyncClient) -> None:
    first_id = (await chat(client, "remember")).headers[CONVERSATION_ID]
    assert (await client.post("/clear_context")).json() == {"success": True, "message": "Context successfully cleared"}
    assert (await client.post("/clear_context")).json() == {"success": False, "message": "no context."}
    assert (await chat(client, "fresh")).headers[CONVERSATION_ID] != first_id
    assert len((await listing(client))["data"]) == 2  # the old one stays in the list


async def test_another_users_conversation_is_not_found(chat_stream: ChatStream) -> None:
    app = build_app(chat_stream)
    async with asgi_client(app) as alice, asgi_client(app) as bob:
        theirs = (await chat(alice, "alice's secret")).headers[CONVERSATION_ID]
        await chat(bob, "bob's own")
        for method, path in [
            ("GET", f"/conversations/{theirs}"),
            ("GET", f"/conversations/{theirs}/items"),
            ("GET", f"/conversations/{theirs}/export"),
            ("POST", f"/conversations/{theirs}/open"),
            ("DELETE", f"/conversations/{theirs}"),
        ]:
            response = await bob.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["code"] == "conversation_not_found"
        rename = await bob.post(f"/conversations/{theirs}", json={"title": "mine now"})
        assert rename.status_code == 404
        stolen = await bob.post("/chat_stream", json={"user_input": "hi", "conversation_id": theirs})
        assert stolen.status_code == 404 and stolen.json()["error"] == "not_found"
        feedback = await bob.post("/set_feedback", json={"message_id": "x", "conversation_id": theirs})
        assert feedback.status_code == 404
        assert [c["title"] for c in (await listing(bob))["data"]] == ["bob's own"]
        assert [c["title"] for c in (await listing(alice))["data"]] == ["alice's secret"]


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("GET", "/conversations?limit=0", None, "limit"),
        ("GET", "/conversations?limit=x", None, "limit"),
        ("GET", "/conversations?after=conv_nope", None, "after"),
        ("POST", "/conversations", {"title": 5}, "title"),
        ("POST", "/conversations", {"title": "x" * 201}, "title"),
        ("POST", "/conversations", {"make_current": "yes"}, "make_current"),
        ("POST", "/conversations/conv_x", {}, "title"),
        ("GET", "/conversations/bad%20id", None, "conversation_id"),
        ("GET", "/conversations/conv_x/export?format=pdf", None, "format"),
        ("POST", "/set_feedback", {"message_id": "m", "conversation_id": "no spaces"}, None),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: Any, param: str | None
) -> None:
    await chat(client, "make a user")
    response = await client.request(method, path, json=body)
    assert response.status_code == 400, response.text
    if param is not None:
        assert response.json()["error"]["param"] == param
        assert param in response.json()["error"]["message"]
    else:
        assert "conversation_id" in response.json()["message"]


async def test_a_bad_conversation_id_in_a_chat_body_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat_stream", json={"user_input": "x", "conversation_id": 12})
    assert response.status_code == 400 and "'conversation_id'" in response.json()["detail"]


async def test_agents_without_a_session_are_told_so(client: httpx.AsyncClient) -> None:
    denied = await client.get("/conversations", headers={"X-FastSession-Skip": "skip"})
    assert denied.status_code == 403  # the default agent role may not
    async with asgi_client(build_app(mock_chat_stream(client_roles=OPEN_ROLES))) as c:
        response = await c.get("/conversations", headers={"X-FastSession-Skip": "skip"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_session"


async def test_roles_that_do_not_allow_the_api_get_a_403() -> None:
    roles = {"user": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing", "use_session": True}}}
    async with asgi_client(build_app(mock_chat_stream(client_roles=roles))) as c:
        await chat(c, "allowed")
        response = await c.get("/conversations")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert "list_conversations" in response.json()["error"]["message"]


async def test_the_header_names_the_conversation_too(client: httpx.AsyncClient) -> None:
    first_id = (await chat(client, "one")).headers[CONVERSATION_ID]
    await client.post("/conversations", json={})  # now another one is current
    by_header = await client.post("/chat_stream", json={"user_input": "two"}, headers={CONVERSATION_ID: first_id})
    assert by_header.status_code == 200 and by_header.headers[CONVERSATION_ID] == first_id
    both = await client.post(
        "/chat_stream", json={"user_input": "x", "conversation_id": "conv_other"}, headers={CONVERSATION_ID: first_id}
    )
    assert both.status_code == 400 and "differ" in both.json()["detail"]


async def test_fastsession_sessions_own_records_too() -> None:
    """The original's setup (fastsession's middleware and store): the user id lives in fastsession's session, the
    conversations in ChatStream's store, and the prompt object is also left at session["chat_prompt"]."""
    from fastsession import FastSessionMiddleware
    from fastsession import MemoryStore as FastStore

    chat_stream = mock_chat_stream()
    fast_store = FastStore()
    app = FastAPI()
    app.add_middleware(FastSessionMiddleware, secret_key="k", store=fast_store, http_only=True, secure=False)
    append_apis(chat_stream.server_context, app, {"all": True})
    async with asgi_client(app) as client:
        conversation_id = (await chat(client, "kept in records")).headers[CONVERSATION_ID]
        (listed,) = (await listing(client))["data"]
    (entry,) = fast_store.raw_memory_store.values()
    session = entry["store"]
    assert listed["id"] == conversation_id == session["conversation_id"]
    assert session["chat_prompt"].get_responder_last_msg() == "kept in records"
    record = await chat_stream.conversations.store.conversations.get(session["user_id"], conversation_id)
    assert [m.text for m in record.messages] == ["kept in records", "kept in records"]


async def test_the_retention_task_applies_the_chat_streams_limits() -> None:
    chat_stream = mock_chat_stream(max_conversations_per_user=1, retention_interval=0.05)
    async with asgi_client(build_app(chat_stream)) as client:
        older = (await chat(client, "older")).headers[CONVERSATION_ID]
        await client.post("/clear_context")
        newer = (await chat(client, "newer")).headers[CONVERSATION_ID]
        for _ in range(100):
            if [c["id"] for c in (await listing(client))["data"]] == [newer]:
                break
            await asyncio.sleep(0.05)
        assert [c["id"] for c in (await listing(client))["data"]] == [newer]
        assert (await client.get(f"/conversations/{older}")).status_code == 404
    await chat_stream.shutdown(0)


async def test_the_session_store_option_takes_stores_and_refuses_anything_else() -> None:
    chat_stream = mock_chat_stream()
    for store in (chat_stream.conversations.store, MemoryStore()):
        append_middlewares(chat_stream.server_context, FastAPI(), {"session": {"secret_key": "k", "store": store}})
    with pytest.raises(ValueError, match="'store' must be a chatstream store"):
        append_middlewares(chat_stream.server_context, FastAPI(), {"session": {"secret_key": "k", "store": "redis://"}})
