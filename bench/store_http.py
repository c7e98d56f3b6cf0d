"""What the conversation stores add to a chat turn through the HTTP server: memory vs SQLite vs Redis, side by side.

    PYTHONPATH=src python bench/store_http.py
    PYTHONPATH=src python bench/store_http.py --concurrency 8,32 --turns 12 --rounds 3 --think-ms 200

One ``chatstream serve --mock`` per store (``memory://``, a SQLite file in a temp dir, a private redis-server),
all started first and left idle while another is measured. For each number of concurrent chats, each round measures
the stores one after the other, in an order that rotates from round to round (so that a busy moment of the machine,
or being first, hits all three alike): ``concurrency`` chats,
each its own browser (cookie jar), each ``--turns`` turns of /chat_stream with the echo mock (``--tokens`` words at
``--token-ms`` each, the same generation for every store) and a pause of about ``--think-ms`` between two turns. A
turn's latency is from sending the request to the end of the streamed answer, so it includes what the store does
for the turn: read the session, load and rebuild the conversation, commit the turn before the last chunk, write the
session. The table shows p50 / p99 per store and what SQLite and Redis add to the memory store's p50 and p99.
Results go to bench/results/store_http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.serve_process import ServeProcess, start_serve  # noqa: E402

from bench.stats import percentile  # noqa: E402
from bench.store_latency import _machine, _redis_url  # noqa: E402

EOS = "<::EOS::>"


def main() -> None:
    args = _parse_args()
    load_before = os.getloadavg()
    with (
        _redis_url(args.redis_url) as redis_url,
        tempfile.TemporaryDirectory() as tmp,
        _servers(tmp, redis_url, args.token_ms / 1000) as urls,
    ):
        results = asyncio.run(_run_all(urls, args))
    _print_table(results)
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**_machine(), "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]}
    settings = {**vars(args), "out": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)}
    out.write_text(json.dumps({"settings": settings, "machine": machine, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {out}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="8,32", help="comma-separated numbers of concurrent chats")
    parser.add_argument("--turns", type=int, default=12, help="turns per chat")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per number of chats (stores interleaved)")
    parser.add_argument("--tokens", type=int, default=8, help="words of each question (the echo mock repeats them)")
    parser.add_argument("--token-ms", type=float, default=10.0, help="mock time per token")
    parser.add_argument("--think-ms", type=float, default=200.0, help="mean pause between a chat's turns")
    parser.add_argument("--redis-url", default=None, help="an existing Redis (its database gets test keys)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_http.json"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    return args


@contextlib.contextmanager
def _servers(tmp: str, redis_url: str | None, token_sec: float) -> Iterator[dict[str, str]]:
    stores = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/bench.db"}
    if redis_url is not None:
        stores["redis"] = redis_url
    started: list[ServeProcess] = []
    try:
        urls = {}
        for name, store in stores.items():
            server = start_serve(
                *("--store", store, "--data-dir", f"{tmp}/{name}", "--mock-type", "echo"),
                *("--mock-time-per-token", str(token_sec)),
                *("--max-concurrency", "64", "--max-queue", "256"),
            )
            started.append(server)
            urls[name] = server.url
        yield urls
    finally:
        for server in started:
            server.stop()


async def _run_all(urls: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    samples: dict[tuple[str, int], list[float]] = {(name, c): [] for name in urls for c in args.concurrency}
    for concurrency in args.concurrency:
        for round_index in range(args.rounds):
            names = list(urls)
            shift = round_index % len(names)  # each store goes first as often as the others (what runs first is slower)
            for name in names[shift:] + names[:shift]:
                url = urls[name]
                latencies = await _round(url, concurrency, args, seed=round_index)
                samples[(name, concurrency)].extend(latencies)
                p50 = percentile(latencies, 50) or 0.0
                print(f"chats {concurrency:>3} round {round_index + 1} {name:>6}: p50 {p50:.1f} ms", flush=True)
    return _summarise(samples, args)


async def _round(url: str, concurrency: int, args: argparse.Namespace, seed: int) -> list[float]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    await asyncio.gather(*(_chat(url, f"{seed}-{i}", args, latencies, limits) for i in range(concurrency)))
    return latencies


async def _chat(url: str, name: str, args: argparse.Namespace, latencies: list[float], limits: httpx.Limits) -> None:
    pauses = random.Random(name)
    question = " ".join(f"{name}w{i}" for i in range(args.tokens))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as browser:  # its own cookie jar
        for _turn in range(args.turns):
            await asyncio.sleep(args.think_ms / 1000 * pauses.uniform(0.5, 1.5))
            started = time.perf_counter()
            response = await browser.post("/chat_stream", json={"user_input": question})
            if response.status_code != 200 or not response.text.endswith(EOS):
                raise RuntimeError(f"turn failed: {response.status_code} {response.text[:200]}")
            latencies.append((time.perf_counter() - started) * 1000)


def _summarise(samples: dict[tuple[str, int], list[float]], args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for (name, concurrency), latencies in samples.items():
        memory = samples[("memory", concurrency)]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        base50, base99 = percentile(memory, 50), percentile(memory, 99)
        results.append(
            {
                "store": name,
                "concurrency": concurrency,
                "turns": len(latencies),
                "p50_ms": p50,
                "p99_ms": p99,
                "added_p50_ms": None if p50 is None or base50 is None else p50 - base50,
                "added_p99_ms": None if p99 is None or base99 is None else p99 - base99,
            }
        )
    return results


def _print_table(results: list[dict[str, Any]]) -> None:
    print("\nturn latency through the HTTP server, ms (p50 / p99), and what each store adds to memory's")
    print(f"{'chats':>5}  {'store':>6}  {'turns':>5}  {'p50':>7}  {'p99':>7}  {'+p50':>7}  {'+p99':>7}")
    for r in results:
        print(
            f"{r['concurrency']:>5}  {r['store']:>6}  {r['turns']:>5}  {r['p50_ms']:>7.1f}  {r['p99_ms']:>7.1f}  "
            f"{r['added_p50_ms']:>7.1f}  {r['added_p99_ms']:>7.1f}"
        )


if __name__ == "__main__":
    main()
