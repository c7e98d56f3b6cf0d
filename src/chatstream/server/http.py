"""What every endpoint shares about HTTP itself: the header names of the protocol and the one JSON-body reader."""

from __future__ import annotations

import json
from typing import Any, Final

from chatstream.server.errors import BadRequest

MESSAGE_ID_HEADER: Final = "X-ChatStream-Last-Generated-Message-Id"
"""The id of the answer /chat_stream streams (the original's header)."""
DEV_TOOL_HEADER: Final = "X-ChatStream-API-DevTool-Enabled"
"""Sent as ``enabled`` to callers whose role may use the web UI's developer tools."""
AUTH_HEADER: Final = "X-ChatStream-Auth-Header"
"""An agent's pass phrase for a ``header_phrase`` role (docs/roles.md)."""
SKIP_SESSION_HEADER: Final = {"header_name": "X-FastSession-Skip", "header_value": "skip"}
"""Requests that carry it get no session (agents); fastsession's convention."""


def parse_json_object(raw: bytes | str, *, example: str | None = None) -> dict[str, Any]:
    """A request body as a JSON object; BadRequest otherwise (``example`` shows the expected shape)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise BadRequest(f"The request body must be a JSON object{f' like {example}' if example else ''}.")
    return data
