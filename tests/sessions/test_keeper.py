"""ConversationKeeper and one turn's conversation (sessions/keeper.py, sessions/turns.py), without HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatstream.prompts import ChatPromptTogetherRedPajamaINCITEChat
from chatstream.service import PromptFactory
from chatstream.sessions import Conflict, ConversationNotFound, Store
from chatstream.sessions.keeper import LEGACY_PROMPT_KEY, MEMORY_MAX_AGE, ConversationKeeper
from chatstream.sessions.lookup import FoundSession
from chatstream.sessions.sqlite import SQLiteStore
from chatstream.sessions.store import MemoryStore
from chatstream.sessions.turns import commit_turn, open_for_turn, requested_conversation_id

PROMPTS = PromptFactory(ChatPromptTogetherRedPajamaINCITEChat)


@pytest.fixture
async def keeper(store: Store) -> AsyncIterator[ConversationKeeper]:
    """A keeper on ``store``, shut down (its retention task stopped) before the store closes, as an app's lifespan
    does. The tests left the task running into the event loop's teardown, which hung once in CI with a Redis store;
    the shutdown is bounded, so that a hang fails the test instead of the run."""
    made = ConversationKeeper(store, PROMPTS)
    yield made
    await asyncio.wait_for(made.shutdown(), 5)


class Manager:
    """A session manager like fastsession's: a live dict, ``save_session`` counted."""

    def __init__(self, data: dict[str, Any] | None = None, keeps_objects: bool | None = None) -> None:
        self.data = data if data is not None else {}
        self.saves = 0
        if keeps_objects is not None:
            self.keeps_objects = keeps_objects

    def get_session(self) -> dict[str, Any]:
        return self.data

    def save_session(self) -> None:
        self.saves += 1


def session(data: dict[str, Any] | None = None, keeps_objects: bool | None = None) -> FoundSession:
    manager = Manager(data, keeps_objects)
    return FoundSession(manager, manager.data)


async def turn(keeper: ConversationKeeper, found: FoundSession, text: str, requested: str | None = None) -> str:
    """One question and its answer, committed; returns the conversation id."""
    opened = await open_for_turn(keeper, found, requested)
    opened.prompt.add_requester_msg(text)
    opened.prompt.add_responder_msg(None)
    opened.prompt.set_responder_last_msg(f"answer to {text}")
    await commit_turn(keeper, found, opened, {"temperature": 0.5})
    return opened.conversation_id


def test_the_user_id_is_made_once_and_saved() -> None:
    keeper = ConversationKeeper("memory://", PROMPTS)
    found = session()
    assert keeper.owner_of(found, create=False) is None
    owner = keeper.owner_of(found)
    assert owner is not None and owner.startswith("user_") and found.data["user_id"] == owner
    assert keeper.owner_of(found) == owner and found.manager.saves == 1
    assert keeper.owner_of(session({"user_id": 42})) == "42"  # an application's own ids


def test_current_ids_are_checked() -> None:
    keeper = ConversationKeeper("memory://", PROMPTS)
    assert keeper.current_id(session({"conversation_id": "conv_1"})) == "conv_1"
    assert keeper.current_id(session({"conversation_id": "../etc"})) is None
    assert keeper.current_id(session({"conversation_id": 7})) is None


def test_requested_conversation_ids() -> None:
    assert requested_conversation_id(b'{"user_input": "x", "conversation_id": "conv_a"}') == "conv_a"
    assert requested_conversation_id(b'{"user_input": "x"}') is None
    assert requested_conversation_id(b"not json") is None  # the turn answers that one
    with pytest.raises(ValueError, match="'conversation_id'"):
        requested_conversation_id(b'{"conversation_id": "has spaces"}')


def test_retention_defaults() -> None:
    assert ConversationKeeper("memory://", PROMPTS).retention.max_age_seconds == MEMORY_MAX_AGE
    assert ConversationKeeper("memory://", PROMPTS, max_age="never").retention.keeps_everything
    keeper = ConversationKeeper("sqlite:///unused.db", PROMPTS, max_per_owner=3)
    assert (keeper.retention.max_age_seconds, keeper.retention.max_per_owner) == (None, 3)
    assert ConversationKeeper("memory://", PROMPTS, max_age="2d").retention.max_age_seconds == 2 * 86400
    with pytest.raises(ValueError, match="max_age"):
        ConversationKeeper("memory://", PROMPTS, max_age="soon")
    with pytest.raises(TypeError, match="store URL or a chatstream Store"):
        ConversationKeeper(object(), PROMPTS)  # type: ignore[arg-type]


