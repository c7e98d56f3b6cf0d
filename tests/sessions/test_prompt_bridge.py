"""A prompt object rebuilt from its record behaves exactly like the original; a turn is written back as a record."""

from __future__ import annotations

import json
import sys

import pytest

from chatstream.prompts import (
    AbstractChatPrompt,
    ChatPromptDatabricksDolly,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptPlainUserAssistant,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptTogetherRedPajamaINCITEChat,
    PromptTTL,
)
from chatstream.sessions.base import Store
from chatstream.sessions.errors import Conflict, CorruptRecord, ForeignRecord
from chatstream.sessions.prompt_bridge import (
    conversation_to_prompt,
    merge_prompt,
    new_conversation,
    save_prompt,
)
from chatstream.sessions.records import Conversation, Feedback, conversation_from_json, conversation_to_json

PRESETS = [
    ChatPromptTogetherRedPajamaINCITEChat,
    ChatPromptPlainUserAssistant,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptDatabricksDolly,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
]


def _played(prompt_class: type[AbstractChatPrompt]) -> AbstractChatPrompt:
    """Two turns as the request handler makes them, the second still waiting for its answer."""
    prompt = prompt_class()
    prompt.set_system(prompt.format_system_message("Answer in one line."))
    prompt.add_requester_msg("line one\nline two", child_message="an attached input")
    prompt.add_responder_msg(None)
    prompt.set_responder_last_msg("answer one")
    prompt.set_responder_last_msg_id("a1")
    prompt.add_requester_msg("second question")
    prompt.add_responder_msg(None)
    return prompt


def _through_json(record: Conversation) -> Conversation:
    return conversation_from_json(json.loads(json.dumps(conversation_to_json(record))))


@pytest.mark.parametrize("prompt_class", PRESETS, ids=lambda c: c.__name__)
def test_a_rebuilt_prompt_behaves_exactly_like_the_original(prompt_class: type[AbstractChatPrompt]) -> None:
    original = _played(prompt_class)
    record = _through_json(new_conversation("alice", original, now=1.0))
    rebuilt = conversation_to_prompt(record, prompt_class)
    assert type(rebuilt) is prompt_class
    assert rebuilt.to_dict() == original.to_dict()
    for opts in (None, {"omit_last_message": True}, {"to_message_id": "a1"}):
        assert rebuilt.create_prompt(opts) == original.create_prompt(opts)
    assert rebuilt.get_final_stop_strs() == original.get_final_stop_strs()
    assert rebuilt.get_skip_len() == original.get_skip_len()
    assert (rebuilt.get_turn(), rebuilt.is_empty()) == (original.get_turn(), original.is_empty())
    assert [c.get_message_id() for c in rebuilt.chat_contents] == [c.get_message_id() for c in original.chat_contents]
    found = rebuilt.find_chat_content_by_message_id("a1")
    assert found is not None and found.get_message() == "answer one"
    for prompt in (original, rebuilt):  # regenerate, then a new answer, on both
        prompt.set_responder_last_msg("first try")
        prompt.clear_last_responder_message()
        prompt.set_responder_last_msg("second try")
        prompt.set_responder_last_msg_id("a2")
    assert rebuilt.create_prompt() == original.create_prompt()
    assert rebuilt.responder_messages[-1] is rebuilt.chat_contents[-1]


def test_settings_of_the_conversation_are_kept() -> None:
    original = ChatPromptTogetherRedPajamaINCITEChat()
    original.set_prompt_ttl(PromptTTL.SINGLE_TURN)
    original.set_chat_mode_enabled(False)
    rebuilt = conversation_to_prompt(_through_json(new_conversation("alice", original)), type(original))
    assert (rebuilt.prompt_ttl_mode, rebuilt.chat_mode) == (PromptTTL.SINGLE_TURN, False)
    assert rebuilt.responder_prefix_as_stop_str == "<human>:"


