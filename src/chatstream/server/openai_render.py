"""How OpenAI responses look on the wire: the JSON objects of one response (its choices, tool calls, logprobs and
usage) and Server-Sent Events framing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatstream.admission.generation import GenerationOutcome
from chatstream.engine.base import FinishReason, TokenLogprob
from chatstream.server.http import stream_in_this_task
from chatstream.server.tool_calls import ParsedOutput, ToolFormat

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_reason_name(reason: FinishReason | None) -> str:
    """OpenAI's finish_reason ("stop", "length"; "abort" when the server cut the request)."""
    if reason is None:
        return "abort"
    return reason.value


def choice_finish_reason(reason: FinishReason | None, has_tool_calls: bool) -> str:
    """``tool_calls`` when an answer that stopped by itself holds calls, else :func:`finish_reason_name`."""
    if has_tool_calls and reason is FinishReason.STOP:
        return "tool_calls"
    return finish_reason_name(reason)


class SseResponse(StreamingResponse):
    """An SSE response whose generator is closed and ``on_close`` called however the response ends
    (also when the client left before the body started, where Starlette never starts the iterator); the body is
    written in the request's own task (:func:`~chatstream.server.http.stream_in_this_task`)."""

    def __init__(
        self,
        events: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None] | None],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**_SSE_HEADERS, **(headers or {})})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await stream_in_this_task(self, scope, receive, send)
        finally:
            try:
                aclose: Callable[[], Awaitable[None]] | None = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                closed = self._on_close()
                if closed is not None:
                    await closed


# ----- logprobs -----


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The ``logprobs`` object of a chat choice (or chunk): one entry per token, with its alternatives."""
    return {"content": [_token_entry(lp, with_top=True) for lp in logprobs], "refusal": None}


def _token_entry(lp: TokenLogprob, *, with_top: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token_bytes)}
    if with_top:
        entry["top_logprobs"] = [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)} for t in lp.top]
    return entry


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy ``logprobs`` object of /v1/completions (tokens, their logprobs, the top ones, text offsets)."""
    offsets, position = [], offset
    for lp in logprobs:
        offsets.append(position)
        position += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


# ----- whole responses -----


class Renderer:
    """Builds the JSON objects of one response ("chat" or "completion").

    Args:
        kind: "chat" or "completion".
        request_id: the response's id (``chatcmpl-...``, ``cmpl-...``).
        model: the model id.
        tool_format: parses tool calls out of chat answers (None: plain text).
        tool_names: the functions the request offered.
        logprobs: show logprobs.
    """

    def __init__(
        self,
        kind: str,
        request_id: str,
        model: str,
        *,
        tool_format: ToolFormat | None = None,
        tool_names: Sequence[str] = (),
        logprobs: bool = False,
    ) -> None:
        self.chat = kind == "chat"
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.tool_format = tool_format
        self.tool_names = tuple(tool_names)
        self.logprobs = logprobs

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        """A streamed chunk (``chat.completion.chunk`` or ``text_completion``) with these choices."""
        payload = self.envelope("chat.completion.chunk" if self.chat else "text_completion", choices)
        if include_usage:
            payload["usage"] = None
        return payload

    def usage_chunk(self, outcomes: Sequence[GenerationOutcome]) -> dict[str, Any]:
        payload = self.envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        payload["usage"] = usage(outcomes)
        return payload

    def complete(self, outcomes: Sequence[GenerationOutcome]) -> dict[str, Any]:
        """The whole (non-streamed) response: one choice per outcome, and the usage."""
        if self.chat:
            payload = self.envelope("chat.completion", [self._chat_choice(i, o) for i, o in enumerate(outcomes)])
        else:
            payload = self.envelope("text_completion", [self._text_choice(i, o) for i, o in enumerate(outcomes)])
        payload["usage"] = usage(outcomes)
        return payload

    def parse(self, text: str) -> ParsedOutput:
        """The answer split into content and tool calls (content only without a tool format)."""
        if self.tool_format is None:
            return ParsedOutput(text)
        return self.tool_format.parse(text, self.tool_names or None)

    def _chat_choice(self, index: int, outcome: GenerationOutcome) -> dict[str, Any]:
        parsed = self.parse(outcome.text)
        content = parsed.content if parsed.tool_calls else outcome.text
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if parsed.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
        return {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(outcome.logprobs) if self.logprobs else None,
            "finish_reason": choice_finish_reason(outcome.finish_reason, bool(parsed.tool_calls)),
        }

    def _text_choice(self, index: int, outcome: GenerationOutcome) -> dict[str, Any]:
        return {
            "index": index,
            "text": outcome.text,
            "logprobs": completion_logprobs(outcome.logprobs) if self.logprobs else None,
            "finish_reason": finish_reason_name(outcome.finish_reason),
        }


def usage(outcomes: Sequence[GenerationOutcome] | GenerationOutcome) -> dict[str, Any]:
    """OpenAI's ``usage`` of finished generations: the prompt (and its cached part) counted once, as the choices
    share it, and the tokens of every choice."""
    if isinstance(outcomes, GenerationOutcome):
        outcomes = [outcomes]
    first = outcomes[0]
    prompt, completion = first.num_prompt_tokens, sum(o.num_generated_tokens for o in outcomes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": first.num_cached_tokens},
    }
