"""The behaviour every store shares, run against memory, SQLite (a temp file) and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from chatstream.sessions.base import Store
from chatstream.sessions.errors import Conflict, ConversationNotFound, MessageNotFound
from chatstream.sessions.records import Feedback
from chatstream.sessions.retention import RetentionPolicy
from tests.sessions.support import START, conversation, message


async def test_create_then_get_returns_the_same_record(store: Store) -> None:
    original = conversation(texts=("What is   WAL?\nTell me", "A journal mode."))
    original.messages[0].children = ["first input", "second"]
    original.messages[1].feedback = Feedback(is_like=True, form_data={"why": ["clear"]}, created_at=START + 5)
    original.messages[1].generation_params = {"temperature": 0.7, "top_k_value": 40}
    original.messages.append(message("assistant", None, "slot", name="<bot>"))
    created = await store.conversations.create(original)
    assert created.version == 1 and created.title == "What is WAL? Tell me"
    got = await store.conversations.get("alice", original.id)
    assert got == created
    assert got.summary().message_count == 3


async def test_another_owners_conversation_reads_as_missing(store: Store) -> None:
    created = await store.conversations.create(conversation(owner="alice"))
    with pytest.raises(ConversationNotFound) as foreign:
        await store.conversations.get("mallory", created.id)
    with pytest.raises(ConversationNotFound) as missing:
        await store.conversations.get("alice", "conv_missing")
    assert str(foreign.value) == f"conversation {created.id!r} not found"
    assert type(foreign.value) is type(missing.value)
    for write in (
        store.conversations.append_messages("mallory", created.id, [message("user", "x")]),
        store.conversations.update(dataclasses.replace(created, owner="mallory")),
        store.conversations.rename("mallory", created.id, "mine now"),
        store.conversations.delete("mallory", created.id),
    ):
        with pytest.raises(ConversationNotFound):
            await write
    assert await store.conversations.get("alice", created.id) == created


async def test_creating_an_existing_id_conflicts(store: Store) -> None:
    created = await store.conversations.create(conversation())
    with pytest.raises(Conflict, match="already exists"):
        await store.conversations.create(dataclasses.replace(created, owner="bob"))


async def test_list_is_newest_first_and_paginated(store: Store) -> None:
    ids = [(await store.conversations.create(conversation(updated_at=START - 100 + i))).id for i in range(5)]
    await store.conversations.create(conversation(owner="bob"))
    first = await store.conversations.list_recent("alice", limit=2)
    assert [s.id for s in first.items] == ids[::-1][:2] and first.has_more
    second = await store.conversations.list_recent("alice", limit=2, after=first.next_after)
    third = await store.conversations.list_recent("alice", limit=2, after=second.next_after)
    assert [s.id for s in second.items + third.items] == ids[::-1][2:]
    assert not third.has_more and third.next_after is None
    await store.conversations.append_messages("alice", ids[0], [message("user", "bump")])
    assert (await store.conversations.list_recent("alice", limit=1)).items[0].id == ids[0]
    assert (await store.conversations.list_recent("nobody")).items == []
    with pytest.raises(ConversationNotFound):
        await store.conversations.list_recent("bob", after=ids[0])
    with pytest.raises(ValueError, match="limit"):
        await store.conversations.list_recent("alice", limit=0)


async def test_append_is_atomic_and_checks_the_version_when_asked(store: Store) -> None:
    created = await store.conversations.create(conversation(texts=()))
    assert created.title == ""
    summary = await store.conversations.append_messages(
        "alice", created.id, [message("user", "first question"), message("assistant", "answer")]
    )
    assert (summary.version, summary.message_count, summary.title) == (2, 2, "first question")
    assert summary.updated_at > created.updated_at and summary.created_at == created.created_at
    with pytest.raises(Conflict) as stale:
        await store.conversations.append_messages("alice", created.id, [message("user", "late")], expected_version=1)
    assert (stale.value.expected_version, stale.value.actual_version) == (1, 2)
    await store.conversations.append_messages("alice", created.id, [message("user", "next")], expected_version=2)
    got = await store.conversations.get("alice", created.id)
    assert [m.text for m in got.messages] == ["first question", "answer", "next"] and got.version == 3


async def test_update_replaces_the_messages_with_a_version_check(store: Store) -> None:
    created = await store.conversations.create(conversation())
    await store.conversations.rename("alice", created.id, "Kept title")
    changed = dataclasses.replace(
        created, title="ignored", prompt_settings={"system": "be brief"}, messages=[message("user", "only")]
    )
    updated = await store.conversations.update(changed)
    assert (updated.version, updated.title) == (2, "Kept title")
    assert await store.conversations.get("alice", created.id) == updated
    with pytest.raises(Conflict):
        await store.conversations.update(changed)  # still at version 1


async def test_two_writers_of_one_version_one_conflicts(store: Store) -> None:
    created = await store.conversations.create(conversation())
    tab_a = dataclasses.replace(created, messages=[*created.messages, message("user", "from tab a")])
    tab_b = dataclasses.replace(created, messages=[*created.messages, message("user", "from tab b")])
    results = await asyncio.gather(
        store.conversations.update(tab_a), store.conversations.update(tab_b), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "Conversation"]
    winner = next(r for r in results if not isinstance(r, BaseException))
    assert await store.conversations.get("alice", created.id) == winner


async def test_concurrent_appends_keep_every_turn(store: Store) -> None:
    created = await store.conversations.create(conversation(texts=()))
    turns = [[message("user", f"q{i}"), message("assistant", f"a{i}")] for i in range(8)]
    await asyncio.gather(*(store.conversations.append_messages("alice", created.id, turn) for turn in turns))
    got = await store.conversations.get("alice", created.id)
    assert got.version == 9 and len(got.messages) == 16
    for i in range(8):  # each turn's two messages stay together
        index = [m.text for m in got.messages].index(f"q{i}")
        assert got.messages[index + 1].text == f"a{i}"


async def test_rename_keeps_the_version_and_the_order(store: Store) -> None:
    older = await store.conversations.create(conversation(texts=("older one", "x"), updated_at=START))
    await store.conversations.create(conversation(updated_at=START + 100))
    renamed = await store.conversations.rename("alice", older.id, "  My   notes ")
    assert (renamed.title, renamed.version, renamed.updated_at) == ("My notes", 1, older.updated_at)
    assert (await store.conversations.list_recent("alice")).items[1].id == older.id
    await store.conversations.append_messages("alice", older.id, [message("user", "more")])
    assert (await store.conversations.get("alice", older.id)).title == "My notes"
    assert (await store.conversations.rename("alice", older.id, "")).title == "older one"
    with pytest.raises(ValueError, match="200"):
        await store.conversations.rename("alice", older.id, "x" * 201)


async def test_delete_and_delete_owner(store: Store) -> None:
    kept = await store.conversations.create(conversation(owner="bob"))
    doomed = [await store.conversations.create(conversation()) for _ in range(3)]
    await store.conversations.delete("alice", doomed[0].id)
    with pytest.raises(ConversationNotFound):
        await store.conversations.delete("alice", doomed[0].id)
    with pytest.raises(ConversationNotFound):
        await store.conversations.get("alice", doomed[0].id)
    assert await store.conversations.delete_owner("alice") == 2
    assert await store.conversations.delete_owner("alice") == 0
    assert (await store.conversations.list_recent("alice")).items == []
    assert await store.conversations.get("bob", kept.id) == kept


async def test_sweep_by_age_and_by_count_per_owner(store: Store) -> None:
    old = await store.conversations.create(conversation(updated_at=START - 10 * 86400))
    recent = [await store.conversations.create(conversation(updated_at=START + i)) for i in range(3)]
    bobs = await store.conversations.create(conversation(owner="bob", updated_at=START))
    assert await store.conversations.sweep(RetentionPolicy(), now=START + 10) == 0
    assert await store.conversations.sweep(RetentionPolicy(max_age_seconds=86400), now=START + 10) == 1
    with pytest.raises(ConversationNotFound):
        await store.conversations.get("alice", old.id)
    assert await store.conversations.sweep(RetentionPolicy(max_per_owner=2), now=START + 10) == 1
    left = [s.id for s in (await store.conversations.list_recent("alice")).items]
    assert left == [recent[2].id, recent[1].id]
    assert (await store.conversations.get("bob", bobs.id)).id == bobs.id


async def test_set_feedback(store: Store) -> None:
    created = await store.conversations.create(conversation())
    updated = await store.conversations.set_feedback("alice", created.id, "m1", Feedback(False, "too long", START))
    assert updated.version == 2 and updated.messages[1].feedback == Feedback(False, "too long", START)
    assert (await store.conversations.get("alice", created.id)).messages[1].feedback == Feedback(
        False, "too long", START
    )
    with pytest.raises(MessageNotFound):
        await store.conversations.set_feedback("alice", created.id, "nope", None)


async def test_sessions_round_trip(store: Store) -> None:
    assert await store.sessions.get("s1") is None
    await store.sessions.save(
        "s1", {"user_id": "u1", "conversation_id": "conv_1", "generation_params": {"temperature": 0.5}}
    )
    assert await store.sessions.get("s1") == {
        "user_id": "u1",
        "conversation_id": "conv_1",
        "generation_params": {"temperature": 0.5},
    }
    await store.sessions.save("s1", {"user_id": "u1"})
    assert await store.sessions.get("s1") == {"user_id": "u1"}
    await store.sessions.delete("s1")
    await store.sessions.delete("s1")
    assert await store.sessions.get("s1") is None


async def test_durable_sessions_hold_json_only(store: Store) -> None:
    if store.sessions.live_objects:
        live = {"chat_prompt": object()}
        await store.sessions.save("s", live)
        assert await store.sessions.get("s") is live  # the memory store keeps live objects, as before
        return
    with pytest.raises(TypeError, match=r"not JSON under \['chat_prompt'\]"):
        await store.sessions.save("s", {"user_id": "u", "chat_prompt": object()})
    assert await store.sessions.get("s") is None
