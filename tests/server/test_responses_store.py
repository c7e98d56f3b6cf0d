"""Responses as conversation records: ids, turns, forks when a continuation loses the race, deletion."""

from __future__ import annotations

import pytest

from chatstream.server.errors import NotFound
from chatstream.server.responses_store import (
    ResponseStore,
    Turn,
    answer_record,
    chat_messages,
    input_records,
    owner_of,
)
from chatstream.sessions.base import Store
from chatstream.sessions.store import MemoryStore


@pytest.fixture
def store() -> tuple[ResponseStore, MemoryStore]:
    memory = MemoryStore()

    async def provide() -> Store:
        return memory

    return ResponseStore(provide), memory


async def turn(responses: ResponseStore, previous: str | None, text: str, owner: str = "o") -> Turn:
    chain = None if previous is None else await responses.find(owner, previous, "previous_response_id")
    started = await responses.begin(owner, chain, input_records([{"role": "user", "content": text}], 0.0), store=True)
    answer = answer_record(started, f"answer to {text}", {"id": started.response_id}, [])
    await responses.finish(owner, started, answer)
    return started


async def test_a_chain_is_one_record_and_a_lost_race_forks(store: tuple[ResponseStore, MemoryStore]) -> None:
    responses, memory = store
    first = await turn(responses, None, "one")
    second = await turn(responses, first.response_id, "two")
    assert first.conversation_id == second.conversation_id and second.response_id.endswith("_2")
    chain = await responses.find("o", second.response_id)
    assert [m["content"] for m in chat_messages(chain.history)] == ["one", "answer to one", "two", "answer to two"]
    racing = [await responses.find("o", second.response_id) for _ in range(2)]
    inputs = input_records([{"role": "user", "content": "three"}], 0.0)
    winner = await responses.begin("o", racing[0], inputs, store=True)
    loser = await responses.begin("o", racing[1], inputs, store=True)
    assert winner.conversation_id == first.conversation_id and loser.conversation_id != first.conversation_id
    forked = await memory.conversations.get("o", loser.conversation_id or "")
    assert [m.text for m in forked.messages] == ["one", "answer to one", "two", "answer to two", "three"]


async def test_deleting_the_latest_removes_its_turn_else_hides_it(store: tuple[ResponseStore, MemoryStore]) -> None:
    responses, memory = store
    first = await turn(responses, None, "one")
    second = await turn(responses, first.response_id, "two")
    await responses.delete("o", first.response_id)
    with pytest.raises(NotFound):
        await responses.find("o", first.response_id)
    assert len((await responses.find("o", second.response_id)).history) == 4  # the hidden turn stays as history
    await responses.delete("o", second.response_id)
    assert len((await memory.conversations.get("o", second.conversation_id or "")).messages) == 2
    lone = await turn(responses, None, "alone")
    await responses.delete("o", lone.response_id)
    assert lone.conversation_id not in [item.id for item in (await memory.conversations.list_recent("o")).items]


async def test_owners_and_unknown_ids(store: tuple[ResponseStore, MemoryStore]) -> None:
    responses, _ = store
    mine = await turn(responses, None, "mine", owner=owner_of("Bearer sk-a"))
    with pytest.raises(NotFound):
        await responses.find(owner_of("Bearer sk-b"), mine.response_id)
    for bad in ("resp_x", "nope", mine.response_id + "0"):
        with pytest.raises(NotFound):
            await responses.find(owner_of("Bearer sk-a"), bad)
    assert owner_of(None) == owner_of("Basic x") == "openai" != owner_of("Bearer sk-a")
    unstored = await responses.begin("o", None, [], store=False)
    assert unstored.conversation_id is None and unstored.response_id.startswith("resp_")