def test_merge_keeps_message_metadata_and_gives_ids() -> None:
    prompt = _played(ChatPromptTogetherRedPajamaINCITEChat)
    assert prompt.chat_contents[0].get_message_id() is None
    record = new_conversation("alice", prompt, generation_params={"temperature": 0.3}, now=10.0)
    assert prompt.chat_contents[0].get_message_id() == record.messages[0].id  # written back: the two stay in step
    assert [m.role for m in record.messages] == ["user", "assistant", "user", "assistant"]
    assert record.messages[0].children == ["an attached input"] and record.messages[3].text is None
    assert record.messages[1].generation_params == {"temperature": 0.3} and record.messages[0].generation_params is None
    record.messages[1].feedback = Feedback(True)
    prompt.set_responder_last_msg("answer two")
    merged = merge_prompt(record, prompt, generation_params={"temperature": 0.9}, now=20.0)
    assert merged.messages[1].feedback == Feedback(True) and merged.messages[1].created_at == 10.0
    assert merged.messages[3].text == "answer two" and merged.messages[3].generation_params == {"temperature": 0.3}


async def test_turns_are_saved_as_appends_and_regenerate_as_a_checked_update(store: Store) -> None:
    prompt_class = ChatPromptTogetherRedPajamaINCITEChat
    record = await store.conversations.create(new_conversation("alice", prompt_class()))
    prompt = conversation_to_prompt(record, prompt_class)
    prompt.add_requester_msg("hi")
    prompt.add_responder_msg(None)
    prompt.set_responder_last_msg("hello")
    prompt.set_responder_last_msg_id("a1")
    summary = await save_prompt(store.conversations, record, prompt, generation_params={"temperature": 0.5})
    assert (summary.version, summary.message_count, summary.title) == (2, 2, "hi")
    after_turn = await store.conversations.get("alice", record.id)
    assert after_turn.messages[1].generation_params == {"temperature": 0.5}
    assert await save_prompt(store.conversations, after_turn, prompt) == after_turn.summary()  # nothing changed
    regenerated = conversation_to_prompt(after_turn, prompt_class)
    regenerated.clear_last_responder_message()
    regenerated.set_responder_last_msg("hello again")
    regenerated.set_responder_last_msg_id("a2")
    assert (await save_prompt(store.conversations, after_turn, regenerated)).version == 3
    stored = await store.conversations.get("alice", record.id)
    assert [m.id for m in stored.messages] == [after_turn.messages[0].id, "a2"]
    assert stored.messages[0].created_at == after_turn.messages[0].created_at
    with pytest.raises(Conflict):  # a second tab regenerating from the same old version
        await save_prompt(
            store.conversations, after_turn, conversation_to_prompt(_with_answer(after_turn), prompt_class)
        )
    await store.conversations.set_feedback("alice", record.id, "a2", Feedback(is_like=False))
    final = conversation_to_prompt(await store.conversations.get("alice", record.id), prompt_class)
    assert final.create_prompt({"to_message_id": "a2"}) == "<human>: hi\n<bot>: hello again\n"


def _with_answer(record: Conversation) -> Conversation:
    changed = _through_json(record)
    changed.messages[-1].text = "another tab's answer"
    changed.messages[-1].id = "a3"
    return changed


def test_another_prompt_class_is_foreign_unless_allowed() -> None:
    record = new_conversation("alice", _played(ChatPromptTogetherRedPajamaINCITEChat))
    with pytest.raises(ForeignRecord, match=r"ChatPromptTogetherRedPajamaINCITEChat, not .*PlainUserAssistant"):
        conversation_to_prompt(record, ChatPromptPlainUserAssistant)
    moved = conversation_to_prompt(record, ChatPromptPlainUserAssistant, allow_other_class=True)
    assert moved.create_prompt().endswith("User: second question\nAssistant:")
    record.prompt_class = "__main__.ChatPromptTogetherRedPajamaINCITEChat"  # the same class, run as a script
    assert isinstance(conversation_to_prompt(record, ChatPromptTogetherRedPajamaINCITEChat), AbstractChatPrompt)


def test_a_record_never_imports_what_it_names() -> None:
    record = new_conversation("alice", ChatPromptTogetherRedPajamaINCITEChat())
    record.prompt_class = "chatstream_test_never_imported.Evil"
    with pytest.raises(ForeignRecord):
        conversation_to_prompt(record, ChatPromptTogetherRedPajamaINCITEChat)
    assert "chatstream_test_never_imported" not in sys.modules


def test_settings_the_prompt_class_rejects_are_a_corrupt_record() -> None:
    record = new_conversation("alice", ChatPromptTogetherRedPajamaINCITEChat())
    record.prompt_settings["prompt_ttl"] = "FOREVER"
    with pytest.raises(CorruptRecord, match="rejects the stored prompt") as caught:
        conversation_to_prompt(record, ChatPromptTogetherRedPajamaINCITEChat)
    assert caught.value.key == record.id
