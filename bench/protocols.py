"""Wire-format decoders for the two streaming protocols the benchmark speaks.

- OpenAI SSE: ``data: {json}`` events separated by blank lines, ending with ``data: [DONE]``.
- Native ChatStream: every chunk is the *cumulative* answer followed by ``<::EOS::>``; transport reads may split or
  merge chunks, so the decoder buffers until it sees the marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

NATIVE_CHUNK_END = "<::EOS::>"
SSE_DONE = "[DONE]"


class SseDecoder:
    """Incremental Server-Sent Events decoder: feed lines, get the data payload of each completed event."""

    def __init__(self) -> None:
        self._data_lines: list[str] = []

    def feed_line(self, line: str) -> str | None:
        """Feed one line (without its newline). Returns an event's data when the line completes one."""
        line = line.rstrip("\r")
        if line == "":
            return self._flush()
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_lines.append(value)
        return None

    def close(self) -> str | None:
        """End of stream: a final event not followed by a blank line still counts."""
        return self._flush()

    def _flush(self) -> str | None:
        if not self._data_lines:
            return None
        data = "\n".join(self._data_lines)
        self._data_lines = []
        return data


@dataclass(frozen=True)
class OpenAIChunk:
    """What one OpenAI streaming event carries for the benchmark."""

    text: str
    finish_reason: str | None
    completion_tokens: int | None
    prompt_tokens: int | None
    done: bool = False
    cached_tokens: int | None = None


def parse_openai_event(data: str) -> OpenAIChunk:
    """Decode one SSE data payload of /v1/chat/completions or /v1/completions.

    Raises ValueError on a payload that is neither ``[DONE]`` nor a JSON object, or that carries an error.
    """
    if data.strip() == SSE_DONE:
        return OpenAIChunk(text="", finish_reason=None, completion_tokens=None, prompt_tokens=None, done=True)
    payload: Any = json.loads(data)
    if not isinstance(payload, dict):
        raise ValueError(f"SSE payload is not a JSON object: {data[:200]!r}")
    if "error" in payload:
        raise ValueError(f"server sent an error event: {payload['error']!r}")
    text_parts: list[str] = []
    finish_reason = None
    for choice in payload.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text_parts.append(delta.get("content") or "")
        else:
            text_parts.append(choice.get("text") or "")
        finish_reason = choice.get("finish_reason") or finish_reason
    usage = payload.get("usage") or {}
    return OpenAIChunk(
        text="".join(text_parts),
        finish_reason=finish_reason,
        completion_tokens=usage.get("completion_tokens"),
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
    )


class NativeStreamDecoder:
    """Splits the native stream into its cumulative-text snapshots, whatever the transport's read boundaries."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        """Feed received text; return the cumulative answers completed by it (oldest first)."""
        self._buffer += text
        snapshots: list[str] = []
        while True:
            end = self._buffer.find(NATIVE_CHUNK_END)
            if end < 0:
                break
            snapshots.append(self._buffer[:end])
            self._buffer = self._buffer[end + len(NATIVE_CHUNK_END) :]
        return snapshots

    @property
    def pending(self) -> str:
        """Text received after the last marker (a stream that ends without one leaves it here)."""
        return self._buffer


def native_rejection(body: str) -> str | None:
    """The error name when a native response body is a JSON error instead of a stream.

    The original answers a full queue with HTTP 200 and ``{"error": "too_many_requests"}`` unless configured for 429.
    """
    stripped = body.strip()
    if not stripped.startswith("{") or NATIVE_CHUNK_END in stripped:
        return None
    try:
        payload = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if isinstance(payload, dict) and "error" in payload:
        error = payload["error"]
        return error if isinstance(error, str) else json.dumps(error)
    return None
