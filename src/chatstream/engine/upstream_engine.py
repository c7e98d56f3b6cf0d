"""An engine that forwards each generation to an OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama, a hosted API).

ChatStream keeps what it adds on top (conversations, sessions, roles, admission): the upstream only generates. Each
request is one streaming POST of the prompt we rendered to ``{base_url}/completions``, or of the conversation's
messages to ``{base_url}/chat/completions`` for servers without a completions endpoint. Output replacements and stop
strings are applied here too, exactly as in our own engine (stop strings are also sent upstream so that it stops
early). :meth:`OpenAIUpstreamEngine.abort` cancels the request's task, which closes its HTTP connection at once.

Errors: an upstream 429 fails the stream with :class:`EngineOverloaded` carrying its ``Retry-After``; an unreachable
upstream, another error status or a malformed stream fails it with an :class:`EngineError` naming the upstream, or,
once text has been streamed, ends it with a ``FinishReason.ERROR`` delta. Timeouts bound every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from chatstream.config import RepetitionPenaltyMethod, SamplingParams
from chatstream.engine.base import (
    Delta,
    EngineError,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
)
from chatstream.engine.detokenizer import _Replacer, _StopMatcher

logger = logging.getLogger(__name__)

MAX_ERROR_BODY_BYTES = 4096
"""How much of an upstream error response is read to find its message."""

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class UpstreamAPI(enum.Enum):
    """Which OpenAI endpoint the upstream is asked."""

    COMPLETIONS = "completions"
    """``/completions`` with the prompt ChatStream rendered (preferred: our prompt classes decide the format)."""
    CHAT = "chat"
    """``/chat/completions`` with the conversation's messages (the upstream applies its own chat template); needs
    :class:`UpstreamChatRequest`."""


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


@dataclass(frozen=True)
class UpstreamChatRequest(GenerationRequest):
    """A generation request with the conversation's messages, for an upstream in chat mode.

    Attributes:
        messages: ``(role, content)`` pairs in order ("system", "user", "assistant"), ending with the user's turn.
    """

    messages: tuple[tuple[str, str], ...] = ()


class UpstreamFailure(Exception):
    """The upstream answered with an error or broke the protocol (internal: becomes EngineError or an ERROR delta)."""


class OpenAIUpstreamEngine:
    """Forwards generations to an OpenAI-compatible server; implements :class:`chatstream.engine.base.Engine`.

    Each request is an asyncio task on the event loop that called :meth:`add_request`; the HTTP client is created
    on that loop at the first request and closed by :meth:`stop`.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._running = False
        self._headers: dict[str, str] = {}
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._counters = {"generated": 0, "prompt": 0, "cached": 0}

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Read the API key (EngineError when its variable is not set); idempotent."""
        if self._running:
            return
        self._headers = {"Accept": "text/event-stream"}
        if self.config.api_key_env is not None:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise EngineError(f"${self.config.api_key_env} (the API key for {self.config.base_url}) is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self._running = True

    def stop(self) -> None:
        """Abort every request and close the HTTP client; callable on the loop or from another thread."""
        self._running = False
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            for task in self._tasks.values():
                task.cancel()
            if self._client is not None:
                loop.create_task(self._client.aclose())
        elif loop.is_running():
            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        self._client = None

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """Start forwarding ``request``; must be called on the event loop. ValueError for sampling it cannot send."""
        if not self._running:
            raise EngineError(f"the upstream engine for {self.config.base_url} is not running")
        if request.request_id in self._tasks:
            raise EngineError(f"request_id {request.request_id!r} is already in use")
        body = request_body(request, self.config)
        stream = RequestStream(request.request_id)
        client = self._client_for(stream.loop)
        task = stream.loop.create_task(self._forward(client, request, body, stream))
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.request_id, None))
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel the request's task: its connection closes and its stream ends with ABORT."""
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()

    def stats(self) -> EngineStats:
        """Requests in flight (the upstream's own queue is not visible) and the token totals it reported."""
        return EngineStats(
            num_running=len(self._tasks),
            num_generated_tokens_total=self._counters["generated"],
            num_prompt_tokens_total=self._counters["prompt"],
            num_cached_tokens_total=self._counters["cached"],
        )

    def _client_for(self, loop: asyncio.AbstractEventLoop) -> httpx.AsyncClient:
        if self._client is None or self._loop is not loop:
            read = self.config.read_timeout_sec
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(read, connect=self.config.connect_timeout_sec),
                limits=httpx.Limits(max_connections=self.config.max_connections),
                headers=self._headers,
            )
            self._loop = loop
        return self._client

    async def _close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _forward(
        self, client: httpx.AsyncClient, request: GenerationRequest, body: dict[str, Any], stream: RequestStream
    ) -> None:
        state = _ForwardState(request, self.config.api)
        try:
            async with client.stream("POST", self.config.endpoint, json=body) as response:
                await _check_status(response)
                async for chunk in _sse_chunks(response):
                    if not state.take(chunk, stream):
                        break  # a stop string: leaving the block closes the upstream request
            stream.put_nowait(state.final_delta())
            self._count(state)
        except asyncio.CancelledError:
            stream.put_nowait(state.end_delta(FinishReason.ABORT))
        except (httpx.HTTPError, UpstreamFailure) as exc:
            self._fail(stream, state, describe(exc, self.config))
        except Exception as exc:  # never leave a request hanging
            logger.exception("request %s: unexpected failure", request.request_id)
            self._fail(stream, state, describe(exc, self.config))

    def _fail(self, stream: RequestStream, state: _ForwardState, error: EngineError) -> None:
        logger.warning("request %s failed: %s", stream.request_id, error)
        if state.num_deltas == 0:
            stream.fail(error)
        else:
            stream.put_nowait(state.end_delta(FinishReason.ERROR, str(error)))

    def _count(self, state: _ForwardState) -> None:
        self._counters["generated"] += state.num_generated
        self._counters["prompt"] += state.num_prompt
        self._counters["cached"] += state.num_cached


class OutputFilter:
    """Output replacements then stop strings on streamed text (the detokenizer's stages 2 and 3, without tokens)."""

    def __init__(self, stop: Sequence[str], replacements: Sequence[tuple[str, str]]) -> None:
        self._replacers = [_Replacer(old, new) for old, new in replacements]
        self._stop = _StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def push(self, text: str, final: bool = False) -> str:
        """The text that may be sent now; ``final`` releases everything held back."""
        if self._stop.stopped:
            return ""
        for replacer in self._replacers:
            text = replacer.push(text, final)
        return self._stop.push(text, final)


class _ForwardState:
    """One forwarded request: its output filter, what has been delivered and what the upstream reported."""

    def __init__(self, request: GenerationRequest, api: UpstreamAPI) -> None:
        self.chat = api is UpstreamAPI.CHAT
        self.filter = OutputFilter(request.sampling.stop, request.output_replacements)
        self.num_deltas = 0
        self.num_generated = 0
        self.num_prompt = 0
        self.num_cached = 0
        self.finish: FinishReason | None = None

    def take(self, chunk: dict[str, Any], stream: RequestStream) -> bool:
        """Deliver one chunk's text; False once a stop string ended the output."""
        if "error" in chunk:
            raise UpstreamFailure(f"error in the stream: {_error_message(chunk)}")
        self._take_usage(chunk.get("usage"))
        choices = chunk.get("choices") or []
        if not choices:
            return True
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        if text:
            self.num_generated += 1
            self.num_deltas += 1
            stream.put_nowait(Delta(text=self.filter.push(str(text)), num_generated_tokens=self.num_generated))
            if self.filter.stopped:
                self.finish = FinishReason.STOP
                return False
        if choice.get("finish_reason"):
            self.finish = _FINISH_REASONS.get(str(choice["finish_reason"]), FinishReason.STOP)
        return True

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.num_prompt = int(usage.get("prompt_tokens") or 0)
        self.num_generated = int(usage.get("completion_tokens") or self.num_generated)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.num_cached = int(details.get("cached_tokens") or 0)

    def final_delta(self) -> Delta:
        if self.finish is None:
            raise UpstreamFailure("the stream ended without a finish_reason")
        return self.end_delta(self.finish)

    def end_delta(self, reason: FinishReason, error: str | None = None) -> Delta:
        text = self.filter.push("", final=True) if reason in (FinishReason.STOP, FinishReason.LENGTH) else ""
        return Delta(
            text=text,
            finish_reason=reason,
            num_prompt_tokens=self.num_prompt,
            num_generated_tokens=self.num_generated,
            num_cached_tokens=self.num_cached,
            error=error,
        )


def request_body(request: GenerationRequest, config: UpstreamConfig) -> dict[str, Any]:
    """The JSON body of the upstream request; ValueError naming the field the upstream cannot be asked for."""
    sampling = request.sampling
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if config.model is not None:
        body["model"] = config.model
    if config.api is UpstreamAPI.CHAT:
        if not isinstance(request, UpstreamChatRequest) or not request.messages:
            raise EngineError(f"the upstream {config.base_url} is in chat mode: the request needs its messages")
        body["messages"] = [{"role": role, "content": content} for role, content in request.messages]
    else:
        body["prompt"] = request.prompt
    body.update(openai_sampling(sampling))
    extensions = sampling_extensions(sampling, request.add_special_tokens)
    if config.sampling_extensions:
        body.update(extensions)
    else:
        _refuse_extensions(sampling, extensions)
    return body


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
    if sampling.repetition_penalty_method is RepetitionPenaltyMethod.SUBTRACTIVE and sampling.repetition_penalty:
        raise ValueError(
            "repetition_penalty_method='subtractive' cannot be forwarded to an OpenAI-compatible upstream "
            "(it knows only the multiplicative repetition_penalty); use 'multiplicative' or presence_penalty"
        )
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


def _refuse_extensions(sampling: SamplingParams, extensions: dict[str, Any]) -> None:
    neutral = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False}
    for name, value in extensions.items():
        if name != "add_special_tokens" and neutral.get(name) != value:
            raise ValueError(
                f"{name}={value!r} cannot be sent to an upstream with sampling_extensions=False (OpenAI's API has "
                f"no such field); leave it at its neutral value {neutral.get(name)!r}"
            )


async def _check_status(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    raw = b""
    async for piece in response.aiter_bytes():
        raw += piece
        if len(raw) >= MAX_ERROR_BODY_BYTES:
            break
    message = _error_message(_json_or_none(raw[:MAX_ERROR_BODY_BYTES])) or raw[:200].decode("utf-8", "replace")
    status = f"{response.status_code} {response.reason_phrase}".strip()
    if response.status_code == 429:
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        raise _Overloaded(f"{status}: {message}".rstrip(": "), retry_after)
    raise UpstreamFailure(f"{status}: {message}".rstrip(": "))


class _Overloaded(UpstreamFailure):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


async def _sse_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
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


def _error_message(payload: Any) -> str:
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
    if isinstance(exc, _Overloaded):
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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
