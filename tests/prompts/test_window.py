"""Fitting prompts into the context: oldest whole turns dropped, the system prompt kept; the OpenAI limit error."""

from __future__ import annotations

import pytest

from chatstream.prompts.presets import ChatPromptPlainUserAssistant
from chatstream.prompts.window import ContextLengthExceeded, ContextWindow, fit_turns, surely_fits


def words(text: str) -> int:
    return len(text.split())


def conversation(num_turns: int) -> ChatPromptPlainUserAssistant:
    chat_prompt = ChatPromptPlainUserAssistant()
    chat_prompt.set_system("SYSTEM keep me\n")
    for turn in range(num_turns):
        chat_prompt.add_requester_msg(f"question{turn} " + "pad " * 20)
        chat_prompt.add_responder_msg(f"answer{turn} " + "pad " * 20)
    chat_prompt.add_requester_msg("latest question")
    chat_prompt.add_responder_msg(None)
    return chat_prompt


def test_a_prompt_that_fits_is_left_whole() -> None:
    chat_prompt = conversation(2)
    text, dropped = fit_turns(chat_prompt, words, 10_000)
    assert (text, dropped) == (chat_prompt.create_prompt(), 0)


def test_oldest_whole_turns_go_and_the_system_prompt_stays() -> None:
    chat_prompt = conversation(6)
    before = [c.get_message() for c in chat_prompt.chat_contents]
    budget = words(chat_prompt.create_prompt()) - 60  # about two turns too long
    text, dropped = fit_turns(chat_prompt, words, budget)
    assert words(text) <= budget
    assert text.startswith("SYSTEM keep me\n")
    assert dropped == 2 and "question0" not in text and "answer1" not in text
    assert "User: question2" in text and "latest question" in text
    assert text.endswith("Assistant:")
    assert [c.get_message() for c in chat_prompt.chat_contents] == before  # the history itself is unchanged


def test_the_latest_turn_always_stays() -> None:
    chat_prompt = conversation(3)
    text, dropped = fit_turns(chat_prompt, words, 3)
    assert dropped == 3 and text.startswith("SYSTEM keep me") and "question" not in text.replace("latest question", "")
    assert text.endswith("User: latest question\nAssistant:")


def test_short_prompts_are_not_tokenized() -> None:
    def refuse(text: str) -> int:
        raise AssertionError("counted")

    assert surely_fits("short text", 100)
    assert fit_turns(conversation(1), refuse, 10_000)[1] == 0


class CharTokenizer:
    """One token per character, plus a BOS when special tokens are added."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * (len(text) + (1 if add_special_tokens else 0))


def test_the_openai_check_lowers_max_tokens_or_refuses_as_vllm_does() -> None:
    window = ContextWindow(100, CharTokenizer())
    assert window.max_new_tokens_for("x" * 10, 50, True, None) == 50
    assert window.max_new_tokens_for("x" * 79, 50, False, None) == 20  # not asked for: lowered to what fits
    with pytest.raises(ContextLengthExceeded) as info:
        window.max_new_tokens_for("x" * 79, 50, True, None)
    assert str(info.value).startswith(
        "This model's maximum context length is 100 tokens. However, you requested 130 tokens "
        "(80 in the messages, 50 in the completion)."
    )
    with pytest.raises(ContextLengthExceeded, match="your request has 100 input tokens"):
        window.max_new_tokens_for("x" * 100, 8, False, False)
