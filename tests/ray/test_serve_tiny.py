"""The Ray application with 2 replicas of the tiny model: sticky turns with cache reuse, a disconnect that frees the
replica's slot, and a conversation that survives the death of its replica."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from chatstream.config import EngineConfig
from chatstream.ray.app import FrontSettings
from chatstream.ray.spec import EngineSpec, ReplicaSettings
from chatstream.server.openai import conversation_key
from tests.ray.cluster import deployed, routing

pytestmark = pytest.mark.ray

MODEL = "tiny"
REPLICAS = ReplicaSettings(num_replicas=2, num_cpus=0.5)
FRONT = FrontSettings(chat_stream_options={"ignore_eos": True, "max_new_tokens": 24, "model_name": MODEL})


@pytest.fixture(scope="module")
def tiny_app(ray_cluster: str, tiny_model_dir: Path) -> Iterator[str]:
    spec = EngineSpec(
        model_path=str(tiny_model_dir), engine_config=EngineConfig(max_batch_size=2, context_len=2048), num_threads=1
    )
    with deployed(ray_cluster, spec, REPLICAS, FRONT) as url:
        yield url


@pytest.fixture
def client(tiny_app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_app, timeout=60) as c:
        yield c


def chat(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int = 6) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def converse(client: httpx.Client, messages: list[dict[str, str]], text: str) -> dict[str, Any]:
    """One turn: the user's text appended, the answer appended; returns the completion."""
    messages.append({"role": "user", "content": text})
    completion = chat(client, messages)
    messages.append({"role": "assistant", "content": completion["choices"][0]["message"]["content"]})
    return completion


def turns(client: httpx.Client) -> Counter[str]:
    return Counter(routing(client)["turns_by_replica"])


def test_both_protocols_stream_the_tiny_model_through_the_proxy(client: httpx.Client) -> None:
    with client.stream("POST", "/chat_stream", json={"user_input": "Hello"}) as response:
        assert response.status_code == 200
        chunks = [c for c in response.iter_text() if c]
    assert len(chunks) > 1 and chunks[-1].endswith("<::EOS::>")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 8}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_the_turns_of_one_conversation_stay_on_one_replica_and_reuse_its_cache(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}]
    before = turns(client)
    cached, prompts, replicas = [], [], set()
    for i in range(5):
        completion = converse(client, messages, f"Question number {i}?")
        cached.append(completion["usage"]["prompt_tokens_details"]["cached_tokens"])
        prompts.append(completion["usage"]["prompt_tokens"])
        replicas.add(routing(client, conversation=conversation_key(messages[:2], None))["conversation_replica"])
    assert len(replicas) == 1
    # The first turn can only share the opening other chats had on that replica (the prefix cache is shared); from
    # turn 2 each turn reuses at least the whole previous prompt, which only this replica has seen.
    assert cached[0] < prompts[0] and all(c >= p for c, p in zip(cached[1:], prompts, strict=False)), (cached, prompts)
    assert turns(client) - before == Counter({replicas.pop(): 5})


def test_new_conversations_spread_over_both_replicas(client: httpx.Client) -> None:
    before = turns(client)
    for i in range(4):
        chat(client, [{"role": "user", "content": f"A new chat {i}"}])
    assert len(turns(client) - before) == 2


def test_a_disconnect_frees_the_replica_slot_within_a_second(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Tell me a long story."}]
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 1500}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        replica = routing(client, conversation=conversation_key(messages, None))["conversation_replica"]
        assert running_on(client, replica) == 1
    closed = time.monotonic()
    while running_on(client, replica) != 0:
        assert time.monotonic() - closed < 1.0, "the replica still runs the request a second after the disconnect"
        time.sleep(0.05)


def running_on(client: httpx.Client, replica: str) -> int:
    stats = {s["replica_id"]: s for s in routing(client, stats=1)["replicas"]}
    return int(stats[replica]["engine"]["num_running"])


def test_when_its_replica_dies_the_conversation_continues_on_the_other(client: httpx.Client) -> None:
    messages: list[dict[str, str]] = []
    converse(client, messages, "First turn")
    second = converse(client, messages, "Second turn")
    key = conversation_key(messages, None)
    report = routing(client, conversation=key)
    owner = report["conversation_replica"]
    ray.kill(ray.get_actor(report["actor_names"][owner], namespace="serve"), no_restart=True)

    third = converse(client, messages, "Third turn")
    report = routing(client, conversation=key)
    assert report["conversation_replica"] != owner
    assert report["moves"] >= 1
    assert third["usage"]["prompt_tokens"] > second["usage"]["prompt_tokens"]  # it carries the history
    # The conversation's KV died with the replica: the other one can share at most an opening seen in other chats,
    # never the previous turn's prompt
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] < second["usage"]["prompt_tokens"]
