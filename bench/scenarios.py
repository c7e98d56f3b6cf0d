"""The benchmark's scenarios against one running server: throughput, responsiveness under load, multi-turn."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.load import (
    DEFAULT_TIMEOUT,
    OpenAITarget,
    RequestFactory,
    RequestResult,
    TokenCounter,
    native_chat,
    openai_chat,
    probe_endpoint,
    run_round,
    summarize_round,
)
from bench.stats import median_of_dicts, percentile

logger = logging.getLogger(__name__)

RssReader = Callable[[], float | None]


@dataclass(frozen=True)
class BenchConfig:
    """Every knob of one benchmark run (the same for every server)."""

    concurrencies: tuple[int, ...] = (1, 8, 32)
    rounds: int = 3
    max_tokens: int = 128
    requests_per_client: int = 1
    round_timeout_s: float = 600.0
    warmup: bool = True
    health_chats: int = 32
    health_interval_s: float = 0.05
    mt_conversations: int = 8
    mt_turns: int = 10
    mt_max_tokens: int = 150

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrencies must be positive, got {self.concurrencies!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds!r}")
        if self.max_tokens < 1 or self.mt_max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r} / {self.mt_max_tokens!r}")


@dataclass
class Endpoint:
    """How the load client talks to one server on one protocol."""

    base_url: str
    protocol: str  # "openai" | "native"
    count_tokens: TokenCounter
    openai: OpenAITarget | None = None
    shared: httpx.AsyncClient | None = field(default=None, repr=False)

    def single_turn(self, prompt: str) -> RequestFactory:
        """A factory for one fresh single-turn chat (a new session for the native protocol)."""
        if self.protocol == "openai":
            assert self.openai is not None and self.shared is not None
            target, client = self.openai, self.shared
            return lambda: openai_chat(client, target, [{"role": "user", "content": prompt}], self.count_tokens)

        async def native() -> RequestResult:
            async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
                return await native_chat(client, self.base_url, prompt, self.count_tokens)

        return native


async def _sample_rss(read_rss: RssReader, stop: asyncio.Event, interval_s: float = 0.5) -> float | None:
    """Peak RSS seen until ``stop`` is set."""
    peak: float | None = None
    while True:
        value = await asyncio.to_thread(read_rss)
        if value is not None and (peak is None or value > peak):
            peak = value
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
            return peak
        except TimeoutError:
            continue


async def _with_rss(read_rss: RssReader, work: Awaitable[Any]) -> tuple[Any, float | None]:
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(read_rss, stop))
    try:
        result = await work
    finally:
        stop.set()
    return result, await sampler


async def warm_up(endpoint: Endpoint, prompts: Sequence[str], concurrency: int, timeout_s: float) -> None:
    """One lone request, then one full-width round; results are discarded."""
    await run_round([endpoint.single_turn(prompts[0])], 1, timeout_s)
    factories = [endpoint.single_turn(prompts[i % len(prompts)]) for i in range(concurrency)]
    outcome = await run_round(factories, concurrency, timeout_s)
    failed = [r.error for r in outcome.results if not r.ok]
    if failed:
        logger.warning("warm-up on %s: %d requests failed, first: %s", endpoint.protocol, len(failed), failed[0])


async def throughput(
    endpoint: Endpoint, prompts: Sequence[str], config: BenchConfig, read_rss: RssReader
) -> dict[str, Any]:
    """For each concurrency: ``rounds`` rounds of ``concurrency * requests_per_client`` chats; medians over rounds."""
    by_concurrency: dict[str, Any] = {}
    for concurrency in config.concurrencies:
        rounds: list[dict[str, float | None]] = []
        for index in range(config.rounds):
            count = concurrency * config.requests_per_client
            # Rotate the prompts between rounds so each round is a different, fixed slice of the set.
            offset = index * count
            factories = [endpoint.single_turn(prompts[(offset + i) % len(prompts)]) for i in range(count)]
            outcome, rss_peak = await _with_rss(read_rss, run_round(factories, concurrency, config.round_timeout_s))
            summary = summarize_round(outcome)
            summary["rss_peak_mb"] = rss_peak
            errors = [r.error for r in outcome.results if r.error]
            if errors:
                logger.warning(
                    "%s c=%d round %d: %d errors, first: %s",
                    endpoint.protocol,
                    concurrency,
                    index,
                    len(errors),
                    errors[0],
                )
            logger.info(
                "%s c=%d round %d: %.1f tok/s, ttft p50 %s ms",
                endpoint.protocol,
                concurrency,
                index,
                summary["tokens_per_s"] or 0.0,
                _fmt(summary["ttft_p50_ms"]),
            )
            rounds.append(summary)
        by_concurrency[str(concurrency)] = {"median": median_of_dicts(rounds), "rounds": rounds}
    return by_concurrency


async def responsiveness(endpoint: Endpoint, prompts: Sequence[str], config: BenchConfig) -> dict[str, Any]:
    """GET /health latency while ``health_chats`` chats stream at once."""
    stop = asyncio.Event()
    factories = [endpoint.single_turn(prompts[i % len(prompts)]) for i in range(config.health_chats)]
    max_probes = int(config.round_timeout_s / config.health_interval_s) + 1
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
        prober = asyncio.create_task(
            probe_endpoint(client, f"{endpoint.base_url}/health", stop, config.health_interval_s, max_probes)
        )
        outcome = await run_round(factories, config.health_chats, config.round_timeout_s)
        stop.set()
        probe = await prober
    return {
        "protocol": endpoint.protocol,
        "chats": config.health_chats,
        "chats_completed": sum(1 for r in outcome.results if r.ok),
        "probes": len(probe.latencies_ms),
        "probe_failures": probe.failures,
        "health_p50_ms": percentile(probe.latencies_ms, 50),
        "health_p99_ms": percentile(probe.latencies_ms, 99),
        "health_max_ms": max(probe.latencies_ms) if probe.latencies_ms else None,
    }


class _Conversation:
    """One multi-turn conversation: a cookie jar for the native protocol, the message list for OpenAI."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.client = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        self.messages: list[dict[str, str]] = []

    async def turn(self, user_input: str) -> RequestResult:
        endpoint = self.endpoint
        if endpoint.protocol == "native":
            return await native_chat(self.client, endpoint.base_url, user_input, endpoint.count_tokens)
        assert endpoint.openai is not None
        self.messages.append({"role": "user", "content": user_input})
        result = await openai_chat(self.client, endpoint.openai, self.messages, endpoint.count_tokens)
        self.messages.append({"role": "assistant", "content": result.text})
        return result


