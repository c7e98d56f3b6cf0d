"""The built-in chat page: GET / (``index``) and GET /chatstream.js (``js``), from ``chatstream/ui/static``."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from chatstream.i18n import message
from chatstream.server.access import role_checked
from chatstream.server.context import ServerContext
from chatstream.ui import PARAMS_PLACEHOLDER, TITLE_PLACEHOLDER

_NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache", "Expires": "0"}


@role_checked("webui_index")
async def index(
    ctx: ServerContext, request: Request, response: Any = None, opts: Mapping[str, Any] | None = None
) -> Response:
    """GET /: the built-in chat page, with ``web_ui_params`` (``opts["ui_init_params"]``) injected."""
    params = dict((opts or {}).get("ui_init_params") or (opts or {}).get("web_ui_params") or {})
    page = _static_text("index.html")
    if page is None:
        page = _placeholder_page(ctx.service.locale)
    return Response(render_index(page, params), media_type="text/html; charset=utf-8", headers=_NO_CACHE)


@role_checked("webui_js")
async def js(ctx: ServerContext, request: Request, response: Any = None) -> Response:
    """GET /chatstream.js: the chat page's script."""
    script = _static_text("chatstream.js")
    if script is None:
        script = "/* " + message("web_ui_missing", ctx.service.locale) + " */\n"
    return Response(script, media_type="application/javascript; charset=utf-8", headers=_NO_CACHE)


def render_index(page: str, web_ui_params: Mapping[str, Any]) -> str:
    """Fill the page's two placeholders: the params as JSON safe inside <script>, and the HTML-escaped title."""
    params_json = json.dumps(dict(web_ui_params), ensure_ascii=False)
    params_json = params_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    params_json = params_json.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    title = html.escape(str(web_ui_params.get("title", "ChatStream")))
    return page.replace(PARAMS_PLACEHOLDER, params_json).replace(TITLE_PLACEHOLDER, title)


def _static_text(file_name: str) -> str | None:
    try:
        return (resources.files("chatstream") / "ui" / "static" / file_name).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None


def _placeholder_page(locale: str) -> str:
    note = html.escape(message("web_ui_missing", locale))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE_PLACEHOLDER}</title></head>"
        f"<body><h1>{TITLE_PLACEHOLDER}</h1><p>{note}</p>"
        f"<script>window.CHATSTREAM_WEB_UI_PARAMS = {PARAMS_PLACEHOLDER};</script></body></html>"
    )
