"""Scenarios of everyday chat traffic, on the OpenAI protocol every server speaks: a system prompt shared by many
users, and long prompts joining a batch of running streams.

- **shared_prefix**: ``users`` users whose chats start with the same ~``system_tokens``-token system prompt, each with
  a question of its own, ``new_tokens`` answer tokens. Per round a fresh system prompt (tagged with the round, so no
  server reuses an earlier round's): first all users at once with a system prompt no server has seen (*cold*), then
  all users again with new questions (*warm*: the system prompt was sent before). TTFT p50/p99 of each phase; the
  server's ``cached_tokens`` where it reports them.
- **long_joiners**: ``streams`` chats stream long answers; once every one of them streams, ``joiners`` users send
  ~``joiner_tokens``-token prompts at once. The running streams' inter-chunk gaps before the joiners arrived and
  while they were prefilled (until the last joiner's first token), and the joiners' TTFT; ``gap_ratio`` is the
  gap p99 while they join over the usual gap (p50 before they came).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from bench.load import OpenAITarget, RequestResult, TokenCounter, openai_chat
from bench.scenarios import Endpoint
from bench.stats import median_of_dicts, percentile

_WORDS = (
    "the",
    "model",
    "server",
    "answers",
    "questions",
    "about",
    "products",
    "orders",
    "shipping",
    "returns",
    "warranty",
    "billing",
    "accounts",
    "users",
    "support",
    "policy",
    "language",
    "clearly",
    "politely",
    "briefly",
    "always",
    "never",
    "customer",
    "request",
    "reply",
    "history",
    "context",
    "assistant",
    "guideline",
    "example",
    "step",
    "detail",
    "summary",
    "price",
    "discount",
    "delivery",
    "address",
    "payment",
    "refund",
    "issue",
)


def filler_text(seed: int, tokens: int, count_tokens: TokenCounter) -> str:
    """Deterministic English-like text of about ``tokens`` tokens (by ``count_tokens``), different per ``seed``."""
    rng = random.Random(seed)
    sentences: list[str] = []
    text = ""
    while not text or count_tokens(text) < tokens:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
        if len(sentences) % 8 == 0 or count_tokens(" ".join(sentences[-8:])) > 40:
            text = " ".join(sentences)
    return text


@dataclass(frozen=True)
class ChatScenarioConfig:
    """The knobs of both scenarios (the issue's sizes by default)."""

    rounds: int = 3
    users: int = 8
    system_tokens: int = 800
    new_tokens: int = 64
    streams: int = 8
    stream_tokens: int = 384
    joiners: int = 4
    joiner_tokens: int = 1500
    timeout_s: float = 600.0


def _ms(values: Sequence[float]) -> list[float]:
    return [v * 1000.0 for v in values]


def _ttft_summary(results: Sequence[RequestResult]) -> dict[str, float | None]:
    done = [r for r in results if r.ok and r.ttft_s is not None]
    ttfts = _ms([r.ttft_s for r in done if r.ttft_s is not None])
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    prompt = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    return {
        "completed": float(len(done)),
        "failed": float(len(results) - len(done)),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "prompt_tokens_mean": sum(prompt) / len(prompt) if prompt else None,
        "cached_tokens_mean": sum(cached) / len(cached) if cached else None,
    }


async def _chats(endpoint: Endpoint, target: OpenAITarget, conversations: Sequence[list[dict[str, str]]]) -> list[Any]:
    assert endpoint.shared is not None
    client = endpoint.shared
    return list(await asyncio.gather(*(openai_chat(client, target, m, endpoint.count_tokens) for m in conversations)))


async def shared_prefix(endpoint: Endpoint, config: ChatScenarioConfig) -> dict[str, Any]:
    """Cold and warm TTFT of ``users`` chats sharing a system prompt; medians over rounds."""
    assert endpoint.openai is not None
    target = replace(endpoint.openai, max_tokens=config.new_tokens)
    base = filler_text(1, config.system_tokens, endpoint.count_tokens)
    rounds = []
    for index in range(config.rounds):
        system = f"You are assistant number {index + 1} of the support team. {base}"
        phases = {}
        for phase in ("cold", "warm"):
            chats = [
                [{"role": "system", "content": system}, {"role": "user", "content": f"Question {phase} {user}: "
                 f"{filler_text(1000 * index + 10 * user + (phase == 'warm'), 24, endpoint.count_tokens)}?"}]
                for user in range(config.users)
            ]  # fmt: skip
            results = await asyncio.wait_for(_chats(endpoint, target, chats), config.timeout_s)
            phases[phase] = _ttft_summary(results)
        rounds.append({f"{phase}_{key}": value for phase, summary in phases.items() for key, value in summary.items()})
    return {"config": _config_dict(config), "median": median_of_dicts(rounds), "rounds": rounds}


async def long_joiners(endpoint: Endpoint, config: ChatScenarioConfig) -> dict[str, Any]:
    """Running streams' gaps before and while long prompts join, and the joiners' TTFT; medians over rounds."""
    assert endpoint.openai is not None
    rounds = []
    for index in range(config.rounds):
        rounds.append(await asyncio.wait_for(_joiner_round(endpoint, config, index), config.timeout_s))
    return {"config": _config_dict(config), "median": median_of_dicts(rounds), "rounds": rounds}


async def _joiner_round(endpoint: Endpoint, config: ChatScenarioConfig, index: int) -> dict[str, float | None]:
    assert endpoint.openai is not None and endpoint.shared is not None
    stream_target = replace(endpoint.openai, max_tokens=config.stream_tokens)
    joiner_target = replace(endpoint.openai, max_tokens=config.new_tokens)
    story = "tell me a long story about a lighthouse keeper."
    prompts = [f"Round {index} chat {i}: {story}" for i in range(config.streams)]
    # The joiners' texts are made before the streams start: tokenizing them blocks this event loop, and a block
    # while the streams run would read as a gap in their arrivals.
    texts = [filler_text(100 + 10 * index + j, config.joiner_tokens, endpoint.count_tokens) for j in range(4)]
    streams = [RequestResult() for _ in prompts]
    running = [
        asyncio.create_task(
            openai_chat(endpoint.shared, stream_target, [{"role": "user", "content": p}], endpoint.count_tokens, r)
        )
        for p, r in zip(prompts, streams, strict=True)
    ]
    await _until_all_stream(streams, running, config.timeout_s)
    chats = [[{"role": "user", "content": f"Summarize this text:\n{texts[j % 4]}"}] for j in range(config.joiners)]
    joined_at = time.perf_counter()
    joiners = await _chats(endpoint, joiner_target, chats)
    await asyncio.gather(*running)
    firsts = [r.arrivals[0] for r in joiners if r.ok and r.arrivals]
    window_end = max(firsts) if firsts else time.perf_counter()
    before, during = _gaps(streams, joined_at, window_end)
    summary = _ttft_summary(joiners)
    return {
        "joiner_ttft_p50_ms": summary["ttft_p50_ms"],
        "joiner_ttft_max_ms": max(_ms([r.ttft_s for r in joiners if r.ttft_s is not None]), default=None),
        "joiner_prompt_tokens_mean": summary["prompt_tokens_mean"],
        "gap_before_p50_ms": percentile(before, 50),
        "gap_before_p99_ms": percentile(before, 99),
        "gap_during_p50_ms": percentile(during, 50),
        "gap_during_p99_ms": percentile(during, 99),
        "gap_during_max_ms": max(during, default=None),
        "gap_ratio": _ratio(percentile(during, 99), percentile(before, 50)),
        "streams_completed": float(sum(r.ok for r in streams)),
        "streams_outlived_window": float(sum(bool(r.arrivals) and r.arrivals[-1] > window_end for r in streams)),
        "joiners_completed": summary["completed"],
    }


async def _until_all_stream(
    results: Sequence[RequestResult], tasks: Sequence[asyncio.Task[Any]], timeout_s: float, chunks: int = 8
) -> None:
    """Wait until every stream has sent ``chunks`` pieces of text (or ended)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if all(len(r.arrivals) >= chunks or t.done() for r, t in zip(results, tasks, strict=True)):
            return
        await asyncio.sleep(0.02)


def _gaps(streams: Sequence[RequestResult], joined_at: float, window_end: float) -> tuple[list[float], list[float]]:
    """Inter-chunk gaps (ms) of the running streams that ended before the joiners arrived, and while they joined."""
    before, during = [], []
    for result in streams:
        for earlier, later in zip(result.arrivals, result.arrivals[1:], strict=False):
            gap = (later - earlier) * 1000.0
            if later <= joined_at:
                before.append(gap)
            elif later <= window_end or earlier < window_end:
                during.append(gap)
    return before, during


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _config_dict(config: ChatScenarioConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in config.__dataclass_fields__}
