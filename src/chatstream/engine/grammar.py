"""Grammars as plain data: what a request asks its output to follow (any JSON object, a JSON schema, or a Lark
grammar such as a model family's tool-call format), and the translation of OpenAI's ``response_format``.

No tensors and no llguidance at import time: a :class:`GrammarSpec` crosses from the server into the engine inside a
:class:`~chatstream.engine.base.GenerationRequest`. :mod:`chatstream.engine.structured` compiles it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["GrammarKind", "GrammarSpec", "response_format_grammar"]


class GrammarKind(enum.Enum):
    """What a :class:`GrammarSpec` holds."""

    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"
    LARK = "lark"


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar to constrain one sequence, as plain data (it crosses from the server into the engine).

    ``text`` is the canonical JSON of the schema (JSON_SCHEMA) or the Lark source (LARK); ``field`` is the request
    field that errors name (``response_format.json_schema.schema``, ``tool_choice`` ...).
    """

    kind: GrammarKind
    text: str = ""
    field: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind is not GrammarKind.JSON_OBJECT and not self.text:
            raise ValueError(f"{self.field}: a {self.kind.value} grammar needs its text")

    @classmethod
    def json_object(cls, field: str = "response_format") -> GrammarSpec:
        return cls(GrammarKind.JSON_OBJECT, "", field)

    @classmethod
    def json_schema(cls, schema: Any, field: str = "response_format.json_schema.schema") -> GrammarSpec:
        """A schema given as a dict (or a bool); ValueError naming ``field`` when it is not a JSON object."""
        if not isinstance(schema, dict | bool):
            raise ValueError(f"{field} must be a JSON object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{field} is not valid JSON: {exc}") from None
        return cls(GrammarKind.JSON_SCHEMA, text, field)

    @classmethod
    def lark(cls, source: str, field: str = "tool_choice") -> GrammarSpec:
        return cls(GrammarKind.LARK, source, field)

    def grammar_text(self) -> str:
        """The llguidance grammar (a JSON document) for this spec."""
        import llguidance

        if self.kind is GrammarKind.LARK:
            return str(llguidance.LLMatcher.grammar_from_lark(self.text))
        schema: Any = {"type": "object"} if self.kind is GrammarKind.JSON_OBJECT else json.loads(self.text)
        # compact JSON ({"a":1,"b":[2,3]}): no free whitespace for a model to loop in; overrides win over the
        # schema's own "x-guidance" options
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False}))


def response_format_grammar(value: Any, field: str = "response_format") -> GrammarSpec | None:
    """The grammar for an OpenAI ``response_format``: None for ``text`` (or no value); ValueError naming the field.

    ``{"type": "json_object"}`` → any JSON object; ``{"type": "json_schema", "json_schema": {"name": ..., "schema":
    {...}, "strict": ...}}`` → that schema (``strict`` changes nothing: the schema is always enforced).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be an object, got {type(value).__name__}")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object(field)
    if kind != "json_schema":
        raise ValueError(f"{field}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    body = value.get("json_schema")
    if not isinstance(body, Mapping):
        raise ValueError(f"{field}.json_schema must be an object with a 'schema'")
    if "schema" not in body:
        raise ValueError(f"{field}.json_schema.schema is required")
    return GrammarSpec.json_schema(body["schema"], f"{field}.json_schema.schema")
