"""A chat template with tool support in the Hermes format, for the tiny tokenizer, and tool definitions for tests."""

from __future__ import annotations

import json
from typing import Any

from tests.tiny_model import build_tokenizer
from transformers import PreTrainedTokenizerFast

HERMES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nYou may call these tools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Call one as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call></s>\n{% endif %}'
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}<|assistant|>\n"
    "{% for call in message['tool_calls'] %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}</s>\n"
    "{% elif message['role'] == 'tool' %}<|tool|>\n{{ message['content'] }}</s>\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}

TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


def hermes_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with :data:`HERMES_TEMPLATE` (a fresh one: the session's tokenizer stays as it is)."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer


def hermes_call(name: str, **arguments: Any) -> str:
    """A call as a Hermes model writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def open_webui_tools(count: int = 36) -> list[dict[str, Any]]:
    """Tools shaped like Open WebUI's built-in ones (memory, notes, knowledge, web search ...)."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"builtin_tool_{i}",
                "description": f"Built-in tool number {i}.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "What to look for."}},
                    "required": ["query"],
                },
            },
        }
        for i in range(count)
    ]