async def test_turns_create_then_append(store: Store, keeper: ConversationKeeper) -> None:
    found = session()
    first = await turn(keeper, found, "one")
    assert found.data["conversation_id"] == first
    assert await turn(keeper, found, "two") == first
    record = await store.conversations.get(found.data["user_id"], first)
    assert [m.text for m in record.messages] == ["one", "answer to one", "two", "answer to two"]
    assert record.messages[1].generation_params == {"temperature": 0.5} and record.version == 2


async def test_a_turn_that_stores_nothing_leaves_no_conversation(store: Store, keeper: ConversationKeeper) -> None:
    found = session()
    opened = await open_for_turn(keeper, found)  # e.g. a pass phrase: nothing is committed
    owner = found.data["user_id"]
    assert (await store.conversations.list_recent(owner)).items == []
    assert await turn(keeper, found, "now") == opened.conversation_id  # the same id, stored at last


async def test_two_first_turns_on_one_new_id_both_stay(store: Store, keeper: ConversationKeeper) -> None:
    found = session()
    tab_a, tab_b = await open_for_turn(keeper, found), await open_for_turn(keeper, found)
    assert tab_a.conversation_id == tab_b.conversation_id
    for opened, text in ((tab_a, "from a"), (tab_b, "from b")):
        opened.prompt.add_requester_msg(text)
        opened.prompt.add_responder_msg(f"answer {text}")
    await asyncio.gather(commit_turn(keeper, found, tab_a), commit_turn(keeper, found, tab_b))
    record = await store.conversations.get(found.data["user_id"], tab_a.conversation_id)
    assert sorted(m.text for m in record.messages) == sorted(["from a", "answer from a", "from b", "answer from b"])


async def test_a_named_conversation_must_be_the_users(keeper: ConversationKeeper) -> None:
    theirs = await turn(keeper, session(), "mine")
    with pytest.raises(ConversationNotFound):
        await open_for_turn(keeper, session(), theirs)


async def test_the_legacy_prompt_is_left_only_in_sessions_of_live_objects() -> None:
    keeper = ConversationKeeper("memory://", PROMPTS)
    live, serialising = session(), session(keeps_objects=False)
    await turn(keeper, live, "kept as an object")
    await turn(keeper, serialising, "json only")
    assert live.data[LEGACY_PROMPT_KEY].get_responder_last_msg() == "answer to kept as an object"
    assert LEGACY_PROMPT_KEY not in serialising.data
    keeper.set_current(live, None)
    assert LEGACY_PROMPT_KEY not in live.data and "conversation_id" not in live.data


async def test_lifecycle_closes_only_the_store_it_opened(tmp_path: Path) -> None:
    given = SQLiteStore(tmp_path / "given.db")
    keeper = ConversationKeeper(given, PROMPTS, retention_interval=0.01)
    await keeper.startup()
    await keeper.startup()  # idempotent: one retention task
    await asyncio.sleep(0.05)
    await keeper.shutdown()
    await given.sessions.save("s", {"user_id": "u"})  # still open: the caller closes it
    await given.close()
    owned = ConversationKeeper(f"sqlite:///{tmp_path}/owned.db", PROMPTS)
    await owned.startup()
    await owned.shutdown()
    await owned.shutdown()
    assert isinstance(ConversationKeeper("memory://", PROMPTS).store, MemoryStore)


async def test_a_regenerated_answer_is_put_in_place_after_a_conflicting_turn(
    store: Store, keeper: ConversationKeeper
) -> None:
    found = session()
    conversation_id = await turn(keeper, found, "question")
    regenerating = await open_for_turn(keeper, found)  # reads the record, then another tab writes a turn
    await turn(keeper, found, "meanwhile")
    regenerating.prompt.clear_last_responder_message()
    regenerating.prompt.set_responder_last_msg("a better answer")
    regenerating.prompt.set_responder_last_msg_id("regenerated")
    await commit_turn(keeper, found, regenerating)
    record = await store.conversations.get(found.data["user_id"], conversation_id)
    texts = [m.text for m in record.messages]
    assert texts == ["question", "a better answer", "meanwhile", "answer to meanwhile"]
    assert record.messages[1].id == "regenerated"


async def test_a_regenerate_whose_answer_is_gone_is_a_conflict(store: Store, keeper: ConversationKeeper) -> None:
    found = session()
    conversation_id = await turn(keeper, found, "question")
    first, second = await open_for_turn(keeper, found), await open_for_turn(keeper, found)
    for opened, text in ((first, "first try"), (second, "second try")):
        opened.prompt.set_responder_last_msg(text)
        opened.prompt.set_responder_last_msg_id(text.replace(" ", "-"))
    await commit_turn(keeper, found, first)
    with pytest.raises(Conflict):
        await commit_turn(keeper, found, second)  # the answer it replaces was replaced by the first
    record = await store.conversations.get(found.data["user_id"], conversation_id)
    assert [m.text for m in record.messages] == ["question", "first try"]
