"""The in-process pool (``ChatStream(devices=[...])``): conversation-sticky routing against round-robin.

One run: the same multi-turn load (default 8 conversations x 6 turns, the conversations at once, the turns of each
one after another, over the OpenAI streaming API) through our server on 127.0.0.1, with a fresh pool of one engine
per device for each routing rule. Per rule: the prefix-cache hit rate of turns 2+ (cached prompt tokens / prompt
tokens, and the share of those turns with any hit), TTFT p50/p90, conversation moves, turns per engine.

    PYTHONPATH=src:. python -m bench.pool                                   # tiny test model, two engines on the CPU
    PYTHONPATH=src:. python -m bench.pool --model DIR --devices cuda:0,cuda:1 --max-tokens 64 --batch-size 16

Prints a table and writes JSON to bench/results/pool.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from tests.live_server import run_server

from bench.conversations import run_conversations
from chatstream import ChatStream
from chatstream.config import EngineConfig
from chatstream.pool import PoolConfig, PoolEngine, Routing
from chatstream.pool.devices import device_pool
from chatstream.server.app import create_app

RESULTS = Path(__file__).parent / "results" / "pool.json"
ROUTINGS = (Routing.STICKY, Routing.ROUND_ROBIN)


def run_routing(model: Any, tokenizer: Any, routing: Routing, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh pool with ``routing`` behind our server; the multi-turn load through it."""
    config = EngineConfig(max_batch_size=args.batch_size, context_len=args.context_len)
    pool = device_pool(model, tokenizer, config, args.devices, PoolConfig(routing=routing))
    chat_stream = ChatStream(
        engine=pool,
        tokenizer=tokenizer,
        num_of_concurrent_executions=args.batch_size * len(args.devices),
        max_queue_size=256,
        model_name="bench",
        ignore_eos=True,
        temperature=0.0,
        context_len=args.context_len,
    )
    with run_server(create_app(chat_stream, drain_timeout=1.0), timeout=600) as url:
        warm_up(url)
        summary = run_conversations(url, "bench", args.conversations, args.turns, args.max_tokens)
        summary.update(report(pool))
    return summary


def warm_up(url: str) -> None:
    """One short conversation per engine before measuring (first forward passes, allocator)."""
    run_conversations(url, "bench", 2, 1, 4)


def report(pool: PoolEngine) -> dict[str, Any]:
    workers = pool.workers()
    return {"moves": pool.moves, "turns_by_engine": {w.name: w.turns_total for w in workers}}


def load(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any]:
    if args.model is None:
        from tests.tiny_model import build_tiny

        return build_tiny(tmp)
    from chatstream.models import load_model

    return load_model(str(args.model), dtype=args.dtype, device=args.devices[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder or .gguf (default: the tiny test model)")
    parser.add_argument("--devices", type=lambda text: text.split(","), default=["cpu", "cpu"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="generations each engine runs at once")
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if all(d.startswith("cpu") for d in args.devices):
        os.environ.setdefault("CHATSTREAM_NUM_THREADS", "1")  # engines on the CPU share its cores
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(args, Path(tmp))
        for routing in ROUTINGS:
            results[routing.value] = run_routing(model, tokenizer, routing, args)
            gc.collect()  # the previous pool's model copies
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs seen by Python"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    header = ("routing", "cached tok", "hit turns", "TTFT p50", "TTFT p90", "moves", "wall")
    print(f"{header[0]:<12} {header[1]:>10} {header[2]:>9} {header[3]:>9} {header[4]:>9} {header[5]:>5} {header[6]:>6}")
    for routing in ROUTINGS:
        r = results[routing.value]
        print(
            f"{routing.value:<12} {r['cached_token_share']:>10.1%} {r['turns_with_hit']:>9.1%} "
            f"{r['ttft_p50_ms']:>7.1f}ms {r['ttft_p90_ms']:>7.1f}ms {r['moves']:>5} {r['wall_s']:>5.1f}s  "
            f"{r['turns_by_engine']}"
        )


if __name__ == "__main__":
    main()
