"""The load client: one small async httpx client for both protocols, so every server is timed by the same code.

A request's timeline is recorded where the bytes arrive: TTFT is the time from sending to the first piece of answer
text, inter-token latency (ITL) the gaps between later pieces of text (an SSE event, or a native cumulative snapshot
that grew). Output tokens come from the server's ``usage`` on the OpenAI protocol and from the model's tokenizer on
the received text for the native one (which has no usage field).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.protocols import NativeStreamDecoder, SseDecoder, native_rejection, parse_openai_event
from bench.stats import percentile

TokenCounter = Callable[[str], int]
RequestFactory = Callable[[], Awaitable["RequestResult"]]

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=30.0, pool=600.0)


@dataclass
class RequestResult:
    """Timeline and outcome of one streamed request."""

    ok: bool = False
    rejected: bool = False
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    arrivals: list[float] = field(default_factory=list)
    """``time.perf_counter()`` of every piece of answer text (the first is the TTFT's end)."""
    arrival_chars: list[int] = field(default_factory=list)
    """OpenAI streams: the characters of answer text received so far at each of ``arrivals``."""


class _Timeline:
    """Collects arrival times of answer text for one request."""

    def __init__(self, result: RequestResult | None = None) -> None:
        self.start = time.perf_counter()
        self.last: float | None = None
        self.result = result if result is not None else RequestResult()

    def text_arrived(self) -> None:
        now = time.perf_counter()
        self.result.arrivals.append(now)
        if self.last is None:
            self.result.ttft_s = now - self.start
        else:
            self.result.itl_s.append(now - self.last)
        self.last = now

    def finish(self) -> RequestResult:
        self.result.e2e_s = time.perf_counter() - self.start
        return self.result


@dataclass(frozen=True)
class OpenAITarget:
    """Where and how to send OpenAI chat-completions requests."""

    base_url: str
    model: str
    max_tokens: int
    extra_body: dict[str, Any] = field(default_factory=dict)


async def openai_chat(
    client: httpx.AsyncClient,
    target: OpenAITarget,
    messages: Sequence[dict[str, str]],
    count_tokens: TokenCounter,
    result: RequestResult | None = None,
) -> RequestResult:
    """Stream one greedy chat completion and time it (into ``result`` when given, so a caller can watch it)."""
    body: dict[str, Any] = {
        "model": target.model,
        "messages": list(messages),
        "max_tokens": target.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **target.extra_body,
    }
    timeline = _Timeline(result)
    result = timeline.result
    try:
        async with client.stream("POST", f"{target.base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.rejected = response.status_code == 429
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timeline.finish()
            await _read_sse(response, timeline, count_tokens)
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return timeline.finish()


async def _read_sse(response: httpx.Response, timeline: _Timeline, count_tokens: TokenCounter) -> None:
    result = timeline.result
    decoder = SseDecoder()
    parts: list[str] = []
    chars = 0
    usage_tokens: int | None = None
    async for line in response.aiter_lines():
        data = decoder.feed_line(line)
        if data is None:
            continue
        chunk = parse_openai_event(data)
        if chunk.done:
            break
        if chunk.text:
            timeline.text_arrived()
            parts.append(chunk.text)
            chars += len(chunk.text)
            result.arrival_chars.append(chars)
        if chunk.completion_tokens is not None:
            usage_tokens = chunk.completion_tokens
            result.prompt_tokens = chunk.prompt_tokens
            result.cached_tokens = chunk.cached_tokens
    result.text = "".join(parts)
    result.output_tokens = usage_tokens if usage_tokens is not None else count_tokens(result.text)
    result.ok = True


async def native_chat(
    client: httpx.AsyncClient, base_url: str, user_input: str, count_tokens: TokenCounter
) -> RequestResult:
    """POST /chat_stream (the client's cookie jar carries the session) and time the cumulative stream."""
    timeline = _Timeline()
    result = timeline.result
    try:
        async with client.stream("POST", f"{base_url}/chat_stream", json={"user_input": user_input}) as response:
            if response.status_code != 200:
                result.rejected = response.status_code == 429
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timeline.finish()
            await _read_native(response, timeline)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return timeline.finish()
    if result.ok:
        result.output_tokens = count_tokens(result.text)
    return timeline.finish()


async def _read_native(response: httpx.Response, timeline: _Timeline) -> None:
    result = timeline.result
    decoder = NativeStreamDecoder()
    received: list[str] = []
    text = ""
    async for piece in response.aiter_text():
        received.append(piece)
        for snapshot in decoder.feed(piece):
            if snapshot and snapshot != text:
                timeline.text_arrived()
            text = snapshot
    rejection = native_rejection("".join(received)) if not text else None
    if rejection is not None:
        result.rejected = rejection == "too_many_requests"
        result.error = rejection
        return
    result.text = text
    result.ok = True


@dataclass
class RoundOutcome:
    """All results of one round plus its wall time."""

    results: list[RequestResult]
    wall_s: float
    timed_out: int = 0


async def run_round(factories: Sequence[RequestFactory], concurrency: int, timeout_s: float) -> RoundOutcome:
    """Run the requests with at most ``concurrency`` in flight; stop waiting after ``timeout_s``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    queue: asyncio.Queue[RequestFactory] = asyncio.Queue()
    for factory in factories:
        queue.put_nowait(factory)
    results: list[RequestResult] = []

    async def worker() -> None:
        while not queue.empty():
            factory = queue.get_nowait()
            results.append(await factory())

    start = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(factories)))]
    _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    return RoundOutcome(results=results, wall_s=wall, timed_out=len(factories) - len(results))


def summarize_round(outcome: RoundOutcome) -> dict[str, float | None]:
    """Aggregate tokens/s, TTFT and ITL percentiles (ms) and request counts for one round."""
    done = [r for r in outcome.results if r.ok]
    ttfts = [r.ttft_s * 1000.0 for r in done if r.ttft_s is not None]
    itls = [gap * 1000.0 for r in done for gap in r.itl_s]
    tokens = sum(r.output_tokens for r in done)
    return {
        "completed": float(len(done)),
        "rejected": float(sum(1 for r in outcome.results if r.rejected)),
        "failed": float(sum(1 for r in outcome.results if not r.ok and not r.rejected) + outcome.timed_out),
        "output_tokens": float(tokens),
        "output_tokens_mean": tokens / len(done) if done else None,
        "wall_s": outcome.wall_s,
        "tokens_per_s": tokens / outcome.wall_s if outcome.wall_s > 0 else None,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "itl_p50_ms": percentile(itls, 50),
        "itl_p99_ms": percentile(itls, 99),
    }


@dataclass
class ProbeResult:
    """Latencies of a cheap GET endpoint sampled while the server is under load."""

    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0


async def probe_endpoint(
    client: httpx.AsyncClient, url: str, stop: asyncio.Event, interval_s: float, max_probes: int
) -> ProbeResult:
    """GET ``url`` every ``interval_s`` until ``stop`` is set (at most ``max_probes`` times)."""
    probe = ProbeResult()
    for _ in range(max_probes):
        if stop.is_set():
            break
        begin = time.perf_counter()
        try:
            response = await client.get(url)
            if response.status_code == 200:
                probe.latencies_ms.append((time.perf_counter() - begin) * 1000.0)
            else:
                probe.failures += 1
        except httpx.HTTPError:
            probe.failures += 1
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
    return probe
