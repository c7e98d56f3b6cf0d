"""Structured outputs, several choices, logprobs, models.retrieve and unknown paths, with the official SDK against a
real server on the tiny random model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from tests.live_server import run_server
from tests.server.support import mock_chat_stream

from chatstream import ChatStream
from chatstream.server.app import create_app

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
"""Bounded strings and arrays: a complete object always fits in ``max_tokens`` below."""

USER = [{"role": "user", "content": "Describe a person."}]
CONSTRAINED = "response_format is constrained decoding, which is our engine's: the upstream engine refuses it (400)"


@pytest.fixture(scope="module")
def tiny_server(tiny_model: Any, tiny_tokenizer: Any) -> Iterator[tuple[ChatStream, openai.OpenAI, str]]:
    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, num_of_concurrent_executions=8, max_new_tokens=16)
    with run_server(create_app(cs, drain_timeout=1.0)) as url:
        yield cs, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120), url


@pytest.mark.local_engine(CONSTRAINED)
def test_twenty_json_schema_generations_parse_and_validate(tiny_server: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny_server
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    texts = []
    for seed in range(4):
        completion = sdk.chat.completions.create(
            model=cs.model_name, messages=USER, response_format=response_format, n=5, seed=seed * 5, max_tokens=200
        )
        assert [c.finish_reason for c in completion.choices] == ["stop"] * 5
        texts += [c.message.content or "" for c in completion.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 10  # the seeds really sampled


@pytest.mark.local_engine(CONSTRAINED)
def test_json_object_and_a_cut_json_stream(tiny_server: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny_server
    for seed in range(3):
        whole = sdk.chat.completions.create(
            model=cs.model_name, messages=USER, response_format={"type": "json_object"}, seed=seed, max_tokens=300
        )
        if whole.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)
    person: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = sdk.chat.completions.create(
        model=cs.model_name, messages=USER, response_format=person, stream=True, max_tokens=3
    )
    pieces = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text.startswith('{"') and pieces[-1].choices[0].finish_reason == "length"


def test_a_bad_schema_is_a_400_naming_the_field_before_admission(
    tiny_server: tuple[ChatStream, openai.OpenAI, str],
) -> None:
    cs, sdk, _ = tiny_server
    admitted = cs.metrics.admitted._value.get()
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "a"}}}
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(model=cs.model_name, messages=USER, response_format=bad)
    assert error.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    assert cs.metrics.admitted._value.get() == admitted


def test_n_choices(tiny_server: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny_server
    three = sdk.chat.completions.create(model=cs.model_name, messages=USER, n=3, seed=1, max_tokens=5)
    assert [c.index for c in three.choices] == [0, 1, 2] and len({c.message.content for c in three.choices}) > 1
    assert three.usage is not None and three.usage.completion_tokens == 15


@pytest.mark.local_engine(
    "an upstream in completions mode names logprob tokens by their text only: alternatives that are pieces of one "
    "character collapse into one key and their bytes are lost"
)
def test_logprobs(tiny_server: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, _ = tiny_server
    greedy = sdk.chat.completions.create(
        model=cs.model_name, messages=USER, logprobs=True, top_logprobs=5, temperature=0, max_tokens=4
    )
    entries = greedy.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries is not None and len(entries) == 4
    for entry in entries:
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == greedy.choices[0].message.content
    streamed = sdk.chat.completions.create(
        model=cs.model_name, messages=USER, logprobs=True, temperature=0, max_tokens=4, stream=True, n=2
    )
    tokens: dict[int, list[str]] = {0: [], 1: []}
    for chunk in streamed:
        for choice in chunk.choices:
            tokens[choice.index] += [e.token for e in (choice.logprobs.content or [])] if choice.logprobs else []
    assert tokens[0] == tokens[1] == [e.token for e in entries]


def test_models_retrieve_and_unknown_paths(tiny_server: tuple[ChatStream, openai.OpenAI, str]) -> None:
    cs, sdk, url = tiny_server
    model = sdk.models.retrieve(cs.model_name)
    assert model.id == cs.model_name and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")
    with httpx.Client(timeout=10) as client:
        unknown = client.post(f"{url}/v1/embeddings", json={"input": "x"})
        wrong_method = client.get(f"{url}/v1/chat/completions")
        outside = client.get(f"{url}/no/such/page")
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert outside.status_code == 404 and outside.json() == {"detail": "Not Found"}


def test_the_mock_reports_prompt_tokens_and_refuses_response_format() -> None:
    cs = mock_chat_stream()
    with run_server(create_app(cs, drain_timeout=1.0)) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)
        completion = sdk.chat.completions.create(model=cs.model_name, messages=[{"role": "user", "content": "a b c"}])
        assert completion.usage is not None and completion.usage.prompt_tokens > 3
        with pytest.raises(openai.BadRequestError, match="cannot constrain"):
            sdk.chat.completions.create(model=cs.model_name, messages=USER, response_format={"type": "json_object"})
