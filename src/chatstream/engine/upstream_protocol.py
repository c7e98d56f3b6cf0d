"""The upstream engine's side of the OpenAI API: its configuration, request bodies from our SamplingParams, the
Server-Sent Events of a streaming response, and error responses mapped to EngineError / EngineOverloaded."""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from chatstream.config import RepetitionPenaltyMethod, SamplingParams
from chatstream.engine.base import EngineError, EngineOverloaded, GenerationRequest, TokenLogprob, TopLogprob

MAX_ERROR_BODY_BYTES = 4096
"""How much of an upstream error response is read to find its message."""

UNKNOWN_TOKEN_ID = -1
"""The ``token_id`` of the logprobs an upstream returns: OpenAI's API names tokens by their text only."""


class UpstreamAPI(enum.Enum):
    """Which OpenAI endpoint the upstream is asked."""

    COMPLETIONS = "completions"
    """``/completions`` with the prompt ChatStream rendered (preferred: our prompt classes decide the format)."""
    CHAT = "chat"
    """``/chat/completions`` with the conversation's messages (``GenerationRequest.messages``; the upstream applies its
    own chat template)."""


@dataclass(frozen=True)
class UpstreamConfig:
    """Where the upstream is and how to talk to it.

    Attributes:
        base_url: the base URL as OpenAI clients take it, e.g. ``http://host:8000/v1``.
        model: the ``model`` field sent with each request; None omits it (vLLM, llama.cpp and ChatStream then use
            the one model they serve; hosted APIs need it).
        api: :class:`UpstreamAPI` (or its value).
        api_key_env: the name of an environment variable holding the API key (sent as ``Authorization: Bearer``);
            read when the engine starts. None sends no key.
        connect_timeout_sec: the longest wait for a connection.
        read_timeout_sec: the longest silence while waiting for the response or its next chunk.
        max_connections: concurrent connections to the upstream (keep it at least the admission's concurrency).
        sampling_extensions: send the sampling fields that vLLM, llama.cpp and ChatStream accept beyond OpenAI's
            (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
            ``add_special_tokens``). False sends OpenAI's fields only and refuses requests that need the others.
    """

    base_url: str
    model: str | None = None
    api: UpstreamAPI = UpstreamAPI.COMPLETIONS
    api_key_env: str | None = None
    connect_timeout_sec: float = 5.0
    read_timeout_sec: float = 60.0
    max_connections: int = 256
    sampling_extensions: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.api, str):
            try:
                object.__setattr__(self, "api", UpstreamAPI(self.api))
            except ValueError:
                raise ValueError(f"api={self.api!r} must be 'completions' or 'chat'") from None
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must start with http:// or https://")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        for name in ("connect_timeout_sec", "read_timeout_sec"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.max_connections < 1:
            raise ValueError(f"max_connections={self.max_connections!r} must be >= 1")

    @property
    def endpoint(self) -> str:
        """The URL each generation is posted to."""
        return f"{self.base_url}/{'chat/completions' if self.api is UpstreamAPI.CHAT else 'completions'}"


class UpstreamFailure(Exception):
    """The upstream answered with an error or broke the protocol (becomes an EngineError or an ERROR delta)."""


class UpstreamOverloaded(UpstreamFailure):
    """The upstream answered 429."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def request_body(request: GenerationRequest, config: UpstreamConfig) -> dict[str, Any]:
    """The JSON body of the upstream request; ValueError naming the field the upstream cannot be asked for."""
    sampling = request.sampling
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if config.model is not None:
        body["model"] = config.model
    if config.api is UpstreamAPI.CHAT:
        if not request.messages:
            raise EngineError(f"the upstream {config.base_url} is in chat mode: the request needs its messages")
        body["messages"] = [{"role": role, "content": content} for role, content in request.messages]
    else:
        body["prompt"] = request.prompt
    check_sampling(sampling, config)
    body.update(openai_sampling(sampling))
    if request.logprobs is not None:
        chat = config.api is UpstreamAPI.CHAT
        body.update({"logprobs": True, "top_logprobs": request.logprobs} if chat else {"logprobs": request.logprobs})
    if config.sampling_extensions:
        body.update(sampling_extensions(sampling, request.add_special_tokens))
    return body


def check_sampling(sampling: SamplingParams, config: UpstreamConfig) -> None:
    """ValueError naming the first field this upstream cannot be asked for."""
    if sampling.repetition_penalty_method is RepetitionPenaltyMethod.SUBTRACTIVE and sampling.repetition_penalty:
        raise ValueError(
            "repetition_penalty_method='subtractive' cannot be forwarded to an OpenAI-compatible upstream "
            "(it knows only the multiplicative repetition_penalty); use 'multiplicative' or presence_penalty"
        )
    if config.sampling_extensions:
        return
    neutral = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False}
    for name, value in sampling_extensions(sampling, None).items():
        if neutral.get(name) != value:
            raise ValueError(
                f"{name}={value!r} cannot be sent to an upstream with sampling_extensions=False (OpenAI's API has "
                f"no such field); leave it at its neutral value ({neutral.get(name, 'unset')!r})"
            )


def openai_sampling(sampling: SamplingParams) -> dict[str, Any]:
    """The fields of OpenAI's own API."""
    fields: dict[str, Any] = {
        "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": sampling.top_p,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
    }
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    return fields


