"""Per-turn latency of the conversation stores: memory vs SQLite vs Redis, side by side in one run.

    PYTHONPATH=src python bench/store_latency.py
    PYTHONPATH=src python bench/store_latency.py --concurrency 8,32 --turns 50 --history 10 --gap-ms 0,200

Each of ``concurrency`` tasks is one chat (its own owner, session and conversation, pre-filled with ``--history``
turns) and does ``--turns`` turns, each the store work of one chat turn as the request handler will do it: read the
session, load the conversation, rebuild the prompt object, add the question and the answer, write the turn (an
atomic append), save the session. No model runs: between two turns a chat waits ``--gap-ms`` (a stand-in for the
generation; 0: back to back, every chat keeps the store busy, which measures the stores saturated). Without
``--redis-url`` a private redis-server is started on a free port (no persistence) when one is installed.
Latencies are per operation and per turn (p50 / p99, milliseconds); results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.stats import percentile  # noqa: E402
from chatstream.prompts import ChatPromptTogetherRedPajamaINCITEChat  # noqa: E402
from chatstream.sessions import Store, open_store  # noqa: E402
from chatstream.sessions.prompt_bridge import conversation_to_prompt, new_conversation, save_prompt  # noqa: E402

PROMPT_CLASS = ChatPromptTogetherRedPajamaINCITEChat
QUESTION = "How do I keep a conversation when the server restarts? " * 2
ANSWER = "Keep it in a store that writes to disk or to a shared server, and commit each turn before replying. " * 4
OPERATIONS = ("session_get", "load", "append", "session_save", "turn")


def main() -> None:
    args = _parse_args()
    load_before = os.getloadavg()
    with _redis_url(args.redis_url) as redis_url, tempfile.TemporaryDirectory() as tmp:
        urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/bench.db"}
        if redis_url is not None:
            urls["redis"] = redis_url
        results = asyncio.run(_run_all(urls, args))
    _print_table(results)
    print(
        f"load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**_machine(), "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]}
    settings = {**vars(args), "out": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)}
    out.write_text(json.dumps({"settings": settings, "machine": machine, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {out}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="8,32", help="comma-separated numbers of concurrent chats")
    parser.add_argument("--turns", type=int, default=50, help="turns per chat (measured)")
    parser.add_argument("--history", type=int, default=10, help="turns already in each conversation")
    parser.add_argument("--gap-ms", default="0,200", help="comma-separated pauses between a chat's turns")
    parser.add_argument("--redis-url", default=None, help="an existing Redis (its database gets test keys)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_latency.json"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.gap_ms = [float(g) for g in str(args.gap_ms).split(",")]
    return args


async def _run_all(urls: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for gap_ms in args.gap_ms:
        for concurrency in args.concurrency:
            for name, url in urls.items():
                prefix = f"bench{time.monotonic_ns()}:"
                async with open_store(url, **({"prefix": prefix} if name == "redis" else {})) as store:
                    timings = await _run(store, concurrency, args.turns, args.history, gap_ms / 1000)
                results.append({"store": name, "concurrency": concurrency, "gap_ms": gap_ms, **_summarise(timings)})
    return results


async def _run(store: Store, concurrency: int, turns: int, history: int, gap: float) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    chats = [await _new_chat(store, f"owner{i}", history) for i in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(_chat(store, owner, cid, turns, gap, timings) for owner, cid in chats))
    timings["wall"] = [time.perf_counter() - started]
    return timings


async def _new_chat(store: Store, owner: str, history: int) -> tuple[str, str]:
    prompt = PROMPT_CLASS()
    for turn in range(history):
        prompt.add_requester_msg(f"{turn}: {QUESTION}")
        prompt.add_responder_msg(ANSWER)
    created = await store.conversations.create(new_conversation(owner, prompt))
    await store.sessions.save(f"session-{owner}", {"user_id": owner, "conversation_id": created.id})
    return owner, created.id


async def _chat(store: Store, owner: str, cid: str, turns: int, gap: float, timings: dict[str, list[float]]) -> None:
    pauses = random.Random(owner)  # reproducible, and spread so that the chats do not fall into step
    for turn in range(turns):
        await asyncio.sleep(gap * pauses.uniform(0.5, 1.5))
        t0 = time.perf_counter()
        session = await store.sessions.get(f"session-{owner}") or {}
        t1 = time.perf_counter()
        conversation = await store.conversations.get(owner, session.get("conversation_id", cid))
        t2 = time.perf_counter()
        prompt = conversation_to_prompt(conversation, PROMPT_CLASS)
        prompt.add_requester_msg(f"{turn}: {QUESTION}")
        prompt.add_responder_msg(None)
        prompt.set_responder_last_msg(ANSWER)
        t3 = time.perf_counter()
        await save_prompt(store.conversations, conversation, prompt, generation_params={"temperature": 0.7})
        t4 = time.perf_counter()
        await store.sessions.save(f"session-{owner}", {**session, "generation_params": {"temperature": 0.7}})
        t5 = time.perf_counter()
        for op, seconds in zip(OPERATIONS, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t5 - t0), strict=True):
            timings[op].append(seconds * 1000)


def _summarise(timings: dict[str, list[float]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for op in OPERATIONS:
        summary[f"{op}_p50_ms"] = percentile(timings[op], 50)
        summary[f"{op}_p99_ms"] = percentile(timings[op], 99)
    summary["turns_per_s"] = len(timings["turn"]) / timings["wall"][0]
    return summary


def _print_table(results: list[dict[str, Any]]) -> None:
    header = ["gap ms", "chats", "store"] + [f"{op} p50/p99" for op in OPERATIONS] + ["turns/s"]
    rows = [header]
    for r in results:
        cells = [f"{r[f'{op}_p50_ms']:.2f}/{r[f'{op}_p99_ms']:.2f}" for op in OPERATIONS]
        rows.append([f"{r['gap_ms']:.0f}", str(r["concurrency"]), r["store"], *cells, f"{r['turns_per_s']:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("per-turn store latency in ms (p50/p99)")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


@contextlib.contextmanager
def _redis_url(given: str | None) -> Iterator[str | None]:
    """The given URL, or a private redis-server's (None when none is installed)."""
    executable = shutil.which("redis-server")
    if given is not None or executable is None:
        if given is None:
            print("redis-server is not installed: the Redis store is left out", file=sys.stderr)
        yield given
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen([*command, "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            _wait_for_port(port)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen on port {port}")


def _machine() -> dict[str, Any]:
    import sqlite3

    import aiosqlite
    import redis

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
        "aiosqlite": aiosqlite.__version__,
        "redis_py": redis.__version__,
        "redis_server": _redis_server_version(),
    }


def _redis_server_version() -> str | None:
    executable = shutil.which("redis-server")
    if executable is None:
        return None
    return subprocess.run([executable, "--version"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    main()
