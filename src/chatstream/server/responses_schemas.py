"""The body of POST /v1/responses, and its translation into what the chat machinery takes: chat-style messages from
``input`` items, chat-style tools and ``tool_choice``, the grammar of ``text.format``, the sampling.

Everything here raises :class:`~chatstream.server.errors.BadRequest` naming the field (``input[2].type``,
``tools[0].type``, ``text.format.schema`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from chatstream.config import SamplingParams
from chatstream.engine.grammar import GrammarSpec
from chatstream.server.errors import BadRequest

ChatMessage = dict[str, Any]
"""A message as /v1/chat/completions takes it (``role``, ``content``, ``tool_calls``, ``tool_call_id``)."""

_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Unknown fields are ignored; fields we cannot honour are refused by :meth:`check`."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(default="")
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = True
    stream: bool | None = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    def check(self) -> None:
        """BadRequest for what this server does not do."""
        if self.background:
            raise BadRequest("'background' responses are not supported", param="background")
        if self.conversation is not None:
            raise BadRequest("'conversation' is not supported: use previous_response_id", param="conversation")
        if self.prompt is not None:
            raise BadRequest("'prompt' (stored prompt templates) is not supported", param="prompt")
        if self.truncation not in (None, "auto", "disabled"):
            raise BadRequest("'truncation' must be 'auto' or 'disabled'", param="truncation")
        if self.input == "" and self.previous_response_id is None:
            raise BadRequest("'input' is required", param="input")

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """``defaults`` with this request's temperature, top_p and max_output_tokens."""
        changes: dict[str, Any] = {}
        if self.max_output_tokens is not None:
            changes["max_new_tokens"] = self.max_output_tokens
        if self.temperature is not None:
            changes["temperature"] = self.temperature
        if self.top_p is not None:
            changes["top_p"] = self.top_p
        return defaults.with_updates(**changes)

    @property
    def stores(self) -> bool:
        return self.store is not False


# ----- input -----


def input_messages(value: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """``input`` as chat messages: a string is one user message; items are messages (text parts only),
    ``function_call`` (a call the model made: an assistant message with ``tool_calls``) and
    ``function_call_output`` (a ``tool`` message)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value else []
    messages: list[ChatMessage] = []
    for index, item in enumerate(value):
        message = _input_item(item, f"input[{index}]")
        previous = messages[-1] if messages else None
        if message.get("tool_calls") and previous is not None and previous.get("tool_calls"):
            previous["tool_calls"] += message["tool_calls"]  # consecutive calls: one assistant turn
        else:
            messages.append(message)
    return messages


def _input_item(item: Mapping[str, Any], field: str) -> ChatMessage:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _MESSAGE_ROLES:
            raise BadRequest(f"{field}.role must be one of {', '.join(_MESSAGE_ROLES)}", param=f"{field}.role")
        return {"role": role, "content": _item_text(item.get("content"), f"{field}.content")}
    if kind == "function_call":
        call_id, name, arguments = (_string(item, key, field) for key in ("call_id", "name", "arguments"))
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _item_text(output, f"{field}.output")
        return {"role": "tool", "tool_call_id": _string(item, "call_id", field), "content": text}
    raise BadRequest(
        f"{field}.type {kind!r} is not supported (messages, function_call, function_call_output)", param=f"{field}.type"
    )


def _item_text(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{field} must be a string or a list of text parts", param=field)
    texts = []
    for index, part in enumerate(content):
        if (
            not isinstance(part, Mapping)
            or part.get("type") not in _TEXT_PARTS
            or not isinstance(part.get("text"), str)
        ):
            raise BadRequest(
                f"{field}[{index}] must be a text part (input_text, output_text)", param=f"{field}[{index}]"
            )
        texts.append(part["text"])
    return "".join(texts)


def _string(item: Mapping[str, Any], key: str, field: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{field}.{key} must be a string", param=f"{field}.{key}")
    return value


# ----- tools, tool_choice, text.format -----


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses tools (``{"type": "function", "name", "description", "parameters", "strict"}``) in the chat shape;
    built-in tools (web search, file search ...) are refused."""
    if tools is None:
        return None
    out = []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise BadRequest(
                f"tools[{index}].type {tool.get('type')!r} is not supported: only 'function' tools",
                param=f"tools[{index}].type",
            )
        function = {key: tool[key] for key in ("name", "description", "parameters") if key in tool}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(value: Any) -> Any:
    """``tool_choice`` in the chat shape (``{"type": "function", "name"}`` becomes ``{"function": {"name"}}``)."""
    if isinstance(value, Mapping) and value.get("type") == "function" and "name" in value:
        return {"type": "function", "function": {"name": value["name"]}}
    return value


def text_format_grammar(text: Mapping[str, Any] | None) -> GrammarSpec | None:
    """The grammar of ``text.format``: None for text, any object for ``json_object``, the schema for
    ``json_schema`` (``{"type": "json_schema", "name", "schema", "strict"}``)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object("text.format")
    if kind == "json_schema" and isinstance(fmt, Mapping):
        if "schema" not in fmt:
            raise BadRequest("text.format.schema is required", param="text.format.schema")
        try:
            return GrammarSpec.json_schema(fmt["schema"], "text.format.schema")
        except ValueError as exc:
            raise BadRequest(str(exc), param="text.format.schema") from None
    raise BadRequest("text.format.type must be 'text', 'json_object' or 'json_schema'", param="text.format.type")
