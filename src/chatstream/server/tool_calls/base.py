"""Tool calls in a model's output: the values (:class:`ToolCall`, streamed :class:`ToolCallDelta` pieces), the
:class:`ToolFormat` each model family implements, and :class:`ToolCallStream`, which turns text deltas into content
deltas and tool-call pieces for every format alike.

A format says where a call starts (a marker such as ``<tool_call>``, or the first character of the whole output for
families that answer with bare JSON), where it ends (a marker, or the end of the output) and how to read the block in
between. Text that could still be the start of a marker is held back until it is known not to be one.

Whitespace alone is never content next to calls (the newlines between two blocks); it is held until text follows.
Malformed calls are content: a block that does not parse (bad JSON, an unknown function, text after the call) is
returned as plain text, markers included, never dropped and never a server error; the answer then has no tool call
and its finish reason is ``stop``. A stream can not take back a piece already sent, so pieces of a call are sent only
once its block has parsed.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedOutput", "StreamDelta", "ToolCall", "ToolCallDelta", "ToolCallStream", "ToolFormat", "new_call_id"]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id (``call_`` and 24 letters or digits)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One function call: its id, the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The ``message.tool_calls[i]`` object of a chat completion."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a call (``delta.tool_calls[0]`` of one chunk): the first piece of a call carries its
    ``index``, ``id`` and ``name`` (arguments empty), the next ones argument fragments only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        piece: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            piece.update(id=self.id, type="function")
        if self.name is not None:
            function["name"] = self.name
        piece["function"] = function
        return piece


@dataclass
class StreamDelta:
    """What one fed text delta released: content text, then tool-call pieces (each piece its own SSE chunk)."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: StreamDelta) -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


@dataclass(frozen=True)
class ParsedOutput:
    """A complete output split into its content (None when empty, as OpenAI sends it) and its tool calls."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


class ToolFormat(ABC):
    """How one model family writes tool calls. Subclasses set the markers and implement :meth:`parse_block`.

    Attributes:
        name: the registry name (``hermes``, ``llama3_json`` ...).
        start_markers: texts that open a call block (the block includes its marker).
        end_marker: the text that closes a block (included in it); None: the block runs to the end of the output.
        whole_output: calls only at the very start of the output (after whitespace): families answering bare JSON.
    """

    name = ""
    start_markers: tuple[str, ...] = ()
    end_marker: str | None = None
    whole_output = False

    @abstractmethod
    def parse_block(self, block: str) -> list[tuple[str, Any]] | None:
        """The ``(name, arguments)`` pairs in one block (arguments a dict or JSON text); None when malformed."""

    def call_grammar(
        self, tools: Sequence[dict[str, Any]], special_ids: dict[str, int], *, parallel: bool = True
    ) -> str | None:
        """A Lark grammar (llguidance dialect) that admits only calls of ``tools`` in this format, for
        ``tool_choice`` "required" or a named function (one call, unless ``parallel``); None when this format
        cannot be enforced."""
        return None

    def parse(self, text: str, tool_names: Collection[str] | None = None) -> ParsedOutput:
        """Split a complete output into content and tool calls."""
        stream = ToolCallStream(self, tool_names)
        delta = stream.feed(text)
        delta.extend(stream.finish())
        return ParsedOutput(delta.content or None, tuple(stream.calls))


def arguments_json(arguments: Any) -> str | None:
    """Arguments as compact JSON object text; None when they are not a JSON object (or text holding one)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


class ToolCallStream:
    """Incremental parser for one answer: :meth:`feed` each text delta, :meth:`finish` at the end.

    ``tool_names``, when given, are the functions the request offered: a call to any other is malformed (content).
    """

    def __init__(self, fmt: ToolFormat, tool_names: Collection[str] | None = None) -> None:
        self.format = fmt
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._in_call = False
        self._seen_text = False
        self._pending_space = ""

    def feed(self, text: str) -> StreamDelta:
        self._buffer += text
        out = StreamDelta()
        while self._step(out):
            pass
        return out

    def finish(self) -> StreamDelta:
        """Release what was held back: an unterminated block is parsed as it is (content when malformed)."""
        out = StreamDelta()
        if self._in_call:
            self._close_block(self._buffer, out)
        else:
            self._emit(out, self._buffer)
        self._buffer, self._in_call = "", False
        if not self.calls:
            out.content += self._pending_space
        self._pending_space = ""
        return out

    def _emit(self, out: StreamDelta, text: str) -> None:
        """Content goes out here; whitespace alone waits for text (between or after calls it is dropped)."""
        pending = self._pending_space + text
        if pending.strip():
            out.content += pending
            self._pending_space = ""
        else:
            self._pending_space = pending

    def _step(self, out: StreamDelta) -> bool:
        """Consume what can be decided now; True when another step may consume more."""
        if self._in_call:
            return self._step_in_call(out)
        if self.format.whole_output:
            return self._step_whole_output(out)
        start, marker = _find_first(self._buffer, self.format.start_markers)
        if marker:
            self._emit(out, self._buffer[:start])
            self._buffer, self._in_call = self._buffer[start:], True
            return True
        held = _held_back(self._buffer, self.format.start_markers)
        self._emit(out, self._buffer[: len(self._buffer) - held])
        self._buffer = self._buffer[len(self._buffer) - held :]
        return False

    def _step_whole_output(self, out: StreamDelta) -> bool:
        if self._seen_text:
            self._emit(out, self._buffer)
            self._buffer = ""
            return False
        stripped = self._buffer.lstrip()
        if not stripped or any(m.startswith(stripped) and m != stripped for m in self.format.start_markers):
            return False  # only whitespace or a marker's beginning so far
        if stripped.startswith(self.format.start_markers):
            self._buffer, self._in_call = stripped, True
        else:
            self._seen_text = True
        return True

    def _step_in_call(self, out: StreamDelta) -> bool:
        end = self.format.end_marker
        if end is None:
            return False  # the block runs to the end of the output
        position = self._buffer.find(end)
        if position < 0:
            return False
        cut = position + len(end)
        block, self._buffer, self._in_call = self._buffer[:cut], self._buffer[cut:], False
        self._close_block(block, out)
        return True

    def _close_block(self, block: str, out: StreamDelta) -> None:
        calls = self._calls_in(block)
        if calls is None:
            self._emit(out, block)
            self._seen_text = True
            return
        for name, arguments in calls:
            call = ToolCall(name, arguments)
            index = len(self.calls)
            self.calls.append(call)
            out.tool_calls.append(ToolCallDelta(index, call.id, name, ""))
            out.tool_calls.append(ToolCallDelta(index, arguments=arguments))

    def _calls_in(self, block: str) -> list[tuple[str, str]] | None:
        try:
            pairs = self.format.parse_block(block)
        except (ValueError, TypeError, KeyError, SyntaxError, RecursionError):
            return None
        if not pairs:
            return None
        calls = []
        for name, arguments in pairs:
            text = arguments_json(arguments)
            if not isinstance(name, str) or not name or text is None:
                return None
            if self.tool_names is not None and name not in self.tool_names:
                return None
            calls.append((name, text))
        return calls


def _find_first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """The earliest marker in ``text``: (position, marker), or (-1, "")."""
    best = (-1, "")
    for marker in markers:
        position = text.find(marker)
        if position >= 0 and (best[0] < 0 or position < best[0]):
            best = (position, marker)
    return best


def _held_back(text: str, markers: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest
