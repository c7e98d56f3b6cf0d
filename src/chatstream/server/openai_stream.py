"""Streamed OpenAI responses: the SSE events of /v1/chat/completions and /v1/completions, for one or several choices,
with tool calls parsed on the fly and logprobs beside the text they belong to.

Each choice has a :class:`ChoiceStream`, which turns the engine's deltas into the choice objects of the chunks: text
(held back while it may open a tool call), one chunk per tool-call piece, and the last chunk with the finish reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from chatstream.admission.generation import GenerationOutcome, GenerationStream
from chatstream.engine.base import Delta, EngineError, FinishReason, TokenLogprob
from chatstream.server.openai_chat import OpenAIJob
from chatstream.server.openai_render import (
    Renderer,
    chat_logprobs,
    choice_finish_reason,
    completion_logprobs,
    sse,
)
from chatstream.server.tool_calls import ToolCallStream
from chatstream.service import ChatService


class ChoiceStream:
    """The chunks of one choice: its text (through the tool-call parser when the request has tools) and its logprobs,
    which wait for the text of their tokens when the parser holds it back."""

    def __init__(self, index: int, renderer: Renderer) -> None:
        self.index = index
        self.renderer = renderer
        fmt = renderer.tool_format
        self.parser = ToolCallStream(fmt, renderer.tool_names or None) if fmt is not None else None
        self._pending_logprobs: list[TokenLogprob] = []
        self._offset = 0

    def first(self) -> dict[str, Any]:
        """The opening choice object (the chat role, or empty text)."""
        if self.renderer.chat:
            return self._choice({"role": "assistant", "content": ""})
        return self._text_choice("")

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        """The choice objects this delta releases (several: tool-call pieces go one per chunk)."""
        self._pending_logprobs += delta.logprobs
        if self.parser is None:
            return self._content(delta.text) if delta.text or (delta.logprobs and self.renderer.logprobs) else []
        released = self.parser.feed(delta.text)
        out = self._content(released.content) if released.content else []
        return out + [self._choice({"tool_calls": [piece.to_openai()]}) for piece in released.tool_calls]

    def finish(self, outcome: GenerationOutcome) -> list[dict[str, Any]]:
        """What was held back, then the last choice object with the finish reason."""
        out: list[dict[str, Any]] = []
        if self.parser is not None:
            released = self.parser.finish()
            out += self._content(released.content) if released.content else []
            out += [self._choice({"tool_calls": [piece.to_openai()]}) for piece in released.tool_calls]
        has_calls = self.parser is not None and bool(self.parser.calls)
        reason = choice_finish_reason(outcome.finish_reason, has_calls)
        last = self._choice({}, reason) if self.renderer.chat else self._text_choice("", reason)
        if self._pending_logprobs and self.renderer.logprobs:
            last["logprobs"] = self._logprobs()
        return [*out, last]

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not self.renderer.chat:
            return [self._text_choice(text)]
        choice = self._choice({"content": text})
        if self.renderer.logprobs:
            choice["logprobs"] = self._logprobs()
        return [choice]

    def _logprobs(self) -> dict[str, Any]:
        taken, self._pending_logprobs = self._pending_logprobs, []
        if self.renderer.chat:
            return chat_logprobs(taken)
        result = completion_logprobs(taken, self._offset)
        self._offset += sum(len(lp.token) for lp in taken)
        return result

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _text_choice(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        logprobs = self._logprobs() if self.renderer.logprobs and text else None
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


async def event_stream(
    service: ChatService,
    generations: Sequence[GenerationStream],
    job: OpenAIJob,
    renderer: Renderer,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE events of a streamed response (one generation per choice, opened or not yet started): the opening
    chunk of each choice, their pieces as they come, the last chunk of each (or an error event), the usage chunk
    when asked for, then ``[DONE]``."""
    outcomes = [generation.outcome for generation in generations]
    streams = [ChoiceStream(index, renderer) for index in range(len(generations))]
    for stream in streams:
        yield sse(renderer.chunk([stream.first()], include_usage))
    try:
        async with aclosing(service.merge_generations(generations)) as deltas:
            async for index, delta in deltas:
                for choice in streams[index].feed(delta):
                    yield sse(renderer.chunk([choice], include_usage))
                if delta.finished and delta.finish_reason is not FinishReason.ERROR:
                    for choice in streams[index].finish(outcomes[index]):
                        yield sse(renderer.chunk([choice], include_usage))
    except EngineError:  # a generation that had not started failed before its first delta (recorded as ERROR)
        pass
    failed = next((o for o in outcomes if o.finish_reason is FinishReason.ERROR), None)
    if failed is not None:
        message = f"Generation failed: {failed.error or 'engine error'}"
        yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": "generation_error"}})
    elif include_usage:
        yield sse(renderer.usage_chunk(outcomes))
    yield "data: [DONE]\n\n"
