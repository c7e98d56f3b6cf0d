"""The multi-turn load shared by the scale-out benchmarks: N conversations at once, the turns of each one after
another, over the OpenAI streaming API; per turn the time to first token and the prompt's cached tokens."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from bench.stats import percentile

Turn = dict[str, Any]


async def _turn(client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int) -> Turn:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, ttft, text, usage = time.monotonic(), None, "", {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.monotonic() - sent
                text += piece
    messages.append({"role": "assistant", "content": text})
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"ttft": ttft, "prompt": usage.get("prompt_tokens", 0), "cached": cached}


async def _conversation(client: httpx.AsyncClient, model: str, index: int, turns: int, max_tokens: int) -> list[Turn]:
    messages = [{"role": "system", "content": f"You are assistant number {index}."}]
    results = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Conversation {index}, question {turn}: tell me more."})
        results.append(await _turn(client, model, messages, max_tokens))
    return results


def run_conversations(url: str, model: str, conversations: int, turns: int, max_tokens: int) -> dict[str, Any]:
    """Run the load against ``url``; the summary: wall time, cache hits of turns 2+ (the share of their prompt tokens
    that were cached, and the share of those turns with any), TTFT p50/p90 over all turns."""

    async def run() -> list[list[Turn]]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            jobs = (_conversation(client, model, i, turns, max_tokens) for i in range(conversations))
            return list(await asyncio.gather(*jobs))

    started = time.monotonic()
    results = asyncio.run(run())
    later = [t for c in results for t in c[1:]]
    ttfts = [t["ttft"] for c in results for t in c if t["ttft"] is not None]
    return {
        "wall_s": round(time.monotonic() - started, 2),
        "cached_token_share": round(sum(t["cached"] for t in later) / max(1, sum(t["prompt"] for t in later)), 3),
        "turns_with_hit": round(sum(1 for t in later if t["cached"] > 0) / max(1, len(later)), 3),
        "ttft_p50_ms": round(1000 * (percentile(ttfts, 50) or 0), 1),
        "ttft_p90_ms": round(1000 * (percentile(ttfts, 90) or 0), 1),
    }
