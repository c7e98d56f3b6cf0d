"""The Responses API with the official SDK against a real server: a previous_response_id chain on the tiny model
served from the KV of its conversation, streamed events, retrieve and delete, forks, store=false, text.format, function
calls from a scripted model and their outputs, and the errors."""

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
from tests.server.tool_support import WEATHER_TOOL, hermes_call, hermes_tokenizer

from chatstream import ChatStream
from chatstream.server.app import create_app

MOCK = "chatstream-mock"
WEATHER = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses API's flat tool shape


@pytest.fixture(scope="module")
def tiny(tiny_model: Any, tiny_tokenizer: Any) -> Iterator[tuple[ChatStream, openai.OpenAI, str]]:
    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, max_new_tokens=8, temperature=0.0)
    with run_server(create_app(cs, drain_timeout=1.0, api_keys=("sk-a", "sk-b"))) as url:
        yield cs, openai.OpenAI(base_url=f"{url}/v1", api_key="sk-a", max_retries=0, timeout=60), url


@pytest.mark.local_engine(
    "KV reuse along a conversation and its cached-token counts are our engine's (an upstream's prefix cache is "
    "shared with its other clients: here the other tests)"
)
def test_a_three_step_chain_reuses_the_conversation_kv(tiny: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny
    first = sdk.responses.create(model=cs.model_name, input="Hello there, how are you today?", instructions="Be brief.")
    assert first.object == "response" and first.status == "incomplete" and first.output_text
    assert first.incomplete_details is not None and first.incomplete_details.reason == "max_output_tokens"
    second = sdk.responses.create(
        model=cs.model_name, input="Tell me more.", previous_response_id=first.id, instructions="Be brief."
    )
    third = sdk.responses.create(
        model=cs.model_name, input="And then?", previous_response_id=second.id, instructions="Be brief."
    )
    assert third.previous_response_id == second.id and third.usage is not None
    assert third.usage.input_tokens > second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]
    assert third.usage.input_tokens_details.cached_tokens > first.usage.input_tokens  # type: ignore[union-attr]
    assert first.usage.input_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    again = sdk.responses.retrieve(second.id)
    assert again.id == second.id and again.output_text == second.output_text and again.usage == second.usage


def test_streamed_events_and_the_stored_response(tiny: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny
    events = list(sdk.responses.create(model=cs.model_name, input="Stream it", stream=True, max_output_tokens=5))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas and final.usage.output_tokens == 5  # type: ignore[union-attr]
    assert sdk.responses.retrieve(final.id).output_text == deltas


def test_delete_forks_store_false_and_owners(tiny: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, url = tiny
    recorder = Recorder(cs)
    first = sdk.responses.create(model=cs.model_name, input="One")
    second = sdk.responses.create(model=cs.model_name, input="Two", previous_response_id=first.id)
    fork = sdk.responses.create(model=cs.model_name, input="Other", previous_response_id=first.id)
    assert fork.id.rsplit("_", 1)[0] != second.id.rsplit("_", 1)[0]  # a new record
    assert "Two" not in recorder.requests[-1].prompt and "One" in recorder.requests[-1].prompt
    sdk.responses.delete(first.id)  # not the latest of its record: marked deleted, its text stays in the history
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as error:
        sdk.responses.create(model=cs.model_name, input="x", previous_response_id=first.id)
    assert error.value.body["param"] == "previous_response_id"  # type: ignore[index]
    third = sdk.responses.create(model=cs.model_name, input="Three", previous_response_id=second.id)
    assert "One" in recorder.requests[-1].prompt and third.status in ("completed", "incomplete")
    sdk.responses.delete(third.id)  # the latest: its turn is removed
    assert sdk.responses.create(model=cs.model_name, input="Again", previous_response_id=second.id).id == third.id
    unstored = sdk.responses.create(model=cs.model_name, input="Not kept", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)
    other_owner = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-b", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other_owner.responses.retrieve(second.id)


@pytest.mark.local_engine("text.format json_schema is constrained decoding, which the upstream engine refuses (400)")
def test_text_format_json_schema(tiny: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    text: Any = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    response = sdk.responses.create(model=cs.model_name, input="Answer in JSON", text=text, max_output_tokens=20)
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.status == "completed"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input[0].type"),
        ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"input": "x", "tool_choice": "required", "tools": [WEATHER]}, 400, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}, 400, "text.format.schema"),
        ({"input": "x", "background": True}, 400, "background"),
        ({}, 400, "input"),
        ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({"input": "x", "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_name_the_field(
    tiny: tuple[ChatStream, openai.OpenAI, str], body: dict[str, Any], status: int, param: str
) -> None:
    _, _, url = tiny
    response = httpx.post(f"{url}/v1/responses", json=body, headers={"Authorization": "Bearer sk-a"}, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.get(f"{url}/v1/responses/resp_x", timeout=10).status_code == 401


def test_function_calls_and_their_outputs_with_a_scripted_model() -> None:
    script = [hermes_call("get_weather", city="Paris"), "It is sunny.", hermes_call("get_weather", city="Oslo")]
    cs = mock_chat_stream(tokenizer=hermes_tokenizer(), mock_params={"type": "script", "script": script})
    recorder = Recorder(cs)
    with run_server(create_app(cs, drain_timeout=1.0)) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)
        called = sdk.responses.create(model=MOCK, input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
        (call,) = called.output
        assert (
            call.type == "function_call"
            and call.name == "get_weather"
            and json.loads(call.arguments) == {"city": "Paris"}
        )
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        answer = sdk.responses.create(model=MOCK, input=[output], previous_response_id=called.id, tools=[WEATHER])  # type: ignore[list-item]
        assert answer.output_text == "It is sunny." and "<|tool|>\nsunny" in recorder.requests[-1].prompt
        assert '"arguments": {"city": "Paris"}' in recorder.requests[-1].prompt
        events = list(sdk.responses.create(model=MOCK, input="And Oslo?", tools=[WEATHER], stream=True))  # type: ignore[list-item]
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.done" in kinds and "response.output_text.delta" not in kinds
    (item,) = events[-1].response.output  # type: ignore[union-attr]
    assert item.type == "function_call" and json.loads(item.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]


def test_responses_live_in_the_chatstream_store_and_survive_a_restart(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'chats.db'}"
    first_server = mock_chat_stream(store=url)
    with run_server(create_app(first_server, drain_timeout=1.0)) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-x", max_retries=0, timeout=20)
        first = sdk.responses.create(model=MOCK, input="remember me")
    second_server = mock_chat_stream(store=url)
    with run_server(create_app(second_server, drain_timeout=1.0)) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-x", max_retries=0, timeout=20)
        assert sdk.responses.retrieve(first.id).output_text == "remember me"
        follow_up = sdk.responses.create(model=MOCK, input="and me", previous_response_id=first.id)
        assert follow_up.output_text == "and me" and follow_up.previous_response_id == first.id
