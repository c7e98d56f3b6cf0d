"""Conversations longer than the context, on the tiny model: native drops the oldest turns, OpenAI answers 400."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from tests.server.support import Recorder, asgi_client, started

from chatstream import ChatStream
from chatstream.prompts.presets import ChatPromptPlainUserAssistant
from chatstream.server.apis import append_apis
from chatstream.server.middlewares import append_middlewares

CONTEXT_LEN = 96
MAX_NEW = 8


class WithSystem(ChatPromptPlainUserAssistant):
    def __init__(self) -> None:
        super().__init__()
        self.set_system("SYSTEM RULES\n")


def tiny_chat_stream(tiny_model: Any, tiny_tokenizer: Any, **kw: Any) -> ChatStream:
    return ChatStream(
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        context_len=CONTEXT_LEN,
        max_new_tokens=MAX_NEW,
        temperature=0.0,
        **kw,
    )


def app_for(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()
    append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "k"}})
    append_apis(chat_stream.server_context, app, {"include": ["chat_stream", "openai"]})
    return app


async def test_native_drops_oldest_turns_and_keeps_the_system_prompt(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = tiny_chat_stream(tiny_model, tiny_tokenizer, chat_prompt_clazz=WithSystem)
    recorder = Recorder(cs)
    async with started(cs), asgi_client(app_for(cs)) as client:
        for turn in range(6):
            response = await client.post("/chat_stream", json={"user_input": f"turn{turn} hello there friend"})
            assert response.status_code == 200, response.text
    prompts = [request.prompt for request in recorder.requests]
    assert all(prompt.startswith("SYSTEM RULES\n") for prompt in prompts)
    assert "turn0" in prompts[0] and "turn0" not in prompts[-1] and "turn5" in prompts[-1]
    assert all(len(tiny_tokenizer.encode(p)) <= CONTEXT_LEN - MAX_NEW for p in prompts)
    kept = prompts[-1].split("User: ")[1:]
    assert all(part.startswith("turn") for part in kept)  # whole turns only: no turn begins mid-message


async def test_openai_refuses_a_prompt_longer_than_the_context(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = tiny_chat_stream(tiny_model, tiny_tokenizer)
    long_text = "hello there " * 80
    async with started(cs), asgi_client(app_for(cs)) as client:
        response = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert f"maximum context length is {CONTEXT_LEN} tokens" in error["message"]
        assert "input tokens" in error["message"]
        asked = {"messages": [{"role": "user", "content": "hello there " * 20}], "max_tokens": CONTEXT_LEN}
        response = await client.post("/v1/chat/completions", json=asked)
        assert response.status_code == 400 and f"{CONTEXT_LEN} in the completion" in response.json()["error"]["message"]
        fits = {"messages": [{"role": "user", "content": "hello there"}]}
        response = await client.post("/v1/chat/completions", json=fits)
        assert response.status_code == 200
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT_LEN


def test_a_given_engine_keeps_its_own_context(tiny_model: Any, tiny_tokenizer: Any) -> None:
    from chatstream.config import EngineConfig, MockConfig
    from chatstream.engine.async_engine import TransformersEngine
    from chatstream.engine.mock_engine import MockEngine

    remote_like = ChatStream(engine=MockEngine(MockConfig()), tokenizer=tiny_tokenizer)
    assert remote_like.service.requests.context_window is None  # an engine that tells no context keeps its own limits
    ours = TransformersEngine(tiny_model, tiny_tokenizer, EngineConfig(context_len=4096))  # built, not started
    configured = ChatStream(engine=ours, tokenizer=tiny_tokenizer)
    window = configured.service.requests.context_window
    assert window is not None and window.context_len == 4096
