"""The original README's app, as a new user writes it: ``append_middlewares(app, {"develop_mode": True})`` and
``append_apis``, the mock engine echoing the user, a browser role promoted by a pass phrase.

Run: ``python tests/reliability/seed_app.py --port N [--ssl-certfile cert.pem --ssl-keyfile key.pem]``.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI

from chatstream import ChatStream

PASS_PHRASE = "let me in, developer"

USER_APIS = ["chat_stream", "clear_context", "set_feedback", "health"]
client_roles = {
    "user": {"apis": {"allow": USER_APIS, "auth_method": "nothing", "use_session": True}},
    "developer": {
        "apis": {"allow": "all", "auth_method": "ui_pass_phrase", "ui_pass_phrase": PASS_PHRASE, "use_session": True}
    },
}


def build_app() -> FastAPI:
    """The app exactly as the original README builds it (its startup hook included)."""
    chat_stream = ChatStream(
        num_of_concurrent_executions=2,
        max_queue_size=5,
        use_mock_response=True,
        mock_params={"type": "echo", "time_per_token_sec": 0.001},
        client_roles=client_roles,
    )
    app = FastAPI()
    chat_stream.append_middlewares(app, {"develop_mode": True})
    chat_stream.append_apis(app, {"all": True})

    @app.on_event("startup")
    async def startup() -> None:
        await chat_stream.start_queue_worker()

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    args = parser.parse_args()
    uvicorn.run(
        build_app(),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


if __name__ == "__main__":
    main()