async def multi_turn(
    endpoint: Endpoint, openers: Sequence[str], follow_ups: Sequence[str], config: BenchConfig, read_rss: RssReader
) -> dict[str, Any]:
    """``mt_conversations`` conversations advance turn by turn together; TTFT per turn and RSS after each turn.

    The whole run is repeated ``rounds`` times with fresh conversations (new sessions; every opener tagged with its
    round, so no server can reuse an earlier round's cache); each turn's figures are the medians over the rounds.
    """
    rounds = []
    for index in range(config.rounds):
        rounds.append(await _conversation_round(endpoint, openers, follow_ups, config, read_rss, index))
    per_turn = []
    for turn in range(config.mt_turns):
        summaries = [round_turns[turn] for round_turns in rounds]
        merged = median_of_dicts([{k: v for k, v in s.items() if isinstance(v, int | float)} for s in summaries])
        merged["turn"] = turn + 1
        merged["ttft_p50_ms_per_round"] = [s["ttft_p50_ms"] for s in summaries]
        per_turn.append(merged)
    first, last = per_turn[0]["ttft_p50_ms"], per_turn[-1]["ttft_p50_ms"]
    return {
        "protocol": endpoint.protocol,
        "conversations": config.mt_conversations,
        "rounds": config.rounds,
        "turns": per_turn,
        "ttft_last_over_first": (last / first) if first and last is not None else None,
    }


async def _conversation_round(
    endpoint: Endpoint,
    openers: Sequence[str],
    follow_ups: Sequence[str],
    config: BenchConfig,
    read_rss: RssReader,
    round_index: int,
) -> list[dict[str, Any]]:
    conversations = [_Conversation(endpoint) for _ in range(config.mt_conversations)]
    per_turn: list[dict[str, Any]] = []
    try:
        for turn in range(config.mt_turns):
            inputs = [
                f"(conversation {round_index + 1}.{i + 1}) {openers[i % len(openers)]}"
                if turn == 0
                else follow_ups[(turn - 1) % len(follow_ups)]
                for i in range(len(conversations))
            ]
            began = time.perf_counter()
            results = await asyncio.wait_for(
                asyncio.gather(*(c.turn(text) for c, text in zip(conversations, inputs, strict=True))),
                timeout=config.round_timeout_s,
            )
            per_turn.append(_turn_summary(turn + 1, results, time.perf_counter() - began, read_rss()))
            logger.info(
                "multi-turn %s round %d turn %d: ttft p50 %s ms",
                endpoint.protocol,
                round_index,
                turn + 1,
                _fmt(per_turn[-1]["ttft_p50_ms"]),
            )
    finally:
        await asyncio.gather(*(c.client.aclose() for c in conversations))
    return per_turn


def _turn_summary(turn: int, results: Sequence[RequestResult], wall_s: float, rss_mb: float | None) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000.0 for r in done if r.ttft_s is not None]
    prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    return {
        "turn": turn,
        "completed": len(done),
        "failed": len(results) - len(done),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "output_tokens_mean": (sum(r.output_tokens for r in done) / len(done)) if done else None,
        "prompt_tokens_mean": (sum(prompt_tokens) / len(prompt_tokens)) if prompt_tokens else None,
        "wall_s": wall_s,
        "rss_mb": rss_mb,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
