"""How OpenAI responses look on the wire: the JSON objects of one response and Server-Sent Events framing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatstream.admission.generation import GenerationOutcome
from chatstream.engine.base import FinishReason

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_reason_name(reason: FinishReason | None) -> str:
    """OpenAI's finish_reason ("stop", "length"; "abort" when the server cut the request)."""
    if reason is None:
        return "abort"
    return reason.value


class SseResponse(StreamingResponse):
    """An SSE response whose generator is closed and ``on_close`` called however the response ends
    (also when the client left before the body started, where Starlette never starts the iterator)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None] | None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose: Callable[[], Awaitable[None]] | None = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                closed = self._on_close()
                if closed is not None:
                    await closed


class Renderer:
    """Builds the JSON objects of one response ("chat" or "completion")."""

    def __init__(self, kind: str, request_id: str, model: str) -> None:
        self.chat = kind == "chat"
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def first_chunk(self, include_usage: bool) -> dict[str, Any]:
        if self.chat:
            return self._chunk_with({"role": "assistant", "content": ""}, None, include_usage)
        return self.chunk("", None, include_usage)

    def chunk(self, text: str, finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
        if self.chat:
            return self._chunk_with({"content": text} if text else {}, finish_reason, include_usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        payload = self._envelope("text_completion", [choice])
        if include_usage:
            payload["usage"] = None
        return payload

    def _chunk_with(self, delta: dict[str, Any], finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = self._envelope("chat.completion.chunk", [choice])
        if include_usage:
            payload["usage"] = None
        return payload

    def usage_chunk(self, outcome: GenerationOutcome) -> dict[str, Any]:
        payload = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        payload["usage"] = usage(outcome)
        return payload

    def complete(self, outcome: GenerationOutcome) -> dict[str, Any]:
        finish = finish_reason_name(outcome.finish_reason)
        if self.chat:
            message = {"role": "assistant", "content": outcome.text}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            payload = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": finish}
            payload = self._envelope("text_completion", [choice])
        payload["usage"] = usage(outcome)
        return payload


def usage(outcome: GenerationOutcome) -> dict[str, Any]:
    """OpenAI's ``usage`` object of a finished generation (cached prompt tokens included)."""
    prompt, completion = outcome.num_prompt_tokens, outcome.num_generated_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": outcome.num_cached_tokens},
    }
