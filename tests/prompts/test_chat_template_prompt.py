"""ChatTemplatePrompt on the tiny test tokenizer's chat template."""

from __future__ import annotations

import copy

import pytest
from transformers import PreTrainedTokenizerFast

from chatstream.prompts import ChatPromptPlainUserAssistant, ChatTemplatePrompt, load_openai_messages

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Who are you?"},
]


def test_renders_like_apply_chat_template(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = ChatTemplatePrompt(tiny_tokenizer)
    prompt.set_system("Be brief.")
    prompt.add_requester_msg("Hi")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    prompt.set_responder_last_msg("Hello.")
    prompt.add_requester_msg("Who are you?")
    prompt.add_responder_msg(None)
    expected = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.create_prompt() == expected
    assert prompt.get_final_stop_strs() == []
    assert prompt.encode_add_special_tokens is False


def test_complete_answer_gets_no_generation_prompt(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = load_openai_messages(ChatTemplatePrompt(tiny_tokenizer), MESSAGES[:3])
    assert prompt.create_prompt().endswith("<|assistant|>\nHello.</s>\n")
    assert prompt.create_prompt({"omit_last_message": True}).endswith("<|user|>\nHi</s>\n<|assistant|>\n")


def test_openai_messages_add_the_slot(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = load_openai_messages(ChatTemplatePrompt(tiny_tokenizer), MESSAGES)
    assert prompt.get_turn() == 2 and prompt.system == "Be brief."
    assert prompt.create_prompt() == tiny_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_survives_to_dict_from_dict(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = load_openai_messages(ChatTemplatePrompt(tiny_tokenizer), MESSAGES)
    data = prompt.to_dict()
    assert "tokenizer" not in data
    restored = ChatTemplatePrompt.from_dict(data)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        restored.create_prompt()
    restored.set_tokenizer(tiny_tokenizer)
    assert restored.create_prompt() == prompt.create_prompt()
    assert ChatTemplatePrompt.from_dict(data, tokenizer=tiny_tokenizer).create_prompt() == prompt.create_prompt()


def test_tokenizer_without_template_is_rejected(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    prompt = load_openai_messages(ChatTemplatePrompt(tokenizer), MESSAGES[1:2])
    with pytest.raises(ValueError, match="ChatPromptPlainUserAssistant"):
        prompt.create_prompt()
    plain = ChatPromptPlainUserAssistant()
    plain.set_tokenizer(tokenizer)
    assert load_openai_messages(plain, MESSAGES[1:2]).create_prompt().endswith("Assistant:")


def test_template_without_system_role_gets_it_in_the_first_user_turn(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    prompt = load_openai_messages(ChatTemplatePrompt(tokenizer), MESSAGES)
    assert prompt.create_prompt() == "[user]Be brief.\n\nHi\n[assistant]Hello.\n[user]Who are you?\n[assistant]"


def test_child_messages_are_appended_to_the_user_turn(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = ChatTemplatePrompt(tiny_tokenizer)
    prompt.add_requester_msg("Summarise:", child_message="some text")
    prompt.add_responder_msg(None)
    assert "<|user|>\nSummarise:\n\nsome text</s>" in prompt.create_prompt()
