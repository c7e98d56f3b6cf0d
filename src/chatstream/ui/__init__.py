"""The built-in web chat page: plain HTML/CSS/JS files shipped inside the package (no build step, no CDN).

``index.html`` holds two placeholders that the server fills per request: ``__CHATSTREAM_WEB_UI_PARAMS__`` (the
``web_ui_params`` of ``append_apis`` as JSON, inside a ``<script type="application/json">`` element) and
``__CHATSTREAM_TITLE__`` (the page title, HTML-escaped). ``render_index`` does both; ``read_static`` returns a file.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

PARAMS_PLACEHOLDER = "__CHATSTREAM_WEB_UI_PARAMS__"
TITLE_PLACEHOLDER = "__CHATSTREAM_TITLE__"
DEFAULT_TITLE = "ChatStream"
STATIC_FILES = ("index.html", "chatstream.js")

# Characters that could end the <script> element or confuse an HTML parser, written as JSON escapes instead.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def read_static(name: str) -> str:
    """The text of one of the page's files (``index.html`` or ``chatstream.js``)."""
    if name not in STATIC_FILES:
        raise ValueError(f"unknown web UI file {name!r}; expected one of {STATIC_FILES}")
    return (resources.files(__name__) / "static" / name).read_text(encoding="utf-8")


def json_for_script(value: Mapping[str, Any] | None) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element (no ``</script>`` can appear in it)."""
    text = json.dumps(dict(value or {}), ensure_ascii=False)
    return "".join(_SCRIPT_ESCAPES.get(ch, ch) for ch in text)


def render_index(web_ui_params: Mapping[str, Any] | None = None, title: str | None = None) -> str:
    """``index.html`` with the web UI options and the title filled in."""
    page = read_static("index.html")
    page = page.replace(PARAMS_PLACEHOLDER, json_for_script(web_ui_params))
    return page.replace(TITLE_PLACEHOLDER, html.escape(title or DEFAULT_TITLE))
