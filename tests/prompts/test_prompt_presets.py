"""The preset prompt classes: one format check each, plus properties every preset shares."""

from __future__ import annotations

import pytest

import chatstream.prompts as prompts
from chatstream.prompts import (
    AbstractChatPrompt,
    ChatPromptCyberAgentOpenCalm,
    ChatPromptDatabricksDolly,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptMosaicmlMptChat,
    ChatPromptOpenlmrOpenLlama,
    ChatPromptPlainUserAssistant,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptRinnaJpGptNeoxInstSft,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptStockmarkGptNeoxJp,
    ChatPromptTogetherRedPajamaINCITEChat,
    PromptTTL,
    load_openai_messages,
)

PRESETS: list[type[AbstractChatPrompt]] = [
    ChatPromptCyberAgentOpenCalm,
    ChatPromptDatabricksDolly,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptMosaicmlMptChat,
    ChatPromptOpenlmrOpenLlama,
    ChatPromptPlainUserAssistant,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptStockmarkGptNeoxJp,
    ChatPromptTogetherRedPajamaINCITEChat,
]

SEED_EXPORTED_NAMES = [
    "ChatPromptTogetherRedPajamaINCITEChat",
    "ChatPromptRinnaJpGptNeoxInstSft",
    "ChatPromptCyberAgentOpenCalm",
    "ChatPromptMetaLlamaLlama2Chat",
    "ChatPromptOpenlmrOpenLlama",
    "ChatPromptStabilityAiJpGptNeoxInstSft",
    "ChatPromptStockmarkGptNeoxJp",
    "ChatPromptLineCorpJpLargeLmInstSft",
    "ChatPromptMatsuoLabJpGptNeoxInstSft",
    "ChatPromptMosaicmlMptChat",
    "ChatPromptDatabricksDolly",
]

INSTRUCTION_JA = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"


def _ask(prompt: AbstractChatPrompt, question: str, **kwargs: object) -> str:
    prompt.add_requester_msg(question, **kwargs)  # type: ignore[arg-type]
    prompt.add_responder_msg(None)
    return prompt.create_prompt()


def test_seed_names_are_exported() -> None:
    for name in SEED_EXPORTED_NAMES:
        assert issubclass(getattr(prompts, name), AbstractChatPrompt), name
    assert ChatPromptRinnaJpGptNeoxInstSft is ChatPromptRinnaJapaneseGPTNeoxInst


def test_redpajama() -> None:
    prompt = ChatPromptTogetherRedPajamaINCITEChat()
    assert _ask(prompt, "Who is Alan Turing") == "<human>: Who is Alan Turing\n<bot>:"
    assert prompt._get_final_stop_strs() == ["<human>:", "<|endoftext|>", "\n<"]


def test_mpt_uses_the_human_bot_format() -> None:
    prompt = ChatPromptMosaicmlMptChat()
    assert _ask(prompt, "Who is Alan Turing") == "<human>: Who is Alan Turing\n<bot>:"
    assert prompt.get_final_stop_strs() == ["<human>:"]


def test_rinna() -> None:
    prompt = ChatPromptRinnaJapaneseGPTNeoxInst()
    assert _ask(prompt, "日本の首都は？\n短く") == "ユーザー: 日本の首都は？<NL>短く<NL>システム: "
    assert prompt.get_replacement_when_output() == [("<NL>", "\n")]
    prompt.set_responder_last_msg("東京です。\nはい")  # stored as streamed to the user, with a real newline
    assert _ask(prompt, "次は？").endswith("システム: 東京です。<NL>はい<NL>ユーザー: 次は？<NL>システム: ")


def test_linecorp_separates_turns() -> None:
    prompt = ChatPromptLineCorpJpLargeLmInstSft()
    assert (
        _ask(prompt, "四国の県名を全て列挙してください。") == "ユーザー: 四国の県名を全て列挙してください。\nシステム: "
    )
    prompt.set_responder_last_msg("高知県、徳島県、香川県、愛媛県")
    assert _ask(prompt, "次は？") == (
        "ユーザー: 四国の県名を全て列挙してください。\nシステム: 高知県、徳島県、香川県、愛媛県\n"
        "ユーザー: 次は？\nシステム: "
    )
    assert prompt.get_final_stop_strs() == ["ユーザー: "]


def test_llama2() -> None:
    prompt = ChatPromptMetaLlamaLlama2Chat()
    prompt.add_requester_msg("What spots do you recommend that I should go sightseeing in Tokyo?")
    prompt.add_responder_msg("I recommend Sensoji Temple and Tokyo Tower in Asakusa.")
    prompt.add_requester_msg("Are there any good restaurants nearby?")
    assert prompt.create_prompt().startswith("<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert prompt.create_prompt().endswith(
        "don't share false information.\n<</SYS>>\n\n"
        "What spots do you recommend that I should go sightseeing in Tokyo? [/INST] "
        "I recommend Sensoji Temple and Tokyo Tower in Asakusa. </s><s>[INST] "
        "Are there any good restaurants nearby? [/INST] "
    )
    assert prompt.get_custom_skip_echo_len(100) == 102


