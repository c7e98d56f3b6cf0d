"""AbstractChatPrompt: history, options, stop strings, (de)serialisation, OpenAI messages."""

from __future__ import annotations

import pytest

from chatstream.prompts import (
    AbstractChatPrompt,
    ChatContent,
    ChatPromptCyberAgentOpenCalm,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptTogetherRedPajamaINCITEChat,
    PromptOptions,
    PromptTTL,
    RoleType,
    load_openai_messages,
)
from chatstream.prompts.openai_messages import role_messages


class SeedStylePrompt(AbstractChatPrompt):
    """A prompt class written the way the original package's docs show (``opts={}``, role names, get_contents)."""

    def __init__(self):
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")

    def create_prompt(self, opts={}):  # noqa: B006 - written like seed code on purpose
        ret = self.system
        for chat_content in self.get_contents(opts):
            if chat_content.get_message():
                ret += chat_content.get_role() + ": " + chat_content.get_message() + "\n"
            else:
                ret += chat_content.get_role() + ":"
        return ret

    def build_initial_prompt(self, chat_prompt):
        pass


def _two_turns(prompt: AbstractChatPrompt) -> AbstractChatPrompt:
    prompt.add_requester_msg("hello")
    prompt.add_responder_msg("hi there")
    prompt.set_responder_last_msg_id("m1")
    prompt.add_requester_msg("how are you?", child_messages=["ctx a", "ctx b"])
    prompt.add_responder_msg(None)
    return prompt


def test_chat_content_round_trip() -> None:
    content = ChatContent("user", "text", msg_id="id1", role_type=RoleType.REQUESTER)
    content.add_child_message("child")
    restored = ChatContent.from_dict(content.to_dict())
    assert restored.to_dict() == content.to_dict()
    assert restored.get_role_type() is RoleType.REQUESTER
    assert restored.has_child_messages() and restored.get_child_messages() == ["child"]
    assert not ChatContent("x").has_child_messages()


def test_seed_style_subclass_renders_the_generation_slot() -> None:
    prompt = SeedStylePrompt()
    prompt.add_requester_msg("Who is Alan Turing")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == "<human>: Who is Alan Turing\n<bot>:"
    assert prompt.get_skip_len() == len("<human>: Who is Alan Turing\n<bot>:")
    assert prompt.get_turn() == 1
    assert not prompt.is_empty()


def test_history_accessors() -> None:
    prompt = _two_turns(SeedStylePrompt())
    assert prompt.get_requester_last_msg() == "how are you?"
    assert prompt.get_responder_last_msg() is None
    prompt.set_responder_last_msg("fine")
    prompt.set_responder_last_msg_id("m2")
    assert prompt.get_responder_last_msg() == "fine"
    assert prompt.chat_contents[-1].get_message() == "fine"
    assert prompt.find_chat_content_by_message_id("m2") is prompt.chat_contents[-1]
    assert prompt.find_chat_content_by_message_id("nope") is None
    assert prompt.get_turn() == 2
    assert prompt.is_requester_role("<human>") and not prompt.is_requester_role("<bot>")


def test_child_message_arguments_are_validated() -> None:
    prompt = SeedStylePrompt()
    with pytest.raises(ValueError, match="not both"):
        prompt.add_requester_msg("x", child_message="a", child_messages=["b"])
    with pytest.raises(ValueError, match="child_messages"):
        prompt.add_requester_msg("x", child_messages=[])
    with pytest.raises(ValueError, match="child_messages"):
        prompt.add_requester_msg("x", child_messages=["ok", 3])  # type: ignore[list-item]
    assert prompt.add_requester_msg("x", child_message="a").get_child_messages() == ["a"]


@pytest.mark.parametrize("opts", [None, {}, PromptOptions()])
def test_get_contents_accepts_none_dict_and_options(opts: object) -> None:
    prompt = _two_turns(SeedStylePrompt())
    assert prompt.get_contents(opts) == prompt.chat_contents  # type: ignore[arg-type]


def test_get_contents_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="opts"):
        SeedStylePrompt().get_contents("omit_last_message")  # type: ignore[arg-type]


