"""Tool calls: each family's parser on hand-written outputs (whole and streamed at every split), the registry and
detection, the request plan for tools / tool_choice, rendering, and a forced call decoded under its grammar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatstream.server.tool_calls import (
    FORMATS,
    ParsedOutput,
    ToolCallStream,
    ToolFormat,
    detect_format,
    get_format,
    register_format,
    supports_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
NAMES = ("get_weather", "get_time")

# (format, output, expected content, expected calls as (name, arguments object))
CASES: list[tuple[str, str, str | None, list[tuple[str, dict[str, Any]]]]] = [
    ("hermes", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
     "Sure.", [("get_weather", {"city": "Paris", "days": 2})]),
    ("hermes", '<tool_call>{"name":"get_time","arguments":"{}"}</tool_call>\n<tool_call>{"name":"get_weather",'
     '"arguments":{"city":"Oslo","days":1}}</tool_call>', None,
     [("get_time", {}), ("get_weather", {"city": "Oslo", "days": 1})]),
    ("hermes", "<tool_call>{not json}</tool_call> then text", "<tool_call>{not json}</tool_call> then text", []),
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ("hermes", "a < b and <tool_ca", "a < b and <tool_ca", []),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    ("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}', None,
     [("get_weather", {"city": "Rome", "days": 3})]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_time", "parameters": {}}',
     None, [("get_time", {}), ("get_time", {})]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", 'The call is {"name": "get_time", "parameters": {}}',
     'The call is {"name": "get_time", "parameters": {}}', []),
    ("mistral", 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice", "days": 1}}, '
     '{"name": "get_time", "arguments": {}}]', "Let me check.",
     [("get_weather", {"city": "Nice", "days": 1}), ("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{"city": "Bern", "days": 4}', None,
     [("get_time", {}), ("get_weather", {"city": "Bern", "days": 4})]),
    ("mistral", "[TOOL_CALLS][oops", "[TOOL_CALLS][oops", []),
    ("functiongemma", "<start_function_call>call:get_weather{city:<escape>Paris, {France}<escape>,days:2}"
     "<end_function_call>", None, [("get_weather", {"city": "Paris, {France}", "days": 2})]),
    ("functiongemma", "ok <start_function_call>call:get_time{}<end_function_call> done", "ok  done",
     [("get_time", {})]),
    ("functiongemma", "<start_function_call>call:get_time{x}<end_function_call>",
     "<start_function_call>call:get_time{x}<end_function_call>", []),
    ("pythonic", '[get_weather(city="Lima", days=5), get_time()]', None,
     [("get_weather", {"city": "Lima", "days": 5}), ("get_time", {})]),
    ("pythonic", "[get_weather('Lima')]", "[get_weather('Lima')]", []),
    ("pythonic", "[1] is a citation", "[1] is a citation", []),
]  # fmt: skip


def calls_of(parsed: ParsedOutput) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls]


@pytest.mark.parametrize(("name", "output", "content", "calls"), CASES)
def test_parse_complete_output(name: str, output: str, content: str | None, calls: list[Any]) -> None:
    parsed = get_format(name).parse(output, NAMES)
    assert parsed.content == content
    assert calls_of(parsed) == calls
    assert parsed.finish_reason == ("tool_calls" if calls else "stop")
    assert all(call.id.startswith("call_") and len(call.id) == 29 for call in parsed.tool_calls)


def stream_pieces(fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    stream = ToolCallStream(fmt, NAMES)
    content, deltas = "", []
    for piece in [*pieces, None]:
        delta = stream.feed(piece) if piece is not None else stream.finish()
        content += delta.content
        deltas.extend(d.to_openai() for d in delta.tool_calls)
    return content, deltas


def accumulate(deltas: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """What an OpenAI client rebuilds from the pieces (by index: id and name once, arguments concatenated)."""
    calls: dict[int, dict[str, str]] = {}
    for piece in deltas:
        call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
        call["name"] += piece["function"].get("name", "")
        call["arguments"] += piece["function"]["arguments"]
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


@pytest.mark.parametrize(("name", "output", "content", "calls"), CASES)
def test_stream_split_anywhere_gives_the_same_answer(
    name: str, output: str, content: str | None, calls: list[Any]
) -> None:
    fmt = get_format(name)
    splits = [[output[:i], output[i:j], output[j:]] for i in range(len(output)) for j in (i + 1, i + 7)]
    for pieces in [list(output), *splits]:
        streamed, deltas = stream_pieces(fmt, pieces)
        assert (streamed or None) == content, pieces
        assert accumulate(deltas) == calls, pieces


def test_marker_text_is_held_back_until_decided() -> None:
    stream = ToolCallStream(get_format("hermes"))
    assert stream.feed("Hello <tool").content == "Hello "
    assert stream.feed("box>").content == "<toolbox>"
    delta = stream.feed('<tool_call>{"name": "f", "arguments": {}}</tool_')
    assert delta.content == "" and not delta.tool_calls
    delta = stream.feed("call>")
    assert [d.to_openai() for d in delta.tool_calls] == [
        {"index": 0, "id": stream.calls[0].id, "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}},
    ]


def test_whole_output_formats_hold_leading_whitespace_then_release_text() -> None:
    stream = ToolCallStream(get_format("llama3_json"))
    assert stream.feed("  ").content == ""
    assert stream.feed("<|py").content == ""
    assert stream.feed("rate").content == "  <|pyrate"
    assert stream.feed(" {").content == " {"


def test_call_to_openai_shape() -> None:
    call = get_format("hermes").parse('<tool_call>{"name": "f", "arguments": {"a": "é"}}</tool_call>').tool_calls[0]
    assert call.to_openai() == {"id": call.id, "type": "function", "function": {"name": "f", "arguments": '{"a":"é"}'}}


# ---- registry and detection -------------------------------------------------------------------------------------


def test_registry_names_the_families_and_takes_new_ones() -> None:
    assert {"hermes", "llama3_json", "mistral", "functiongemma", "pythonic"} <= set(FORMATS)
    with pytest.raises(ValueError, match="unknown tool-call format 'nope'; known: "):
        get_format("nope")

    class Bracketed(ToolFormat):
        name = "test_bracketed"
        start_markers = ("<<",)
        end_marker = ">>"

        def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
            return [(block[2:-2], {})]

    try:
        register_format(Bracketed())
        assert calls_of(get_format("test_bracketed").parse("x<<ping>>")) == [("ping", {})]
    finally:
        FORMATS.pop("test_bracketed")


GEMMA_TEMPLATE = (Path(__file__).parents[2] / "bench" / "gemma_chat_template.jinja").read_text(encoding="utf-8")
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "Call with <tool_call>{...}</tool_call></s>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "model_type", "expected"),
    [
        (HERMES_TEMPLATE, None, "hermes"),
        ("{{ tools }}[TOOL_CALLS]", "mistral", "mistral"),
        ("{% if tools %}<|python_tag|>{% endif %}", None, "llama3_json"),
        ("{{ tools }} <start_function_call>", "gemma3_text", "functiongemma"),
        ("{% for t in tools %}{{ t }}{% endfor %}", "qwen2", "hermes"),
        ("{% for t in tools %}{{ t }}{% endfor %}", "unknown", None),
        (GEMMA_TEMPLATE, "gemma3_text", None),
        (None, "qwen2", None),
    ],
)
def test_detect_format(template: str | None, model_type: str | None, expected: str | None) -> None:
    fmt = detect_format(template, model_type)
    assert (fmt.name if fmt else None) == expected


def test_gemma3_template_has_no_tool_support() -> None:
    assert not supports_tools(GEMMA_TEMPLATE)
