"""``python -m tests.server.scripted_upstream --port N --script '["answer", ...]'``: a ChatStream server on the
scripted mock, which ``chatstream serve`` has no option for (its answers are given in Python).

The upstream of the server tests that script their mock, under ``CHATSTREAM_TEST_ENGINE=upstream``
(tests/server/conftest.py); it is built like ``chatstream serve --mock`` and prints the same ready line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn

from chatstream import ChatStream
from chatstream.cli_engines import plain_preset
from chatstream.server.app import create_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripted_upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--drain-timeout", type=float, default=0.0)
    parser.add_argument("--script", type=json.loads, required=True, help="the answers, a JSON list of strings")
    parser.add_argument("--mock-time-per-token", type=float, default=0.0)
    parser.add_argument("--mock-initial-wait", type=float, default=0.0)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=5)
    args = parser.parse_args()
    mock_params = {
        "type": "script",
        "script": args.script,
        "time_per_token_sec": args.mock_time_per_token,
        "initial_wait_sec": args.mock_initial_wait,
    }
    cs = ChatStream(
        use_mock_response=True,
        mock_params=mock_params,
        chat_prompt_clazz=plain_preset(),
        model_name="chatstream-mock",
        num_of_concurrent_executions=args.max_concurrency,
        max_queue_size=args.max_queue,
    )
    app = create_app(cs, drain_timeout=args.drain_timeout)
    AnnouncingServer(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level=args.log_level)).run()


class AnnouncingServer(uvicorn.Server):
    """Prints ``chatstream serve``'s ready line once it listens."""

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"ChatStream is ready: http://127.0.0.1:{self.config.port}/", flush=True)


if __name__ == "__main__":
    main()
