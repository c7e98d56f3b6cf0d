"""The engine contract: what the server hands an engine and what it gets back.

An engine owns the model in a thread of its own. The event loop calls :meth:`Engine.add_request` and iterates the
returned :class:`RequestStream`; the engine thread pushes :class:`Delta` values into it with
``loop.call_soon_threadsafe``. Nothing here imports the HTTP layer.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from chatstream.config import SamplingParams
from chatstream.engine.grammar import GrammarSpec

MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI's limit)."""


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
        grammar: the output must follow it (constrained decoding: the tokens it forbids are masked at every step);
            engines that cannot constrain output refuse such requests (see :class:`GrammarEngine`).
        logprobs: None for none; ``k`` (0 to :data:`MAX_TOP_LOGPROBS`): each delta carries the log-probability of
            every generated token and the ``k`` most likely alternatives (:class:`TokenLogprob`).
        skip_special_tokens: leave special tokens out of the text (False keeps tool-call markers that a tokenizer
            has as special tokens, such as ``[TOOL_CALLS]``).
        messages: the conversation as ``(role, content)`` pairs ("system", "user", "assistant"), ending with the
            user's turn, for engines that render prompts themselves (an upstream in chat mode); the service fills it
            from the prompt object. Engines that generate from ``prompt`` ignore it.
    """

    request_id: str
    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_token_ids: tuple[int, ...] | None = None
    output_replacements: tuple[tuple[str, str], ...] = ()
    conversation_id: str | None = None
    add_special_tokens: bool | None = None
    grammar: GrammarSpec | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    messages: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs!r} must be None or in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_token_ids is not None and not isinstance(self.prompt_token_ids, tuple):
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not isinstance(self.output_replacements, tuple):
            object.__setattr__(self, "output_replacements", tuple(tuple(p) for p in self.output_replacements))
        if not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple((str(r), str(c)) for r, c in self.messages))


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at one position: its id, its text (U+FFFD for a piece of a multi-byte character), its
    bytes and its log-probability."""

    token_id: int
    token: str
    logprob: float
    token_bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token (its text and bytes as in :class:`TopLogprob`), and the most
    likely tokens at its position (best first).

    Log-probabilities are those of the distribution the token was drawn from before temperature and the top-k/p
    filters: the log-softmax of the logits after the grammar's mask and the repetition penalties.
    """

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    token_bytes: bytes = b""


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
        logprobs: one :class:`TokenLogprob` per new token when the request asked for them, else empty.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()

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


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running on this thread, or None (another thread, or no loop)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` unless it is done, from any thread: at once on its loop's own thread, else through that loop
    (asyncio tasks may only be touched from their loop; an engine's ``stop`` may run in a worker thread)."""
    if task is None or task.done():
        return
    loop = task.get_loop()
    if running_loop() is loop:
        task.cancel()
    elif not loop.is_closed():
        loop.call_soon_threadsafe(task.cancel)


