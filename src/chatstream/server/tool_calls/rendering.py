"""Tools in the prompt: does a chat template support them, which call format does the model write, what a request's
``tools`` / ``tool_choice`` mean for this model (:func:`plan_tools`), and rendering a history that holds assistant
``tool_calls`` and ``tool`` results (:func:`render_chat`)."""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatstream.server.tool_calls.base import ToolFormat
from chatstream.server.tool_calls.formats import get_format

logger = logging.getLogger(__name__)

__all__ = [
    "TOOLS_IGNORED_HEADER",
    "ToolChoice",
    "ToolPlan",
    "detect_format",
    "fold_tool_traffic",
    "marker_token_ids",
    "plan_tools",
    "render_chat",
    "supports_tools",
]

TOOLS_IGNORED_HEADER = "X-ChatStream-Tools-Ignored"
"""Response header set (to the reason) when a request's tools were not given to the model."""

_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("start_function_call", "functiongemma"),
    ("<|python_tag|>", "llama3_json"),
    ('"parameters": dictionary of argument name', "llama3_json"),
)
"""Texts in a chat template that name the call format its model was trained on (first match wins)."""

_MODEL_TYPES = {
    "qwen2": "hermes",
    "qwen3": "hermes",
    "qwen2_moe": "hermes",
    "mistral": "mistral",
    "llama": "llama3_json",
}
"""The format of a model type, for templates that render tools without naming a marker."""


def supports_tools(chat_template: str | None) -> bool:
    """True when the template reads the ``tools`` variable (so ``apply_chat_template(tools=...)`` shows them)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template or "") is not None


def detect_format(chat_template: str | None, model_type: str | None = None) -> ToolFormat | None:
    """The call format of a model: from markers in its template, else from its model type; None without tools."""
    if not supports_tools(chat_template):
        return None
    for marker, name in _TEMPLATE_MARKERS:
        if marker in (chat_template or ""):
            return get_format(name)
    by_type = _MODEL_TYPES.get(model_type or "")
    return get_format(by_type) if by_type else None


class ToolChoice(enum.Enum):
    """OpenAI's ``tool_choice``; a named function is REQUIRED with :attr:`ToolPlan.forced_name`."""

    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"


@dataclass(frozen=True)
class ToolPlan:
    """What to do with a request's tools on this model.

    ``tools`` go to the chat template (empty: none rendered); ``format`` parses the output (None: plain text);
    ``grammar`` (Lark) constrains decoding to calls; ``ignored`` is the reason the tools were dropped, for the
    response header and the debug log.
    """

    tools: tuple[dict[str, Any], ...] = ()
    choice: ToolChoice = ToolChoice.AUTO
    format: ToolFormat | None = None
    grammar: str | None = None
    forced_name: str | None = None
    ignored: str | None = None


def plan_tools(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    fmt: ToolFormat | None,
    special_ids: Mapping[str, int] | None = None,
    *,
    parallel: bool = True,
) -> ToolPlan:
    """The plan for ``tools`` / ``tool_choice`` on a model whose call format is ``fmt`` (None: no tool support); a
    forced choice admits one call only unless ``parallel`` (OpenAI's ``parallel_tool_calls``).

    Raises ValueError naming ``tools`` or ``tool_choice`` (a 400): a malformed tool or choice, a named function not
    in ``tools``, or "required"/named on a model that cannot call tools or whose format cannot be enforced.
    """
    checked = tuple(_check_tool(tool, index) for index, tool in enumerate(tools or ()))
    choice, forced = _parse_choice(tool_choice, bool(checked))
    if not checked or choice is ToolChoice.NONE:
        return ToolPlan(choice=choice)
    names = [tool["function"]["name"] for tool in checked]
    if forced is not None and forced not in names:
        raise ValueError(f"tool_choice names the function {forced!r}, which is not in tools")
    if fmt is None:
        if choice is ToolChoice.REQUIRED:
            raise ValueError("tool_choice: this model's chat template has no tool support; use 'auto' or 'none'")
        logger.debug("ignoring %d tools: the chat template has no tool support", len(checked))
        return ToolPlan(choice=choice, ignored="the model's chat template has no tool support")
    grammar = None
    if choice is ToolChoice.REQUIRED:
        allowed = [tool for tool in checked if forced is None or tool["function"]["name"] == forced]
        grammar = fmt.call_grammar(allowed, dict(special_ids or {}), parallel=parallel)
        if grammar is None:
            raise ValueError(f"tool_choice: calls can not be forced in the {fmt.name!r} format of this model")
    return ToolPlan(checked, choice, fmt, grammar, forced)


