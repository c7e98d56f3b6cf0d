"""The engine contract: what the server hands an engine and what it gets back.

An engine owns the model in a thread of its own. The event loop calls :meth:`Engine.add_request` and iterates the
returned :class:`RequestStream`; the engine thread pushes :class:`Delta` values into it with
``loop.call_soon_threadsafe``. Nothing here imports the HTTP layer.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from chatstream.config import SamplingParams


class FinishReason(enum.Enum):
    """Why a request stopped."""

    STOP = "stop"
    """EOS, a stop token or a stop string."""
    LENGTH = "length"
    """``max_new_tokens`` reached (or the context is full)."""
    ABORT = "abort"
    """``abort(request_id)`` was called (client disconnect, shutdown)."""
    ERROR = "error"
    """The engine failed on this request; ``Delta.error`` says why."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, as the server hands it to an engine.

    Attributes:
        request_id: unique id; ``abort`` takes it.
        prompt: the rendered prompt text; encoded by the engine (in its own thread) unless ``prompt_token_ids``
            is given.
        sampling: how to sample and when to stop.
        prompt_token_ids: already-encoded prompt, used instead of ``prompt`` when not None.
        output_replacements: (old, new) pairs applied to the streamed output, also when ``old`` is split across
            tokens (the prompt class's ``get_replacement_when_output``).
        conversation_id: a stable id of the conversation (e.g. the session id); an engine with a prefix cache keeps
            this conversation's KV cache after the request so that the next turn prefills only the new tokens.
        add_special_tokens: passed to the tokenizer when the engine encodes ``prompt``; None uses the engine's
            setting (``EngineConfig.add_special_tokens``). False for prompts that already contain BOS (chat templates).
    """

    request_id: str
    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_token_ids: tuple[int, ...] | None = None
    output_replacements: tuple[tuple[str, str], ...] = ()
    conversation_id: str | None = None
    add_special_tokens: bool | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if self.prompt_token_ids is not None and not isinstance(self.prompt_token_ids, tuple):
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not isinstance(self.output_replacements, tuple):
            object.__setattr__(self, "output_replacements", tuple(tuple(p) for p in self.output_replacements))


@dataclass(frozen=True)
class Delta:
    """What one engine step produced for one request.

    Attributes:
        text: new text since the previous delta (already free of stop strings and with output replacements
            applied); may be empty while text is held back.
        token_ids: the new token ids.
        finish_reason: set on the last delta of a request, None before.
        num_prompt_tokens: prompt tokens after truncation (the same on every delta).
        num_generated_tokens: generated tokens so far.
        num_cached_tokens: prompt tokens whose KV came from the prefix cache instead of a prefill.
        error: a message when ``finish_reason`` is ERROR.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineError(RuntimeError):
    """The engine cannot serve a request (stopped, or failed). The server answers 503."""


class EngineOverloaded(EngineError):
    """The engine (or the server behind it) is full and said when to retry. The server answers 429 + Retry-After."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class RequestStream:
    """The async side of one request: an iterator of :class:`Delta` fed by the engine.

    Create it on the event loop (it captures the running loop). The engine feeds it on the loop's own thread with
    :meth:`put_nowait` (an engine thread hands deltas over with ``loop.call_soon_threadsafe``). Iteration ends after
    the delta that carries a ``finish_reason``, or raises the exception given to :meth:`fail` (an engine that finds
    out only after ``add_request`` that it cannot serve the request, e.g. a remote server that is full or gone).
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_id = request_id
        self.loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._finished = False

    def put_nowait(self, delta: Delta) -> None:
        """Hand a delta over; call it on the event loop's own thread."""
        self._queue.put_nowait(delta)

    def fail(self, error: BaseException) -> None:
        """End the stream by raising ``error`` in the consumer (on the event loop's own thread)."""
        self._queue.put_nowait(error)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta]:
        while not self._finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._finished = True
                raise item
            if item.finished:
                self._finished = True
            yield item


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for /get_load, /metrics and benchmarks.

    Attributes:
        num_running: sequences decoding (prefilling ones included).
        num_waiting: sequences not started yet.
        num_generated_tokens_total: tokens sampled since the start.
        num_prompt_tokens_total: prompt tokens of the prefills done since the start.
        num_cached_tokens_total: of those, the tokens whose KV came from the prefix cache (token hit rate:
            ``num_cached_tokens_total / num_prompt_tokens_total``).
        prefix_cache_bytes: KV bytes the prefix cache holds now.
        prefix_cache_entries: its nodes (token segments) now.
        prefix_cache_max_bytes: its budget (0: disabled).
        prefix_cache_tokens: the tokens it holds now.
        prefix_cache_queries_total: prefills that looked a prefix up (request hit rate:
            ``prefix_cache_hits_total / prefix_cache_queries_total``).
        prefix_cache_hits_total: of those, the ones that reused at least one token.
        prefix_cache_evictions_total: nodes evicted to stay within the budget.
        num_prefill_chunks_total: prefill chunks run (a long prompt is prefilled in several).
    """

    num_running: int = 0
    num_waiting: int = 0
    num_generated_tokens_total: int = 0
    num_prompt_tokens_total: int = 0
    num_cached_tokens_total: int = 0
    prefix_cache_bytes: int = 0
    prefix_cache_entries: int = 0
    prefix_cache_max_bytes: int = 0
    prefix_cache_tokens: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    prefix_cache_evictions_total: int = 0
    num_prefill_chunks_total: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """The share of prompt tokens served from the prefix cache (0 before any prefill)."""
        total = self.num_prompt_tokens_total
        return self.num_cached_tokens_total / total if total else 0.0


@runtime_checkable
class Engine(Protocol):
    """What every engine (transformers, mock) offers."""

    def start(self) -> None:
        """Start the engine thread (idempotent)."""

    def stop(self) -> None:
        """Abort everything and join the engine thread (idempotent)."""

    @property
    def is_running(self) -> bool:
        """True between start() and stop()."""

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; must be called on the event loop. Raises EngineError when stopped."""

    def abort(self, request_id: str) -> None:
        """Drop the request at the next step; its stream ends with FinishReason.ABORT. Unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """Current load."""
