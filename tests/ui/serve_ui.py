"""A mock ChatStream server for the browser tests that need what ``chatstream serve`` cannot configure.

It builds ``ChatStream(use_mock_response=True, client_roles=...)`` with a browser default role and a ``developer`` role
promoted by a UI pass phrase (with the developer tool enabled), wraps it with ``create_app`` (the app ``chatstream
serve`` runs) and runs uvicorn on 127.0.0.1. Run: ``python tests/ui/serve_ui.py --port N [--mock-type echo]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn
from fastapi import FastAPI

from chatstream import ChatStream
from chatstream.server.app import create_app

DEV_PASS_PHRASE = "open sesame developer"


def client_roles() -> dict[str, Any]:
    """A default browser user plus a developer reached by typing ``DEV_PASS_PHRASE`` in the chat."""
    return {
        "user": {
            "apis": {
                "allow": ["chat_stream", "clear_context", "set_feedback", "webui_index", "webui_js"],
                "auth_method": "nothing",
                "use_session": True,
            }
        },
        "developer": {
            "apis": {
                "allow": "all",
                "auth_method": "ui_pass_phrase",
                "ui_pass_phrase": DEV_PASS_PHRASE,
                "use_session": True,
                "enable_dev_tool": True,
            }
        },
    }


def build_app(args: argparse.Namespace) -> FastAPI:
    chat_stream = ChatStream(
        num_of_concurrent_executions=args.max_concurrency,
        max_queue_size=args.max_queue,
        use_mock_response=True,
        mock_params={"type": args.mock_type, "time_per_token_sec": args.mock_time_per_token},
        client_roles=client_roles(),
    )
    return create_app(chat_stream, web_ui_params=json.loads(args.web_ui_params), drain_timeout=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mock-type", default="echo", choices=["round", "long", "echo"])
    parser.add_argument("--mock-time-per-token", type=float, default=0.02)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=5)
    parser.add_argument("--web-ui-params", default="{}", help="JSON object handed to append_apis as web_ui_params")
    args = parser.parse_args()
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