class RequestStream:
    """The async side of one request: an iterator of :class:`Delta` fed by the engine.

    Create it on the event loop (it captures the running loop). The engine feeds it on the loop's own thread with
    :meth:`put_nowait` (an engine thread hands deltas over with ``loop.call_soon_threadsafe``). Iteration ends after
    the delta that carries a ``finish_reason``, or raises the exception given to :meth:`fail` (an engine that finds
    out only after ``add_request`` that it cannot serve the request, e.g. a remote server that is full or gone).
    A subclass may produce the deltas in the reading task instead (VLLMEngine's streams); there, :meth:`put_nowait`
    and :meth:`fail` from outside end the stream with what they hand over.
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


@dataclass(frozen=True)
class WorkerStats:
    """One worker of an engine that spreads requests over several (a pool's member engines, Ray replicas).

    Attributes:
        name: the worker's name (a device such as "cuda:1", or a replica id); the ``engine`` label in /metrics.
        stats: its load and token totals.
        max_running: the generations it runs at once (None: unknown).
        healthy: False once it failed and was taken out of rotation.
        error: why it was taken out.
        turns_total: requests routed to it.
        moved_in_total: conversations whose turn came to it from another worker (their KV was elsewhere).
        conversations: conversations it owns now (their next turn goes to it while it has a free slot).
    """

    name: str
    stats: EngineStats = field(default_factory=EngineStats)
    max_running: int | None = None
    healthy: bool = True
    error: str | None = None
    turns_total: int = 0
    moved_in_total: int = 0
    conversations: int = 0


@runtime_checkable
class SamplingChecker(Protocol):
    """An engine that cannot sample every way :class:`SamplingParams` allows (vLLM, an upstream) says so up front.

    The service calls :meth:`check_sampling` when it builds a request, so that the client gets a 400 naming the
    field instead of a failed stream.
    """

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise ValueError naming the first field this engine cannot honour (``name=value ...``)."""


@runtime_checkable
class Engine(Protocol):
    """What every engine (transformers, mock) offers.

    Optional members, looked up with the helpers below so that engines without them keep working:

    - ``check_health() -> None`` raises :class:`EngineError` when the engine can no longer serve (its thread died);
    - ``workers() -> Sequence[WorkerStats]``: an engine that spreads requests over several (a pool, Ray replicas)
      reports each of them (/get_load, /metrics, /health);
    - ``wants_chat_context: bool``: the engine answers from the user's latest message and the turn number rather
      than from the prompt (the mock engine); the service then hands it a ``MockRequest``. Wrappers forward it
      from the engines they wrap.
    """

    def start(self) -> None:
        """Start the engine thread (idempotent).

        An engine whose start blocks for long (it loads a model) says so with a class attribute ``blocking_start =
        True``; the service then calls start in a worker thread, so that the event loop keeps serving meanwhile.
        """

    def stop(self) -> None:
        """Abort everything and join the engine thread (idempotent)."""

    @property
    def is_running(self) -> bool:
        """True between start() and stop()."""

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; must be called on the event loop. Raises EngineError when stopped.

        Callers read the stream to its end or abort the request. An engine may start the request only when its
        stream is first read, and produce the deltas in the reader's task (VLLMEngine does)."""

    def abort(self, request_id: str) -> None:
        """Drop the request at the next step; its stream ends with FinishReason.ABORT. Unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """Current load.

        An engine may also offer ``describe() -> dict``: what it runs ("engine", "model", "max_model_len", an
        "upstream" URL ...), shown by /get_load, /get_resource_usage and /v1/models.
        """


@runtime_checkable
class GrammarEngine(Protocol):
    """An engine that constrains output to a grammar (:attr:`GenerationRequest.grammar`)."""

    def prepare_grammars(self) -> None:
        """Build what grammars need (a token table: seconds, blocking); the service calls it once at start-up."""

    def validate_grammar(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` or raise ValueError naming its field (blocking: call it in a worker thread)."""


def engine_health(engine: Engine) -> str | None:
    """Why ``engine`` cannot serve (stopped, or its optional ``check_health`` raised), else None."""
    if not engine.is_running:
        return "the engine is not running"
    check = getattr(engine, "check_health", None)
    if callable(check):
        try:
            check()
        except EngineError as exc:
            return str(exc) or type(exc).__name__
    return None


def engine_workers(engine: Engine) -> Sequence[WorkerStats]:
    """The workers of an engine that spreads requests over several (its optional ``workers()``), else none."""
    workers = getattr(engine, "workers", None)
    return tuple(workers()) if callable(workers) else ()


def takes_messages_only(engine: Engine) -> bool:
    """Whether the engine generates from :attr:`GenerationRequest.messages` alone (its ``takes_messages_only``: an
    upstream in chat mode), so that a prompt rendered by the service (tools through the chat template) cannot reach
    it."""
    return bool(getattr(engine, "takes_messages_only", False))


def wants_chat_context(engine: Engine) -> bool:
    """Whether the engine answers from the user's message and the turn number (its ``wants_chat_context``)."""
    return bool(getattr(engine, "wants_chat_context", False))
