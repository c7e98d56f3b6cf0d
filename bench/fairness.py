"""B's time to first token while user A's burst waits, with and without fair queueing.

Two ``chatstream serve --mock`` servers (the admission code is what is measured, so the mock engine stands in for a
model): one with the default fair queue, one with ``--no-fair-queue`` (first come, first served). In each round,
user A (one session) sends a burst of requests at once; once they are all in, user B (another session) sends one.
B's TTFT is the time from sending to the first piece of answer text.

Run: ``PYTHONPATH=src python -m bench.fairness [--burst 40] [--rounds 3]``; results in
``bench/results/fairness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

from bench.servers import free_port
from bench.stats import median

RESULTS = Path(__file__).with_name("results") / "fairness.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
AGENT = {"X-FastSession-Skip": "skip"}


def start_server(fair: bool, concurrency: int, time_per_token: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    args = [sys.executable, "-m", "chatstream", "serve", "--mock", "--mock-type", "round", "--log-level", "warning"]
    args += ["--mock-time-per-token", str(time_per_token), "--max-concurrency", str(concurrency), "--max-queue", "256"]
    args += ["--port", str(port)] + ([] if fair else ["--no-fair-queue"])
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=AGENT), timeout=2):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


async def chat(client: httpx.AsyncClient) -> float:
    """Seconds to the first piece of answer text of one /chat_stream turn (then read to the end)."""
    sent = time.monotonic()
    first: float | None = None
    async with client.stream("POST", "/chat_stream", json={"user_input": "hello"}) as response:
        async for text in response.aiter_text():
            if first is None and text.replace("<::EOS::>", ""):
                first = time.monotonic() - sent
    return first if first is not None else float("nan")


async def session(url: str, burst: int) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=burst + 5))
    await client.post("/clear_context")  # the session cookie: one user
    return client


async def in_system(ops: httpx.AsyncClient) -> int:
    """Requests running or waiting."""
    worker = (await ops.get("/get_load")).json()["chatstream_workers"][0]
    return int(worker["processing"]) + int(worker["waiting"])


async def one_round(url: str, burst: int) -> dict[str, float]:
    user_a, user_b = await session(url, burst), await session(url, burst)
    async with httpx.AsyncClient(base_url=url, headers=AGENT) as ops:
        a_requests = [asyncio.ensure_future(chat(user_a)) for _ in range(burst)]
        while await in_system(ops) + sum(task.done() for task in a_requests) < burst:  # all of A's are in
            await asyncio.sleep(0.005)
        b_ttft = await chat(user_b)
        a_ttfts = await asyncio.gather(*a_requests)
    await user_a.aclose()
    await user_b.aclose()
    return {"b_ttft_s": b_ttft, "a_median_ttft_s": sorted(a_ttfts)[len(a_ttfts) // 2]}


async def measure(fair: bool, burst: int, rounds: int, concurrency: int, time_per_token: float) -> dict[str, Any]:
    process, url = start_server(fair, concurrency, time_per_token)
    try:
        results = [await one_round(url, burst) for _ in range(rounds)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {
        "b_ttft_s": [round(r["b_ttft_s"], 3) for r in results],
        "b_ttft_median_s": round(median([r["b_ttft_s"] for r in results]) or 0.0, 3),
        "a_median_ttft_s": round(median([r["a_median_ttft_s"] for r in results]) or 0.0, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--time-per-token", type=float, default=0.02)
    args = parser.parse_args()
    report = {
        "setup": {
            "engine": "mock (round answers)",
            "burst_of_a": args.burst,
            "max_concurrency": args.concurrency,
            "time_per_token_s": args.time_per_token,
            "rounds": args.rounds,
        },
        "fair": asyncio.run(measure(True, args.burst, args.rounds, args.concurrency, args.time_per_token)),
        "fifo": asyncio.run(measure(False, args.burst, args.rounds, args.concurrency, args.time_per_token)),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"B's TTFT behind A's burst of {args.burst} ({args.concurrency} slots, median of {args.rounds} rounds):")
    print(f"  fair queue (default): {report['fair']['b_ttft_median_s']:.3f} s   {report['fair']['b_ttft_s']}")
    print(f"  first come, first served: {report['fifo']['b_ttft_median_s']:.3f} s   {report['fifo']['b_ttft_s']}")


if __name__ == "__main__":
    main()