def test_open_llama() -> None:
    prompt = ChatPromptOpenlmrOpenLlama()
    prompt.add_requester_msg("What is the largest animal?")
    prompt.add_responder_msg("The largest animal is elephant.")
    assert prompt.create_prompt() == "Q: What is the largest animal?\nA: The largest animal is elephant.\n"
    assert prompt.get_final_stop_strs() == ["\nQ:", "\nB:", "\nC:"]


@pytest.mark.parametrize("cls", [ChatPromptCyberAgentOpenCalm, ChatPromptStockmarkGptNeoxJp])
def test_plain_continuation(cls: type[AbstractChatPrompt]) -> None:
    prompt = cls()
    assert _ask(prompt, "AIによって私達の暮らしは、") == "AIによって私達の暮らしは、"  # the seed crashed here
    prompt.set_responder_last_msg("豊かになった")
    assert prompt.create_prompt() == "AIによって私達の暮らしは、豊かになった"


def test_stabilityai_with_child_message() -> None:
    prompt = ChatPromptStabilityAiJpGptNeoxInstSft()
    rendered = _ask(
        prompt, "VR について、以下の比較対象との違いを箇条書きで教えてください。", child_message="比較対象: AR"
    )
    assert rendered == (
        f"{INSTRUCTION_JA}\n\n### 指示: \nVR について、以下の比較対象との違いを箇条書きで教えてください。\n\n"
        "### 入力: \n比較対象: AR\n\n### 応答: "
    )
    assert prompt.get_final_stop_strs() == ["### 指示: "]


def test_matsuolab_is_single_turn() -> None:
    prompt = ChatPromptMatsuoLabJpGptNeoxInstSft()
    assert prompt.prompt_ttl_mode is PromptTTL.SINGLE_TURN
    _ask(prompt, "古い質問")
    prompt.set_responder_last_msg("古い答え")
    expected = f"{INSTRUCTION_JA}\n\n### 指示: \n大規模言語モデルについて説明してください。\n\n### 応答: "
    assert _ask(prompt, "大規模言語モデルについて説明してください。") == expected
    assert prompt.get_final_stop_strs() == ["### 指示: ", "Q:"]


def test_dolly() -> None:
    prompt = ChatPromptDatabricksDolly()
    assert _ask(prompt, "Say hi.").endswith("request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert prompt.get_final_stop_strs() == ["### Instruction:\n"]


def test_plain_user_assistant() -> None:
    prompt = ChatPromptPlainUserAssistant()
    assert _ask(prompt, "Hi") == f"{prompt.system}\n\nUser: Hi\nAssistant:"
    prompt.set_responder_last_msg("Hello!")
    assert _ask(prompt, "Bye").endswith("User: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:")
    stops = prompt.get_final_stop_strs()
    assert "\nUser:" in stops and "<eos>" in stops and "<end_of_turn>" in stops
    load_openai_messages(prompt, [{"role": "system", "content": "Be terse.\n"}, {"role": "user", "content": "x"}])
    assert prompt.create_prompt() == "Be terse.\n\nUser: x\nAssistant:"


@pytest.mark.parametrize("cls", PRESETS, ids=lambda c: c.__name__)
def test_every_preset_round_trips_and_ends_with_a_slot(cls: type[AbstractChatPrompt]) -> None:
    prompt = cls()
    prompt.add_requester_msg("first")
    prompt.add_responder_msg("answer one")
    prompt.set_responder_last_msg_id("id-1")
    rendered = _ask(prompt, "second")
    restored = cls.from_dict(prompt.to_dict())
    assert restored.create_prompt() == rendered
    assert restored.get_final_stop_strs() == prompt.get_final_stop_strs()
    assert restored.find_chat_content_by_message_id("id-1") is restored.responder_messages[0]
    # the answer slot is the end of the prompt: filling it appends the answer right there
    restored.set_responder_last_msg("ANSWER")
    filled = restored.create_prompt()
    assert filled.startswith(rendered)
    assert filled.index("ANSWER") >= len(rendered)


@pytest.mark.parametrize("cls", PRESETS, ids=lambda c: c.__name__)
def test_every_preset_takes_openai_messages(cls: type[AbstractChatPrompt]) -> None:
    messages = [{"role": "system", "content": "SYSTEM-TEXT"}, {"role": "user", "content": "QUESTION"}]
    prompt = load_openai_messages(cls(), messages)
    rendered = prompt.create_prompt()
    assert "SYSTEM-TEXT" in rendered and "QUESTION" in rendered
    assert rendered.index("SYSTEM-TEXT") < rendered.index("QUESTION")
    prompt.set_chat_mode_enabled(False)
    assert prompt.create_prompt() == "QUESTION"