def sampling_extensions(sampling: SamplingParams, add_special_tokens: bool | None) -> dict[str, Any]:
    """The vLLM-style fields beyond OpenAI's; explicit values even where they disable a filter, so that the upstream's
    own defaults (e.g. a model's generation config) do not apply."""
    fields: dict[str, Any] = {
        "top_k": sampling.top_k or -1,
        "min_p": sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty or 1.0,
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.stop_token_ids:
        fields["stop_token_ids"] = list(sampling.stop_token_ids)
    if add_special_tokens is not None:
        fields["add_special_tokens"] = add_special_tokens
    return fields


def chunk_logprobs(choice: dict[str, Any], api: UpstreamAPI) -> tuple[TokenLogprob, ...]:
    """The logprobs of one streamed choice: a chat chunk's ``logprobs.content`` entries (with their bytes), or a
    completion chunk's ``tokens`` / ``token_logprobs`` / ``top_logprobs`` (bytes: the token's UTF-8). Token ids are
    :data:`UNKNOWN_TOKEN_ID`. UpstreamFailure when the object has another shape."""
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return ()
    try:
        if api is UpstreamAPI.CHAT:
            return tuple(_chat_token(entry) for entry in logprobs.get("content") or ())
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        return tuple(
            TokenLogprob(UNKNOWN_TOKEN_ID, token, float(logprob), _completion_top(top), token.encode())
            for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True)
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise UpstreamFailure(f"malformed logprobs: {str(logprobs)[:80]!r} ({exc})") from None


def _chat_token(entry: dict[str, Any]) -> TokenLogprob:
    top = tuple(
        TopLogprob(UNKNOWN_TOKEN_ID, alt["token"], float(alt["logprob"]), _token_bytes(alt))
        for alt in entry.get("top_logprobs") or ()
    )
    return TokenLogprob(UNKNOWN_TOKEN_ID, entry["token"], float(entry["logprob"]), top, _token_bytes(entry))


def _token_bytes(entry: dict[str, Any]) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if raw is not None else str(entry["token"]).encode()


def _completion_top(top: dict[str, Any] | None) -> tuple[TopLogprob, ...]:
    alternatives = sorted((top or {}).items(), key=lambda item: -float(item[1]))  # best first, as ours
    return tuple(TopLogprob(UNKNOWN_TOKEN_ID, token, float(lp), token.encode()) for token, lp in alternatives)


async def check_status(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    raw = b""
    async for piece in response.aiter_bytes():
        raw += piece
        if len(raw) >= MAX_ERROR_BODY_BYTES:
            break
    message = error_message(_json_or_none(raw[:MAX_ERROR_BODY_BYTES])) or raw[:200].decode("utf-8", "replace")
    status = f"{response.status_code} {response.reason_phrase}".strip()
    if response.status_code == 429:
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        raise UpstreamOverloaded(f"{status}: {message}".rstrip(": "), retry_after)
    raise UpstreamFailure(f"{status}: {message}".rstrip(": "))


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a Server-Sent Events stream, up to ``data: [DONE]`` (or the end of the body)."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event/id fields
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = _json_or_none(data.encode())
        if not isinstance(chunk, dict):
            raise UpstreamFailure(f"malformed stream: {data[:80]!r} is not a JSON object")
        yield chunk


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if payload.get("message"):
            return str(payload["message"])
    return ""


def retry_after_seconds(value: str | None, default: int = 1) -> int:
    """``Retry-After`` as whole seconds (it may be a number of seconds or an HTTP date); ``default`` when absent."""
    if not value:
        return default
    with contextlib.suppress(ValueError):
        return max(1, int(float(value)))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(1, round(parsedate_to_datetime(value).timestamp() - time.time()))
    return default


def describe(exc: Exception, config: UpstreamConfig) -> EngineError:
    """The EngineError (or EngineOverloaded) a failed upstream request ends with; it names the upstream."""
    where = f"upstream {config.endpoint}"
    if isinstance(exc, UpstreamOverloaded):
        return EngineOverloaded(f"{where}: {exc}", retry_after=exc.retry_after)
    if isinstance(exc, httpx.ConnectTimeout):
        return EngineError(f"{where}: no connection within {config.connect_timeout_sec:g} s")
    if isinstance(exc, httpx.ConnectError):
        return EngineError(f"{where}: cannot connect ({exc})")
    if isinstance(exc, httpx.ReadTimeout):
        return EngineError(f"{where}: no data for {config.read_timeout_sec:g} s")
    if isinstance(exc, httpx.RemoteProtocolError):
        return EngineError(f"{where}: the connection broke mid-response ({exc})")
    return EngineError(f"{where}: {exc or type(exc).__name__}")
