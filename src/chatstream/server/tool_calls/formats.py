"""The tool-call formats of the model families we know, and the registry that names them.

- ``hermes``: Hermes, Qwen 2.5/3 and their tunes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, text allowed around the blocks.
- ``llama3_json``: Llama 3.1-3.3 with JSON tool calling: the whole answer is ``{"name": ..., "parameters": {...}}``
  (optionally after ``<|python_tag|>``; several calls separated by ``;``).
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` and the newer
  ``[TOOL_CALLS]name[ARGS]{...}`` (one marker per call); everything after the first marker is calls.
- ``functiongemma``: FunctionGemma (Gemma-3-270M tuned for calls):
  ``<start_function_call>call:name{key:<escape>text<escape>,n:3}<end_function_call>``.
- ``pythonic``: Gemma 3 prompted for calls (Google's documented prompt; Gemma 3's own chat template has no tool
  support), Llama 4: the whole answer is ``[name(key="text", n=3), other()]``.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

from chatstream.server.tool_calls.base import ToolFormat

__all__ = ["FORMATS", "get_format", "register_format"]


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function", tool)
    return function if isinstance(function, dict) else {}


def _call_schema(tools: Sequence[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """A JSON schema admitting ``{"name": <one of tools>, <arguments_key>: <its parameters>}``."""
    options = []
    for tool in tools:
        function = _function(tool)
        parameters = function.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.get("name")}, arguments_key: parameters},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # compact JSON, as for response_format: no free whitespace for a model to loop in
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _literal(text: str, special_ids: dict[str, int]) -> str:
    """A Lark item for a marker: the special token by id when the tokenizer has it as one, else the text."""
    return f"<[{special_ids[text]}]>" if text in special_ids else json.dumps(text)


class HermesFormat(ToolFormat):
    """``<tool_call>{json}</tool_call>`` blocks (Hermes, Qwen)."""

    name = "hermes"
    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"

    def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
        inner = block.removeprefix("<tool_call>").removesuffix("</tool_call>")
        call = json.loads(inner)
        return [(call["name"], call.get("arguments", call.get("parameters", {})))]

    def call_grammar(
        self, tools: Sequence[dict[str, Any]], special_ids: dict[str, int], *, parallel: bool = True
    ) -> str | None:
        schema = json.dumps(_call_schema(tools, "arguments"))
        start, end = _literal("<tool_call>", special_ids), _literal("</tool_call>", special_ids)
        calls = 'call ("\\n" call)*' if parallel else "call"
        return f'start: {calls}\ncall: {start} "\\n" %json{schema} "\\n" {end}\n'


class Llama3JsonFormat(ToolFormat):
    """The whole answer is JSON calls (Llama 3.1-3.3 JSON tool calling)."""

    name = "llama3_json"
    start_markers = ("{", "<|python_tag|>")
    whole_output = True

    def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
        text = block.removeprefix("<|python_tag|>").strip()
        decoder, calls, position = json.JSONDecoder(), [], 0
        while position < len(text):
            call, position = decoder.raw_decode(text, position)
            calls.append((call["name"], call["parameters"] if "parameters" in call else call["arguments"]))
            position = len(text) - len(text[position:].lstrip().removeprefix(";").lstrip())
        return calls

    def call_grammar(
        self, tools: Sequence[dict[str, Any]], special_ids: dict[str, int], *, parallel: bool = True
    ) -> str | None:
        return f"start: %json{json.dumps(_call_schema(tools, 'parameters'))}\n"


class MistralFormat(ToolFormat):
    """``[TOOL_CALLS]`` and then a JSON list of calls, or ``name[ARGS]{json}`` per marker (Mistral)."""

    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)

    def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
        calls: list[tuple[str, Any]] = []
        for segment in block.split("[TOOL_CALLS]")[1:]:
            segment = segment.strip()
            if "[ARGS]" in segment and not segment.startswith(("[", "{")):
                name, arguments = segment.split("[ARGS]", 1)
                calls.append((name.split("[CALL_ID]")[0].strip(), json.loads(arguments)))
                continue
            items = json.loads(segment)
            for item in items if isinstance(items, list) else [items]:
                calls.append((item["name"], item.get("arguments", item.get("parameters", {}))))
        return calls

    def call_grammar(
        self, tools: Sequence[dict[str, Any]], special_ids: dict[str, int], *, parallel: bool = True
    ) -> str | None:
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": _call_schema(tools, "arguments")}
        if not parallel:
            schema["maxItems"] = 1
        return f"start: {_literal('[TOOL_CALLS]', special_ids)} %json{json.dumps(schema)}\n"


class FunctionGemmaFormat(ToolFormat):
    """``<start_function_call>call:name{key:<escape>text<escape>,...}<end_function_call>`` (FunctionGemma)."""

    name = "functiongemma"
    start_markers = ("<start_function_call>",)
    end_marker = "<end_function_call>"
    _CALL = re.compile(r"call:([\w.\-]+)(\{.*\})", re.DOTALL)

    def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
        inner = block.removeprefix("<start_function_call>").removesuffix("<end_function_call>").strip()
        match = self._CALL.fullmatch(inner)
        if match is None:
            return None
        value, rest = _EscapedReader(match.group(2)).read_value(0)
        return [(match.group(1), value)] if rest == len(match.group(2)) else None


class _EscapedReader:
    """FunctionGemma's argument syntax: ``{key:value,...}``, ``[value,...]``, ``<escape>text<escape>`` strings,
    and bare numbers, ``true``, ``false``, ``null``."""

    ESCAPE = "<escape>"
    _BARE = re.compile(r"[^,}\]]*")

    def __init__(self, text: str) -> None:
        self.text = text

    def read_value(self, position: int) -> tuple[Any, int]:
        text = self.text
        if text.startswith(self.ESCAPE, position):
            end = text.index(self.ESCAPE, position + len(self.ESCAPE))
            return text[position + len(self.ESCAPE) : end], end + len(self.ESCAPE)
        if text.startswith("{", position):
            return self._read_items(position + 1, "}", keyed=True)
        if text.startswith("[", position):
            return self._read_items(position + 1, "]", keyed=False)
        match = self._BARE.match(text, position)
        assert match is not None  # the pattern matches the empty string
        return json.loads(match.group(0).strip()), match.end()

    def _read_items(self, position: int, close: str, *, keyed: bool) -> tuple[Any, int]:
        items: list[Any] = []
        pairs: dict[str, Any] = {}
        while not self.text.startswith(close, position):
            if keyed:
                colon = self.text.index(":", position)
                key, position = self.text[position:colon].strip(), colon + 1
            value, position = self.read_value(position)
            if keyed:
                pairs[key] = value
            else:
                items.append(value)
            if self.text.startswith(",", position):
                position += 1
            elif not self.text.startswith(close, position):
                raise ValueError(f"expected ',' or {close!r} at {position}")
        return (pairs if keyed else items), position + 1


class PythonicFormat(ToolFormat):
    """The whole answer is a Python list of calls with keyword arguments (Gemma 3 prompted, Llama 4)."""

    name = "pythonic"
    start_markers = ("[",)
    whole_output = True

    def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
        tree = ast.parse(block.strip(), mode="eval").body
        if not isinstance(tree, ast.List):
            return None
        calls: list[tuple[str, Any]] = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
                return None
            calls.append((ast.unparse(node.func), {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        return calls


FORMATS: dict[str, ToolFormat] = {}
"""Every known format by name; :func:`register_format` adds one."""


def register_format(fmt: ToolFormat) -> ToolFormat:
    """Add (or replace) a format in the registry; returns it."""
    if not fmt.name:
        raise ValueError(f"{type(fmt).__name__} has no name")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ToolFormat:
    """The format called ``name``; ValueError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


for _format in (HermesFormat(), Llama3JsonFormat(), MistralFormat(), FunctionGemmaFormat(), PythonicFormat()):
    register_format(_format)
