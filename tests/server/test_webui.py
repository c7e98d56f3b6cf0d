"""The built-in chat page: GET / with the web UI params injected safely, GET /chatstream.js."""

from __future__ import annotations

import json

import httpx
from fastapi import FastAPI
from tests.server.support import mock_chat_stream

from chatstream.server.apis import append_apis
from chatstream.server.webui import render_index


def test_render_index_escapes_params_and_title() -> None:
    page = "<title>__CHATSTREAM_TITLE__</title><script>const p = __CHATSTREAM_WEB_UI_PARAMS__;</script>"
    params = {"title": "<b>Mine & yours</b>", "note": "</script><script>alert(1)</script>", "ja": "日本語"}
    out = render_index(page, params)
    assert "<title>&lt;b&gt;Mine &amp; yours&lt;/b&gt;</title>" in out
    assert "</script><script>alert" not in out
    injected = out.split("const p = ", 1)[1].rsplit(";</script>", 1)[0]
    assert json.loads(injected) == params
    assert render_index(page, {}).startswith("<title>ChatStream</title>")


async def test_webui_index_and_js_are_served_without_cache() -> None:
    cs = mock_chat_stream(client_roles=None)
    app = FastAPI()
    append_apis(cs.server_context, app, {"all": True, "web_ui_params": {"title": "Support <desk>"}})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        page = await c.get("/")
        script = await c.get("/chatstream.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "no-cache" in page.headers["cache-control"]
    assert "Support &lt;desk&gt;" in page.text and "__CHATSTREAM_" not in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "no-cache" in script.headers["cache-control"]
