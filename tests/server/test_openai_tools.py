"""Tool calling on /v1/chat/completions against a real server: the official SDK and LangChain read calls parsed from a
scripted model output (whole and streamed), a full round trip, Open WebUI's default chat on a model without tool
support, and calls forced by constrained decoding on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from tests.live_server import run_server
from tests.server.support import Recorder, mock_chat_stream
from tests.server.tool_support import (
    TIME_TOOL,
    WEATHER_TOOL,
    hermes_call,
    hermes_tokenizer,
    open_webui_tools,
)

from chatstream import ChatStream
from chatstream.server.app import create_app
from chatstream.server.tool_calls import TOOLS_IGNORED_HEADER

MOCK = "chatstream-mock"
ANSWER = "It is sunny in Paris."
USER = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture
def scripted() -> Iterator[tuple[ChatStream, openai.OpenAI, str]]:
    """A mock with a Hermes chat template whose answers are: a call, the final answer, a call, the answer ..."""
    script = [hermes_call("get_weather", city="Paris"), ANSWER]
    cs = mock_chat_stream(tokenizer=hermes_tokenizer(), mock_params={"type": "script", "script": script})
    with run_server(create_app(cs, drain_timeout=1.0)) as url:
        yield cs, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20), url


def test_the_sdk_reads_a_tool_call_and_completes_the_round_trip(
    scripted: tuple[ChatStream, openai.OpenAI, str],
) -> None:
    cs, sdk, _ = scripted
    recorder = Recorder(cs)
    first = sdk.chat.completions.create(model=MOCK, messages=[USER], tools=[WEATHER_TOOL, TIME_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert '"name": "get_weather"' in recorder.requests[-1].prompt  # the tools went through the chat template

    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}
    second = sdk.chat.completions.create(
        model=MOCK, messages=[USER, choice.message.model_dump(exclude_none=True), result], tools=[WEATHER_TOOL]
    )
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
    prompt = recorder.requests[-1].prompt
    assert "<|tool|>\nsunny, 24 C" in prompt and '"arguments": {"city": "Paris"}' in prompt


def test_streamed_tool_calls_arrive_as_delta_pieces(scripted: tuple[ChatStream, openai.OpenAI, str]) -> None:
    _, sdk, _ = scripted
    stream = sdk.chat.completions.create(
        model=MOCK, messages=[USER], tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [piece for c in chunks if c.choices for piece in c.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert json.loads(arguments) == {"city": "Paris"} and {p.index for p in pieces} == {0}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_langchain_bind_tools_and_the_round_trip(scripted: tuple[ChatStream, openai.OpenAI, str]) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny, 24 C"

    _, _, url = scripted
    llm = ChatOpenAI(model=MOCK, base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)
    with_tools = llm.bind_tools([get_weather])
    question = HumanMessage("What is the weather in Paris?")
    reply = with_tools.invoke([question])
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    answer = with_tools.invoke(
        [question, reply, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    )
    assert answer.content == ANSWER and not answer.tool_calls
    streamed = None
    for chunk in with_tools.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and [c["name"] for c in streamed.tool_calls] == ["get_weather"]


def test_a_model_without_tool_support_answers_open_webui_default_chat_in_plain_text() -> None:
    cs = mock_chat_stream(mock_params={"type": "round"})  # no tokenizer: no chat template, no tool support
    body = {
        "model": MOCK,
        "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}],
        "tools": open_webui_tools(36),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with run_server(create_app(cs, drain_timeout=1.0)) as url, httpx.Client(timeout=20) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and TOOLS_IGNORED_HEADER in response.headers
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text.startswith("Hello!") and lines[-1] == "data: [DONE]"
        assert [
            c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
        ] == ["stop"]
        for choice in ("required", {"type": "function", "function": {"name": "builtin_tool_3"}}):
            refused = client.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "tool_choice": choice})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"


def test_tools_ignored_on_the_tiny_model_still_stream_a_plain_answer(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, max_new_tokens=8, temperature=0.0)
    body = {"messages": [USER], "tools": open_webui_tools(32), "stream": True}
    with run_server(create_app(cs, drain_timeout=1.0)) as url, httpx.Client(timeout=30) as client:
        response = client.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers[TOOLS_IGNORED_HEADER]
    assert response.text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in response.text


@pytest.mark.local_engine(
    "tool_choice required/named forces the call by constrained decoding, which the upstream engine refuses (400)"
)
def test_required_and_named_tool_choice_force_valid_calls(tiny_model: Any) -> None:
    cs = ChatStream(model=tiny_model, tokenizer=hermes_tokenizer(), max_new_tokens=120, temperature=1.0)
    schema = WEATHER_TOOL["function"]["parameters"]
    with run_server(create_app(cs, drain_timeout=1.0)) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_weather"}}] * 2):
            tools = [WEATHER_TOOL] if choice == "required" else [TIME_TOOL, WEATHER_TOOL]
            completion = sdk.chat.completions.create(
                model=cs.model_name,
                messages=[USER],
                tools=tools,
                tool_choice=choice,  # type: ignore[arg-type]
                parallel_tool_calls=False,
                seed=seed,
            )
            (call,) = completion.choices[0].message.tool_calls or []
            assert call.function.name == "get_weather" and completion.choices[0].finish_reason == "tool_calls"
            jsonschema.validate(json.loads(call.function.arguments), schema)
        several = sdk.chat.completions.create(
            model=cs.model_name, messages=[USER], tools=[WEATHER_TOOL], tool_choice="required", max_tokens=200, seed=9
        )
        calls = several.choices[0].message.tool_calls or []  # the random model may write several calls
        assert calls and all(call.function.name == "get_weather" for call in calls)


@pytest.mark.local_engine("builds its own upstream engine in chat mode")
async def test_tools_on_an_upstream_in_chat_mode_are_a_400_before_admission() -> None:
    from tests.server.support import asgi_client, started

    from chatstream.engine.upstream_engine import OpenAIUpstreamEngine, UpstreamConfig

    # Nothing listens on the upstream's port: the request must be refused before anything is sent there.
    upstream = OpenAIUpstreamEngine(UpstreamConfig("http://127.0.0.1:9/v1", api="chat"))
    cs = ChatStream(engine=upstream, tokenizer=hermes_tokenizer())
    async with started(cs), asgi_client(create_app(cs)) as client:
        body = {"model": cs.model_name, "messages": [USER], "tools": [WEATHER_TOOL]}
        refused = await client.post("/v1/chat/completions", json=body)
        plain = await client.post("/v1/chat/completions", json={**body, "tools": None})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools", refused.text
    assert "completions" in refused.json()["error"]["message"]
    assert cs.metrics.admitted._value.get() == 1  # only the plain chat was admitted (and failed upstream)
    assert plain.status_code == 503