def test_omit_last_message_keeps_role_type() -> None:
    # Llama-2 renders by role type; the seed's placeholder lost it and dropped the question from the prompt.
    prompt = ChatPromptMetaLlamaLlama2Chat()
    prompt.add_requester_msg("Q1")
    prompt.add_responder_msg("A1")
    full = prompt.create_prompt()
    omitted = prompt.create_prompt({"omit_last_message": True})
    assert full.endswith("Q1 [/INST] A1 </s><s>[INST] ")
    assert omitted.endswith("Q1 [/INST] ")
    assert prompt.get_contents({"omit_last_message": True})[-1].get_role_type() is RoleType.RESPONDER
    assert prompt.get_responder_last_msg() == "A1"  # the history itself is untouched


def test_to_message_id_stops_at_that_message() -> None:
    prompt = _two_turns(SeedStylePrompt())
    assert prompt.create_prompt({"to_message_id": "m1"}) == "<human>: hello\n<bot>: hi there\n"


def test_single_turn_renders_only_the_latest_turn() -> None:
    prompt = _two_turns(SeedStylePrompt())
    prompt.set_prompt_ttl(PromptTTL.SINGLE_TURN)
    assert prompt.create_prompt() == "<human>: how are you?\n<bot>:"
    assert len(prompt.chat_contents) == 4
    with pytest.raises(ValueError, match="PromptTTL"):
        prompt.set_prompt_ttl("single")  # type: ignore[arg-type]


def test_regenerate_and_remove() -> None:
    prompt = _two_turns(SeedStylePrompt())
    prompt.set_responder_last_msg("draft")
    prompt.clear_last_responder_message()
    assert prompt.get_responder_last_msg() is None
    assert prompt.create_prompt().endswith("<bot>:")
    with pytest.raises(ValueError, match="responder"):
        prompt.remove_last_requester_msg()
    prompt.remove_last_responder_msg()
    prompt.remove_last_requester_msg()
    assert [c.get_message() for c in prompt.chat_contents] == ["hello", "hi there"]
    assert len(prompt.requester_messages) == 1 and len(prompt.responder_messages) == 1
    prompt.add_requester_msg("q")
    with pytest.raises(ValueError, match="responder"):
        prompt.remove_last_responder_msg()


def test_remove_works_when_both_roles_share_a_name() -> None:
    # OpenCalm's requester and responder are both "": the seed compared role names and could never remove.
    prompt = ChatPromptCyberAgentOpenCalm()
    prompt.add_requester_msg("AIによって私達の暮らしは、")
    prompt.remove_last_requester_msg()
    assert prompt.is_empty() and prompt.chat_contents == []
    prompt.remove_last_requester_msg()  # empty history: nothing to do
    with pytest.raises(ValueError):
        prompt.remove_last_responder_msg()


def test_set_responder_last_msg_without_responder_raises() -> None:
    with pytest.raises(ValueError, match="add_responder_msg"):
        SeedStylePrompt().set_responder_last_msg("x")


def test_input_replacement_is_applied_to_requester_messages_only() -> None:
    prompt = ChatPromptRinnaJapaneseGPTNeoxInst()
    prompt.add_requester_msg("一行目\n二行目")
    prompt.add_responder_msg("答え\n続き")
    assert prompt.get_requester_last_msg() == "一行目<NL>二行目"
    assert prompt.get_responder_last_msg() == "答え\n続き"


def test_round_trip_keeps_everything_and_shares_objects() -> None:
    prompt = _two_turns(SeedStylePrompt())
    prompt.set_system("SYS\n")
    prompt.set_prompt_ttl(PromptTTL.SINGLE_TURN)
    restored = SeedStylePrompt.from_dict(prompt.to_dict())
    assert restored.to_dict() == prompt.to_dict()
    assert restored.create_prompt() == prompt.create_prompt()
    assert restored.find_chat_content_by_message_id("m1").get_message() == "hi there"
    assert restored.chat_contents[2].get_child_messages() == ["ctx a", "ctx b"]
    # the seed's from_dict built separate copies, so set_responder_last_msg no longer changed the history
    assert restored.responder_messages[-1] is restored.chat_contents[-1]
    assert restored.requester_messages[0] is restored.chat_contents[0]
    restored.set_responder_last_msg("streamed")
    assert restored.create_prompt().endswith("<bot>: streamed\n")


