"""The built-in web chat page: plain HTML/CSS/JS in ``static/`` (no build step, no CDN, works offline).

``static/index.html`` carries the CSS inline and loads ``chatstream.js`` by a relative URL, so the page also works
under a path prefix. The server (``server/apis.py``) fills two placeholders per request: ``PARAMS_PLACEHOLDER`` with
the ``web_ui_params`` of ``append_apis`` as JSON made safe for a ``<script type="application/json">`` element, and
``TITLE_PLACEHOLDER`` with the HTML-escaped page title. docs/web_ui.md describes the options.
"""

from __future__ import annotations

from typing import Final

PARAMS_PLACEHOLDER: Final = "__CHATSTREAM_WEB_UI_PARAMS__"
TITLE_PLACEHOLDER: Final = "__CHATSTREAM_TITLE__"
STATIC_FILES: Final = ("index.html", "chatstream.js")
"""The files served: ``index.html`` at GET / and ``chatstream.js`` at GET /chatstream.js."""
