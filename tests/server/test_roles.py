"""Client roles end to end: defaults, promotion by pass phrase in the chat, by header, denial, never a 500."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatstream import ChatStream
from chatstream.server.apis import API_PATHS, append_apis
from chatstream.server.middlewares import append_middlewares

EOS = "<::EOS::>"
SKIP = {"X-FastSession-Skip": "skip"}
DENIED = {"success": False, "message": "Forbidden", "detail": "Denied on role layer."}
DEV_TOOL = "X-ChatStream-API-DevTool-Enabled"

ROLES: dict[str, Any] = {
    "user": {
        "apis": {"allow": ["chat_stream", "webui_index", "webui_js"], "auth_method": "nothing", "use_session": True}
    },
    "agent": {"apis": {"allow": ["get_load"], "auth_method": "nothing", "use_session": False}},
    "developer": {
        "apis": {
            "allow": "all",
            "auth_method": "ui_pass_phrase",
            "ui_pass_phrase": "open sesame",
            "use_session": True,
            "enable_dev_tool": True,
        }
    },
    "reviewer": {
        "apis": {
            "allow": ["chat_stream", "get_prompt"],
            "auth_method": "ui_pass_phrase_sha256",
            "ui_pass_phrase_sha256": hashlib.sha256(b"let me review").hexdigest(),
            "use_session": True,
        }
    },
    "server": {
        "apis": {
            "allow": ["get_load", "get_resource_usage"],
            "auth_method": "header_phrase",
            "header_phrase": "agent-secret",
            "use_session": False,
        }
    },
}


def build_app(chat_stream: ChatStream, *, middlewares: bool = True) -> FastAPI:
    app = FastAPI()
    if middlewares:
        append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "test-secret", "secure": False}})
    append_apis(chat_stream.server_context, app, {"all": True})
    return app


async def make_client(chat_stream: ChatStream, *, middlewares: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(chat_stream, middlewares=middlewares))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30)


@pytest.fixture
async def chat_stream() -> AsyncIterator[ChatStream]:
    cs = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0}, client_roles=ROLES)
    await cs.startup()
    yield cs
    await cs.shutdown(1.0)


@pytest.fixture
async def client(chat_stream: ChatStream) -> AsyncIterator[httpx.AsyncClient]:
    async with await make_client(chat_stream) as c:
        yield c


# ----- the defaults -----


async def test_default_roles_serve_the_web_ui_and_chat_to_browsers() -> None:
    cs = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0})
    await cs.startup()
    async with await make_client(cs) as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/chatstream.js")).status_code == 200
        answer = await c.post("/chat_stream", json={"user_input": "hi there"})
        assert answer.status_code == 200 and answer.text.endswith("hi there" + EOS)
        assert (await c.post("/clear_context")).json()["success"] is True
        for path in ("/get_prompt", "/get_load", "/get_resource_usage", "/get_generation_params"):
            denied = await c.get(path)
            assert (denied.status_code, denied.json()) == (403, DENIED), path
        assert (await c.get("/get_load", headers=SKIP)).status_code == 200
        agent_chat = await c.post("/chat_stream", headers=SKIP, json={"user_input": "x"})
        assert (agent_chat.status_code, agent_chat.json()) == (403, DENIED)
        for path in ("/health", "/metrics"):
            assert (await c.get(path)).status_code == 200
            assert (await c.get(path, headers=SKIP)).status_code == 200
    await cs.shutdown(1.0)


# ----- promotion by pass phrase in the chat -----


async def test_pass_phrase_in_the_chat_grants_the_role_for_the_session(client: httpx.AsyncClient) -> None:
    assert (await client.get("/get_prompt")).status_code == 403
    await client.post("/chat_stream", json={"user_input": "a normal question"})
    granted = await client.post("/chat_stream", json={"user_input": "open sesame"})
    assert granted.status_code == 200
    assert granted.text.endswith("New role: 'developer' has been granted" + EOS)
    assert granted.headers[DEV_TOOL] == "enabled"

    prompt = await client.get("/get_prompt")
    assert prompt.status_code == 200
    assert "a%20normal%20question" in prompt.json()["prompt"]
    assert "sesame" not in prompt.json()["prompt"]  # the phrase never enters the history
    assert (await client.get("/get_resource_usage")).status_code == 200
    assert (await client.get("/get_load")).headers[DEV_TOOL] == "enabled"  # kept for the UI after a reload


async def test_sha256_pass_phrase_in_the_chat(client: httpx.AsyncClient) -> None:
    granted = await client.post("/chat_stream", json={"user_input": "let me review"})
    assert granted.text.endswith("New role: 'reviewer' has been granted" + EOS)
    assert DEV_TOOL not in granted.headers
    assert (await client.get("/get_prompt")).status_code == 200
    assert (await client.get("/get_load")).status_code == 403


async def test_a_wrong_phrase_is_an_ordinary_message(client: httpx.AsyncClient) -> None:
    answer = await client.post("/chat_stream", json={"user_input": "open sesame!"})
    assert answer.text.endswith("open sesame!" + EOS)
    assert (await client.get("/get_prompt")).status_code == 403


async def test_promotion_is_per_session(chat_stream: ChatStream) -> None:
    async with await make_client(chat_stream) as alice, await make_client(chat_stream) as bob:
        await alice.post("/chat_stream", json={"user_input": "open sesame"})
        assert (await alice.get("/get_prompt")).status_code == 200
        await bob.post("/chat_stream", json={"user_input": "hello"})
        assert (await bob.get("/get_prompt")).status_code == 403


# ----- promotion by header -----


async def test_header_phrase_promotes_an_agent_per_request(client: httpx.AsyncClient) -> None:
    promoted = {**SKIP, "X-ChatStream-Auth-Header": "agent-secret"}
    assert (await client.get("/get_resource_usage", headers=promoted)).status_code == 200
    assert (await client.get("/get_resource_usage", headers=SKIP)).status_code == 403
    wrong = {**SKIP, "X-ChatStream-Auth-Header": "agent-secret2"}
    assert (await client.get("/get_resource_usage", headers=wrong)).json() == DENIED
    assert (await client.get("/get_load", headers=SKIP)).status_code == 200


# ----- never a 500 without session or role -----


OPEN_ROLES = {
    "user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}},
    "agent": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": False}},
}
BODIES: list[Any] = [None, b"", b"{}", b"not json", b"[]", b'{"user_input": 5}', b'{"messages": "x"}']


@pytest.mark.parametrize("roles", [None, ROLES, OPEN_ROLES], ids=["default", "custom", "open"])
@pytest.mark.parametrize("middlewares", [True, False], ids=["middlewares", "bare"])
async def test_no_session_and_no_role_never_yields_500(roles: Any, middlewares: bool) -> None:
    cs = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0}, client_roles=roles)
    await cs.startup()
    paths = [(method, path) for method, path in API_PATHS.values()]
    paths += [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")]
    statuses: dict[str, int] = {}
    async with await make_client(cs, middlewares=middlewares) as c:
        for method, path in paths:
            for body in BODIES if method == "POST" else [None]:
                response = await c.request(method, path, headers=SKIP, content=body)
                statuses[f"{method} {path} {body!r}"] = response.status_code
    await cs.shutdown(1.0)
    errors = {k: v for k, v in statuses.items() if v >= 500 and not k.startswith("POST /chat_stream")}
    assert errors == {}
    assert len(statuses) > 40


async def test_chat_stream_for_an_allowed_agent_without_session_is_not_500() -> None:
    cs = ChatStream(
        use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0}, client_roles=OPEN_ROLES
    )
    await cs.startup()
    async with await make_client(cs) as c:
        response = await c.post("/chat_stream", headers=SKIP, json={"user_input": "hi"})
    await cs.shutdown(1.0)
    assert 400 <= response.status_code < 500