def test_from_dict_reads_the_seeds_dict() -> None:
    seed_dict = {
        "system": "",
        "chat_contents": [
            {"role": "<human>", "role_type": "REQUESTER", "message": "q", "message_id": None},
            {"role": "<bot>", "role_type": "RESPONDER", "message": "a", "message_id": "x", "child_messages": None},
        ],
        "responder_messages": [],
        "requester_messages": [],
        "requester": "<human>",
        "responder": "<bot>",
        "chat_mode": True,
    }
    restored = ChatPromptTogetherRedPajamaINCITEChat.from_dict(seed_dict)
    assert restored.create_prompt() == "<human>: q\n<bot>: a\n"
    assert restored.get_responder_last_msg() == "a" and restored.get_turn() == 1
    assert restored._get_final_stop_strs()[0] == "<human>:"


def test_prefix_stop_string_does_not_clear_history() -> None:
    prompt = _two_turns(SeedStylePrompt())
    prompt.set_prefix_as_stop_str_enabled(True)
    assert prompt.responder_prefix_as_stop_str == "<human>:"
    assert len(prompt.chat_contents) == 4
    assert prompt.get_final_stop_strs() == ["<human>:"]
    prompt.set_chat_mode_enabled(False)
    assert prompt.get_final_stop_strs() == []
    assert prompt._get_final_stop_strs() == ["<human>:"]


def test_prefix_stop_string_needs_a_visible_requester_turn() -> None:
    prompt = ChatPromptCyberAgentOpenCalm()
    with pytest.raises(ValueError, match="set_requester"):
        prompt.set_prefix_as_stop_str_enabled(True)


def test_chat_mode_off_renders_the_last_message_alone() -> None:
    prompt = ChatPromptTogetherRedPajamaINCITEChat()
    prompt.set_chat_mode_enabled(False)
    assert prompt.create_prompt() == ""
    prompt.add_requester_msg("complete this")
    prompt.add_responder_msg(None)
    assert not prompt.is_chat_mode_enabled()
    assert prompt.create_prompt() == "complete this"


class _FakeTokenizer:
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["<x>", "<y>"]}


def test_skip_len_ignores_special_tokens() -> None:
    prompt = SeedStylePrompt()
    prompt.set_system("<s><x>")
    prompt.add_requester_msg("hi")
    prompt.add_responder_msg(None)
    with_specials = len(prompt.create_prompt())
    prompt.set_tokenizer(_FakeTokenizer())
    assert prompt.special_tokens == ["<s>", "</s>", "<x>", "<y>"]
    assert prompt.get_skip_len() == with_specials - len("<s><x>")


def test_load_openai_messages() -> None:
    prompt = ChatPromptTogetherRedPajamaINCITEChat()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Who are "}, {"type": "text", "text": "you?"}]},
    ]
    load_openai_messages(prompt, messages)
    assert prompt.create_prompt() == "Be brief.\n<human>: Hi\n<bot>: Hello.\n<human>: Who are you?\n<bot>:"
    load_openai_messages(prompt, messages[:3])
    assert prompt.create_prompt().endswith("<bot>: Hello.\n")  # no slot after an assistant message
    filled = load_openai_messages(ChatPromptTogetherRedPajamaINCITEChat(), messages[1:2])
    assert filled.create_prompt() == "<human>: Hi\n<bot>:"


def test_role_messages_give_the_conversation_back_for_engines_that_render_it() -> None:
    prompt = load_openai_messages(
        ChatPromptTogetherRedPajamaINCITEChat(),
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Who are you?"},
        ],
    )
    pairs = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Who are you?"))
    assert role_messages(prompt) == pairs  # the empty answer slot is left out
    prompt.set_chat_mode_enabled(False)
    assert role_messages(prompt) == (("user", "Who are you?"),)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}], r"content\[0\]"),
    ],
)
def test_load_openai_messages_names_the_bad_field(messages: list[dict], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        load_openai_messages(ChatPromptTogetherRedPajamaINCITEChat(), messages)