def _check_tool(tool: Any, index: int) -> dict[str, Any]:
    field = f"tools[{index}]"
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise ValueError(f"{field} must be an object with type 'function'")
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{field}.function.name is required")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ValueError(f"{field}.function.parameters must be a JSON schema object")
    return {"type": "function", "function": dict(function)}


def _parse_choice(value: Any, has_tools: bool) -> tuple[ToolChoice, str | None]:
    if value is None:
        return (ToolChoice.AUTO if has_tools else ToolChoice.NONE), None
    if isinstance(value, str):
        try:
            choice = ToolChoice(value)
        except ValueError:
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {value!r}") from None
        if choice is not ToolChoice.NONE and not has_tools:
            raise ValueError(f"tool_choice {value!r} needs tools")
        return choice, None
    function = value.get("function") if isinstance(value, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError("tool_choice must be a string or {'type': 'function', 'function': {'name': ...}}")
    if not has_tools:
        raise ValueError("tool_choice names a function but the request has no tools")
    return ToolChoice.REQUIRED, function["name"]


def render_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], plan: ToolPlan, *, add_generation_prompt: bool = True
) -> str:
    """The prompt text for OpenAI-style ``messages`` through the tokenizer's chat template, with the plan's tools.

    Assistant ``tool_calls`` get their ``arguments`` as objects (what templates iterate over) and ``tool`` messages
    keep ``tool_call_id``/``name``. A template without tool support gets the tool traffic folded into plain turns:
    calls as JSON text in the assistant's turn, results as user turns.
    """
    supported = supports_tools(getattr(tokenizer, "chat_template", None))
    normalised = [_normalise(message, supported) for message in messages]
    if not supported:
        normalised = _merge_same_roles(normalised)
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if plan.tools and supported:
        kwargs["tools"] = list(plan.tools)
    text = tokenizer.apply_chat_template(normalised, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def fold_tool_traffic(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain ``system``/``user``/``assistant`` messages for a prompt format without tools: assistant calls become
    JSON text in the assistant's turn, ``tool`` results user turns (``[name result]`` and the text)."""
    return _merge_same_roles([_normalise(message, False) for message in messages])


def _normalise(message: Mapping[str, Any], supported: bool) -> dict[str, Any]:
    role = message.get("role")
    out: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
    calls = [_template_call(call) for call in message.get("tool_calls") or ()]
    if role == "tool" and not supported:
        name = message.get("name") or message.get("tool_call_id") or "tool"
        return {"role": "user", "content": f"[{name} result]\n{out['content']}"}
    if calls and not supported:
        listed = json.dumps([c["function"] for c in calls], ensure_ascii=False)
        out["content"] = "\n".join(part for part in (out["content"], listed) if part)
        return out
    if calls:
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            pass  # templates that print arguments as text still get the text
    return {"id": call.get("id"), "type": "function", "function": function}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return "" if content is None else str(content)


def _merge_same_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive turns of one role (folded tool results), which strict templates would reject."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"] = f"{merged[-1]['content']}\n\n{message['content']}"
        else:
            merged.append(dict(message))
    return merged


def marker_token_ids(tokenizer: Any, fmt: ToolFormat) -> dict[str, int]:
    """The format's markers that the tokenizer has as single added tokens (grammars then name them by id)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    markers = (*fmt.start_markers, *((fmt.end_marker,) if fmt.end_marker else ()))
    return {marker: int(added[marker]) for marker in markers if marker in added}
