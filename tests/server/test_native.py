"""/chat_stream's own parts: the body parser, and a request handler that keeps histories outside the session."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response
from tests.server.support import Recorder, asgi_client, mock_chat_stream

from chatstream import AbstractRequestHandler, ChatPromptTogetherRedPajamaINCITEChat
from chatstream.prompts.base import AbstractChatPrompt
from chatstream.server.native_turn import ChatTurnInput, parse_chat_body
from chatstream.sessions.handler import ChatRequestError, StreamingFinishedCallback

EOS = "<::EOS::>"


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ('{"user_input": "hi"}', ChatTurnInput("hi", regenerate=False)),
        ('{"user_input": null, "regenerate": true}', ChatTurnInput(None, regenerate=True)),
        (b'{"user_input": "again", "regenerate": false}', ChatTurnInput("again", regenerate=False)),
    ],
)
def test_chat_bodies(raw: str | bytes, parsed: ChatTurnInput) -> None:
    assert parse_chat_body(raw) == parsed


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ("", "JSON object"),
        ('"text"', "JSON object"),
        ('{"regenerate": 1}', "'regenerate' must be a boolean"),
        ('{"user_input": 3, "regenerate": true}', "'user_input' must be a string or null"),
    ],
)
def test_bad_chat_bodies_name_the_problem(raw: str, detail: str) -> None:
    with pytest.raises(ChatRequestError, match=detail) as info:
        parse_chat_body(raw)
    assert info.value.status == 400 and info.value.reason.startswith("bad request: ")


class PerUserHistories(AbstractRequestHandler):
    """Histories in a dict keyed by a header naming a logged-in user (the documented way to subclass)."""

    def __init__(self) -> None:
        super().__init__()
        self.histories: dict[str, AbstractChatPrompt] = {}
        self.saves = 0

    def get_request_handler_type(self) -> str:
        return "per_user"

    async def process_request(
        self, request: Request, request_body: bytes | str | None, streaming_finished_callback: StreamingFinishedCallback
    ) -> Response:
        user = request.headers.get("x-user", "anonymous")
        if user not in self.histories:
            self.histories[user] = self.create_chat_prompt()
            self.histories[user].build_initial_prompt(self.histories[user])
        return await self.handle_turn(
            request,
            request_body,
            self.histories[user],
            self.count_save,
            streaming_finished_callback,
            generation_params={"temperature": 0.0},
            conversation_id=f"user-{user}",
        )

    def count_save(self) -> None:
        self.saves += 1


async def test_a_custom_request_handler_keeps_histories_its_own_way() -> None:
    handler = PerUserHistories()
    cs = mock_chat_stream(request_handler=handler, chat_prompt_clazz=ChatPromptTogetherRedPajamaINCITEChat)
    recorder = Recorder(cs)
    app = FastAPI()
    cs.append_apis(app, {"include": ["chat_stream", "clear_context"]})
    async with asgi_client(app) as client:
        for user, text in (("ann", "one"), ("bob", "two"), ("ann", "three")):
            response = await client.post("/chat_stream", json={"user_input": text}, headers={"x-user": user})
            assert response.text.endswith(text + EOS)
        cleared = await client.post("/clear_context")
    assert handler.histories["ann"].get_turn() == 2 and handler.histories["bob"].get_turn() == 1
    assert handler.histories["ann"].get_responder_last_msg() == "three" and handler.saves == 3
    assert [r.conversation_id for r in recorder.requests] == ["user-ann", "user-bob", "user-ann"]
    assert all(r.sampling.greedy for r in recorder.requests)
    assert cleared.json() == {"success": False, "message": "Not supported on current request_handler type."}


async def test_the_callback_hears_of_a_handler_that_rejects_the_request() -> None:
    class Refusing(PerUserHistories):
        async def process_request(self, request: Request, request_body: Any, callback: Any) -> Response:
            raise ChatRequestError("no such user", reason="unknown user")

    calls: list[str] = []
    cs = mock_chat_stream(request_handler=Refusing())
    app = FastAPI()

    @app.post("/chat")
    async def chat(request: Request) -> Response:
        return await cs.handle_chat_stream_request(request, callback=lambda _req, message: calls.append(message))

    async with asgi_client(app) as client:
        response = await client.post("/chat", json={"user_input": "hi"})
    assert (response.status_code, response.json()) == (400, {"error": "bad_request", "detail": "no such user"})
    assert calls == ["unknown_error_occurred,unknown user"] and cs.admission.num_running == 0


def test_an_unattached_handler_says_so() -> None:
    with pytest.raises(RuntimeError, match="not attached"):
        PerUserHistories().detect_special_command_for_role_promotion(None, "x", None)  # type: ignore[arg-type]


async def test_role_promotion_is_answered_in_the_native_format() -> None:
    roles = {
        "user": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing", "use_session": True}},
        "dev": {
            "apis": {"allow": "all", "auth_method": "ui_pass_phrase", "ui_pass_phrase": "sesame", "use_session": True}
        },
    }
    cs = mock_chat_stream(client_roles=roles)
    app = FastAPI()
    cs.append_middlewares(app, {"session": {"secret_key": "k", "secure": False}})
    cs.append_apis(app, {"include": ["chat_stream", "get_load"]})
    async with asgi_client(app) as client:
        assert (await client.get("/get_load")).status_code == 403
        granted = await client.post("/chat_stream", json={"user_input": "sesame"})
        assert granted.text.endswith("New role: 'dev' has been granted" + EOS)
        assert (await client.get("/get_load")).status_code == 200
