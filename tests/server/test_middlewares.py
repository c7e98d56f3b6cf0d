"""append_middlewares: sessions, the role middleware, CORS only on request, and their options."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastsession import MemoryStore as FastSessionMemoryStore

from chatstream import ChatStream
from chatstream.server.apis import append_apis
from chatstream.server.middlewares import append_middlewares

ORIGIN = "http://localhost:5173"


def build_app(opts: dict[str, Any] | None, chat_stream: ChatStream | None = None) -> FastAPI:
    cs = chat_stream or ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0})
    app = FastAPI()
    append_middlewares(cs.server_context, app, opts)
    append_apis(cs.server_context, app, {"all": True})
    return app


async def get(app: FastAPI, path: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        return await c.get(path, **kw)


async def test_cors_is_off_unless_asked() -> None:
    response = await get(build_app({"session": {"secret_key": "k"}}), "/chatstream.js", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_cors_with_origins_exposes_the_chatstream_headers() -> None:
    app = build_app({"session": {"secret_key": "k"}, "cors": {"allow_origins": [ORIGIN]}})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        preflight = await c.options(
            "/chat_stream",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        actual = await c.get("/chatstream.js", headers={"Origin": ORIGIN})
        other = await c.get("/chatstream.js", headers={"Origin": "http://evil.example"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    exposed = actual.headers["access-control-expose-headers"]
    assert "X-ChatStream-Last-Generated-Message-Id" in exposed and "X-ChatStream-API-DevTool-Enabled" in exposed
    assert "access-control-allow-origin" not in other.headers


async def test_develop_mode_allows_every_origin_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatstream.server.middlewares"):
        app = build_app({"session": {"secret_key": "k"}, "develop_mode": True})
    assert any("every origin" in r.getMessage() for r in caplog.records)
    response = await get(app, "/chatstream.js", headers={"Origin": "http://anything.example"})
    assert response.headers["access-control-allow-origin"] in ("*", "http://anything.example")


async def test_a_missing_secret_gets_a_random_one_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatstream.server.middlewares"):
        app = build_app(None)
    assert any("random per-process secret" in r.getMessage() for r in caplog.records)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver") as c:
        first = await c.post("/chat_stream", json={"user_input": "one"})
        cookie = first.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie
        second = await c.post("/chat_stream", json={"user_input": "two"})
    assert "set-cookie" not in second.headers  # the same session continues


async def test_cookie_flags_are_settable() -> None:
    app = build_app({"session": {"secret_key": "k", "secure": False, "http_only": False, "same_site": "strict"}})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        cookie = (await c.post("/chat_stream", json={"user_input": "x"})).headers["set-cookie"].lower()
    assert "secure" not in cookie and "httponly" not in cookie and "samesite=strict" in cookie


async def test_the_original_fast_session_option_with_its_store_still_works() -> None:
    fast_store = FastSessionMemoryStore()
    app = build_app({"fast_session": {"secret_key": "k", "store": fast_store, "secure": False}})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        await c.post("/chat_stream", json={"user_input": "kept"})
        (entry,) = fast_store.raw_memory_store.values()  # the session lives in the fastsession store given
        assert entry["store"]["conversation_id"].startswith("conv_")
        assert (await c.post("/clear_context")).json()["success"] is True


async def test_session_false_leaves_sessions_to_the_application() -> None:
    app = build_app({"session": False})
    response = await get(app, "/get_load")  # no session: the agent default role, which may read the load
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ({"session": {"secret_key": "k", "secret": "typo"}}, "secret"),
        ({"session": "yes"}, "'session'"),
        ({"develop_mode": "on"}, "develop_mode"),
        ({"session": {"secret_key": "k"}, "cors": {"allow_origins": "http://a"}}, "allow_origins"),
    ],
)
def test_bad_options_raise(opts: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_app(opts)


async def test_role_middleware_records_the_role_and_the_dev_tool_header() -> None:
    roles = {
        "user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True, "enable_dev_tool": True}},
        "agent": {"apis": {"allow": ["get_load"], "auth_method": "nothing", "use_session": False}},
    }
    cs = ChatStream(use_mock_response=True, client_roles=roles)
    app = build_app({"session": {"secret_key": "k", "secure": False}}, cs)
    seen: list[str] = []

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        seen.append(request.state.chatstream_client_role)
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        browser = await c.get("/whoami")
        agent = await c.get("/whoami", headers={"X-FastSession-Skip": "skip"})
    assert seen == ["user", "agent"]
    assert browser.headers["X-ChatStream-API-DevTool-Enabled"] == "enabled"
    assert "X-ChatStream-API-DevTool-Enabled" not in agent.headers
    assert "set-cookie" not in browser.headers  # resolving a role alone creates no session


async def test_operator_messages_follow_the_locale(caplog: pytest.LogCaptureFixture) -> None:
    cs = ChatStream(use_mock_response=True, locale="ja-JP")
    with caplog.at_level(logging.WARNING, logger="chatstream.server.middlewares"):
        build_app({"develop_mode": True}, cs)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "secret_key が指定されていない" in text and "すべてのオリジン" in text
