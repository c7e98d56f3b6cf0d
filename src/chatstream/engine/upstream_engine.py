"""An engine that forwards each generation to an OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama, a hosted API).

ChatStream keeps what it adds on top (conversations, sessions, roles, admission): the upstream only generates. Each
request is one streaming POST of the prompt we rendered to ``{base_url}/completions``, or of the conversation's
messages to ``{base_url}/chat/completions`` for servers without a completions endpoint. Output replacements and stop
strings are applied here too, exactly as in our own engine (stop strings are also sent upstream so that it stops
early). Requested logprobs are asked of the upstream and passed on (without token ids, which OpenAI's API does not
give). :meth:`OpenAIUpstreamEngine.abort` cancels the request's task, which closes its HTTP connection at once.

Errors: an upstream 429 fails the stream with :class:`EngineOverloaded` carrying its ``Retry-After``; an unreachable
upstream, another error status or a malformed stream fails it with an :class:`EngineError` naming the upstream, or,
once text has been streamed, ends it with a ``FinishReason.ERROR`` delta. Timeouts bound every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import httpx

from chatstream.config import SamplingParams
from chatstream.engine.base import (
    Delta,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
    cancel_task,
    running_loop,
)
from chatstream.engine.detokenizer import TextFilter
from chatstream.engine.upstream_protocol import (
    UpstreamAPI,
    UpstreamConfig,
    UpstreamFailure,
    check_sampling,
    check_status,
    chunk_logprobs,
    describe,
    error_message,
    request_body,
    sse_chunks,
)

__all__ = ["OpenAIUpstreamEngine", "UpstreamAPI", "UpstreamConfig"]

logger = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


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

    @property
    def takes_messages_only(self) -> bool:
        """In chat mode the upstream renders the prompt from the messages: a prompt rendered here cannot be sent."""
        return self.config.api is UpstreamAPI.CHAT

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
        if running_loop() is loop:
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
        task.add_done_callback(lambda done: self._forget(request.request_id, done, stream))
        return stream

    def check_sampling(self, sampling: SamplingParams) -> None:
        """ValueError naming the first field this upstream cannot be asked for (``add_request`` checks it too)."""
        check_sampling(sampling, self.config)

    def abort(self, request_id: str) -> None:
        """Cancel the request's task: its connection closes and its stream ends with ABORT."""
        cancel_task(self._tasks.get(request_id))

    def describe(self) -> dict[str, Any]:
        """What /get_load, /get_resource_usage and /v1/models show of this engine."""
        return {
            "engine": "upstream",
            "upstream": self.config.base_url,
            "upstream_api": self.config.api.value,
            "model": self.config.model,
        }

    def stats(self) -> EngineStats:
        """Requests in flight (the upstream's own queue is not visible) and the token totals it reported."""
        return EngineStats(
            num_running=len(self._tasks),
            num_generated_tokens_total=self._counters["generated"],
            num_prompt_tokens_total=self._counters["prompt"],
            num_cached_tokens_total=self._counters["cached"],
        )

    def _forget(self, request_id: str, task: asyncio.Task[None], stream: RequestStream) -> None:
        self._tasks.pop(request_id, None)
        if task.cancelled():  # cancelled before it ran: its own handler never put the last delta
            stream.put_nowait(Delta(text="", finish_reason=FinishReason.ABORT))

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
                await check_status(response)
                async for chunk in sse_chunks(response):
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


class _ForwardState:
    """One forwarded request: its output filter, what has been delivered and what the upstream reported."""

    def __init__(self, request: GenerationRequest, api: UpstreamAPI) -> None:
        self.api = api
        self.chat = api is UpstreamAPI.CHAT
        self.logprobs = request.logprobs is not None
        self.filter = TextFilter(request.sampling.stop, request.output_replacements)
        self.num_deltas = 0
        self.num_generated = 0
        self.num_prompt = 0
        self.num_cached = 0
        self.finish: FinishReason | None = None

    def take(self, chunk: dict[str, Any], stream: RequestStream) -> bool:
        """Deliver one chunk's text; False once a stop string ended the output."""
        if "error" in chunk:
            raise UpstreamFailure(f"error in the stream: {error_message(chunk)}")
        self._take_usage(chunk.get("usage"))
        choices = chunk.get("choices") or []
        if not choices:
            return True
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        logprobs = chunk_logprobs(choice, self.api) if self.logprobs else ()
        if text or logprobs:
            self.num_generated += len(logprobs) or 1
            self.num_deltas += 1
            text = self.filter.push(str(text or ""))
            stream.put_nowait(Delta(text=text, num_generated_tokens=self.num_generated, logprobs=logprobs))
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
