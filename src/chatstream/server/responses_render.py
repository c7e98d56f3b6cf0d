"""The objects and events of the Responses API: the ``response`` object (its output items: a message with its text,
function calls), its usage, and the typed SSE events of a streamed response (``event: <type>`` + ``data: {...}``,
numbered by ``sequence_number``)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from chatstream.admission.generation import GenerationOutcome
from chatstream.engine.base import FinishReason
from chatstream.server.responses_schemas import ResponsesRequest
from chatstream.server.tool_calls import ToolCall, ToolCallStream, ToolFormat


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_usage(outcome: GenerationOutcome) -> dict[str, Any]:
    prompt, output = outcome.num_prompt_tokens, outcome.num_generated_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": outcome.num_cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def status_of(reason: FinishReason | None) -> tuple[str, dict[str, Any] | None]:
    """The response's ``status`` and ``incomplete_details`` for how its generation ended."""
    if reason is FinishReason.STOP:
        return "completed", None
    if reason is FinishReason.LENGTH:
        return "incomplete", {"reason": "max_output_tokens"}
    if reason is FinishReason.ERROR:
        return "failed", None
    return "cancelled", None


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


class ResponseBuilder:
    """The ``response`` objects of one response: the request's settings echoed, the output, the status."""

    def __init__(self, response_id: str, model: str, body: ResponsesRequest) -> None:
        self.response_id = response_id
        self.model = model
        self.body = body
        self.created_at = int(time.time())

    def build(
        self,
        status: str,
        output: Sequence[dict[str, Any]] = (),
        outcome: GenerationOutcome | None = None,
        incomplete: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = self.body
        error = None
        if status == "failed" and outcome is not None:
            error = {"code": "server_error", "message": f"Generation failed: {outcome.error or 'engine error'}"}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": list(output),
            "usage": response_usage(outcome) if outcome is not None and status != "in_progress" else None,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "previous_response_id": body.previous_response_id,
            "tools": list(body.tools or []),
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "text": body.text or {"format": {"type": "text"}},
            "truncation": body.truncation or "disabled",
            "metadata": dict(body.metadata or {}),
            "store": body.stores,
            "user": body.user,
        }

    def complete(self, text: str | None, calls: Sequence[ToolCall], outcome: GenerationOutcome) -> dict[str, Any]:
        """The finished response of a whole (not streamed) answer."""
        status, incomplete = status_of(outcome.finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        output = [message_item(_item_id("msg"), text, item_status)] if text else []
        output += [call_item(_item_id("fc"), call) for call in calls]
        return self.build(status, output, outcome, incomplete)


class ResponseEvents:
    """The SSE events of one streamed response, in order: created, in_progress, the items as they come, and the
    last event (completed, incomplete or failed) built by :meth:`finish`."""

    def __init__(self, builder: ResponseBuilder, tool_format: ToolFormat | None, tool_names: Sequence[str]) -> None:
        self.builder = builder
        self.parser = ToolCallStream(tool_format, tool_names or None) if tool_format is not None else None
        self.output: list[dict[str, Any]] = []
        self.calls: list[ToolCall] = []
        self._sequence = 0
        self._message: dict[str, Any] | None = None  # the open message item
        self._item_text = ""  # the open message item's text
        self.content = ""  # the text of every message item: the answer's text

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def start(self) -> list[str]:
        opening = self.builder.build("in_progress")
        return [self.event("response.created", response=opening), self.event("response.in_progress", response=opening)]

    def feed(self, text: str) -> list[str]:
        """The events of a piece of generated text."""
        if self.parser is None:
            return self._text_events(text)
        released = self.parser.feed(text)
        return self._text_events(released.content) + self._call_events(released.tool_calls)

    def close(self) -> list[str]:
        """What the parser held back, then the open message item's closing events."""
        events: list[str] = []
        if self.parser is not None:
            released = self.parser.finish()
            events += self._text_events(released.content) + self._call_events(released.tool_calls)
        return events + self._close_message()

    def finish(self, outcome: GenerationOutcome) -> tuple[dict[str, Any], str]:
        """The final response object and its event (call after :meth:`close`)."""
        status, incomplete = status_of(outcome.finish_reason)
        response = self.builder.build(status, self.output, outcome, incomplete)
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(status, "response.incomplete")
        return response, self.event(kind, response=response)

    def _text_events(self, text: str) -> list[str]:
        if not text:
            return []
        events: list[str] = []
        if self._message is None:
            self._message = message_item(_item_id("msg"), "", "in_progress")
            self._message["content"] = []
            events.append(self.event("response.output_item.added", output_index=len(self.output), item=self._message))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self.event("response.content_part.added", **self._where(), content_index=0, part=part))
        self._item_text += text
        self.content += text
        delta = self.event("response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=[])
        return [*events, delta]

    def _close_message(self) -> list[str]:
        if self._message is None:
            return []
        where, text = self._where(), self._item_text
        item = message_item(self._message["id"], text, "completed")
        part = item["content"][0]
        self.output.append(item)
        self._message, self._item_text = None, ""
        return [
            self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
            self.event("response.content_part.done", **where, content_index=0, part=part),
            self.event("response.output_item.done", output_index=where["output_index"], item=item),
        ]

    def _call_events(self, pieces: Sequence[Any]) -> list[str]:
        if not pieces:
            return []
        events = self._close_message()
        for call in self.parser.calls[len(self.calls) :] if self.parser is not None else []:
            self.calls.append(call)
            item = call_item(_item_id("fc"), call, "in_progress")
            index = len(self.output)
            events.append(self.event("response.output_item.added", output_index=index, item={**item, "arguments": ""}))
            where = {"item_id": item["id"], "output_index": index}
            events.append(self.event("response.function_call_arguments.delta", **where, delta=call.arguments))
            events.append(self.event("response.function_call_arguments.done", **where, arguments=call.arguments))
            done = {**item, "status": "completed"}
            self.output.append(done)
            events.append(self.event("response.output_item.done", output_index=index, item=done))
        return events

    def _where(self) -> dict[str, Any]:
        assert self._message is not None
        return {"item_id": self._message["id"], "output_index": len(self.output)}
