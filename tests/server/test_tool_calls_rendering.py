"""The request side of tool calling: the plan for tools / tool_choice, rendering a history with tool traffic, and a
call forced by its grammar on the tiny random model's tokenizer."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
from tests.server.test_tool_calls import HERMES_TEMPLATE, TIME, WEATHER
from tests.tiny_model import build_tokenizer
from transformers import PreTrainedTokenizerFast

from chatstream.engine.structured import GrammarCompiler, GrammarSpec, apply_masks
from chatstream.server.tool_calls import (
    ToolChoice,
    ToolPlan,
    get_format,
    marker_token_ids,
    plan_tools,
    render_chat,
)

OPEN_WEBUI_TOOLS = [
    {"type": "function", "function": {"name": f"tool_{i}", "parameters": {"type": "object", "properties": {}}}}
    for i in range(36)
]

HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"},
]


# ---- plan --------------------------------------------------------------------------------------------------------


def test_open_webui_default_chat_on_a_model_without_tools_is_plain_text() -> None:
    plan = plan_tools(OPEN_WEBUI_TOOLS, None, None)
    assert plan == ToolPlan(choice=ToolChoice.AUTO, ignored="the model's chat template has no tool support")
    assert plan_tools(OPEN_WEBUI_TOOLS, "none", None).ignored is None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "tool_3"}}])
def test_forced_tools_on_a_model_without_tools_is_refused(choice: Any) -> None:
    with pytest.raises(ValueError, match=r"^tool_choice: .*no tool support"):
        plan_tools(OPEN_WEBUI_TOOLS, choice, None)


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([WEATHER], "sometimes", "tool_choice must be"),
        ([WEATHER], {"type": "function"}, "tool_choice must be"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not in tools"),
        (None, "required", "needs tools"),
        ([{"type": "retrieval"}], None, r"tools\[0\] must be an object with type 'function'"),
        ([{"type": "function", "function": {}}], None, r"tools\[0\]\.function\.name is required"),
        ([{"function": {"name": "f", "parameters": []}}], None, r"tools\[0\]\.function\.parameters"),
    ],
)
def test_bad_tools_or_choice_name_the_field(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_tools(tools, choice, get_format("hermes"))


def test_auto_on_a_tool_model_renders_and_parses_without_a_grammar() -> None:
    plan = plan_tools([WEATHER, TIME], None, get_format("hermes"))
    assert plan.choice is ToolChoice.AUTO and plan.format is get_format("hermes")
    assert [t["function"]["name"] for t in plan.tools] == ["get_weather", "get_time"] and plan.grammar is None
    assert plan_tools([WEATHER], "none", get_format("hermes")) == ToolPlan(choice=ToolChoice.NONE)


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_forced_choices_get_a_grammar(fmt: str) -> None:
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, get_format(fmt))
    assert named.forced_name == "get_time" and named.grammar and "get_weather" not in named.grammar
    required = plan_tools([WEATHER, TIME], "required", get_format(fmt))
    assert required.grammar and "get_weather" in required.grammar and "get_time" in required.grammar


@pytest.mark.parametrize("fmt", ["functiongemma", "pythonic"])
def test_formats_without_a_grammar_refuse_forced_choices(fmt: str) -> None:
    with pytest.raises(ValueError, match=f"^tool_choice: calls can not be forced in the '{fmt}' format"):
        plan_tools([WEATHER], "required", get_format(fmt))


# ---- rendering ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tool_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer (the session one stays untouched) with a Hermes-style template that renders tools."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer


def test_render_with_tools_and_tool_traffic(tool_tokenizer: Any) -> None:
    plan = plan_tools([WEATHER], None, get_format("hermes"))
    text = render_chat(tool_tokenizer, HISTORY, plan)
    assert json.dumps(WEATHER) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>' in text
    assert "<|tool|>\nsunny, 21 C</s>" in text and text.endswith("<|assistant|>\n")


def test_render_without_tool_support_folds_the_traffic(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    plan = plan_tools([WEATHER], None, None)
    text = render_chat(tiny_tokenizer, [*HISTORY, {"role": "user", "content": "Thanks"}], plan)
    assert "get_weather" in text and '"description"' not in text  # the call is text, the tools are not shown
    assert "<|user|>\n[get_weather result]\nsunny, 21 C\n\nThanks</s>" in text


def test_marker_token_ids_finds_added_tokens(tool_tokenizer: Any) -> None:
    assert marker_token_ids(tool_tokenizer, get_format("hermes")) == {}
    tool_tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    ids = marker_token_ids(tool_tokenizer, get_format("hermes"))
    assert set(ids) == {"<tool_call>", "</tool_call>"} and all(i >= 512 for i in ids.values())


# ---- a forced call under its grammar -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_forced_call_decoded_at_random_parses_into_a_valid_call(
    tiny_tokenizer: PreTrainedTokenizerFast, fmt: str
) -> None:
    plan = plan_tools([WEATHER, TIME], "required", get_format(fmt))
    assert plan.grammar is not None
    compiler = GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), [tiny_tokenizer.eos_token_id])
    generator = torch.Generator().manual_seed(7)
    for _ in range(5):
        matcher = compiler.matcher(GrammarSpec.lark(plan.grammar))
        tokens: list[int] = []
        while not tokens or tokens[-1] != tiny_tokenizer.eos_token_id:
            logits = torch.randn(1, len(tiny_tokenizer), generator=generator) * 3  # [1, V]
            apply_masks(logits, [matcher])
            tokens.append(int(torch.multinomial(logits.softmax(-1), 1, generator=generator)))
            assert matcher.accept(tokens[-1]), matcher.error
            assert len(tokens) < 1000
        parsed = get_format(fmt).parse(tiny_tokenizer.decode(tokens[:-1]), ["get_weather", "get_time"])
        assert parsed.content is None and parsed.tool_calls, tiny_tokenizer.decode(tokens)
        for call in parsed.tool_calls:
            schema = (WEATHER if call.name == "get_weather" else TIME)["function"]["parameters"]  # type: ignore[index]
            jsonschema.validate(json.loads(call.arguments), schema)
