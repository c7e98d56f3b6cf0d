"""Greedy token choice by blocks (``sampler.argmax_rows``) against a plain ``argmax``, side by side in one run: the
call alone on a 262,144-token vocabulary, and the engine's throughput at a few batch sizes.

    PYTHONPATH=src python bench/argmax.py                              # Gemma-3-270M, w8a8, 8 and 32 chats
    PYTHONPATH=src python bench/argmax.py --quantization none --concurrency 8 --rounds 5

1. **The call**: ``greedy_argmax`` on random ``[rows, 262144]`` logits in bfloat16 (what a bf16 model's LM head
   gives) and float32, ``--calls`` calls per variant and round, the order alternating between rounds.
2. **The engine**: ``TransformersEngine`` on the model; per concurrency and round, ``concurrency`` greedy requests
   (``--max-new-tokens``, ignore_eos) with each variant in turn, the order alternating between rounds. "plain" sets
   ``sampler.MIN_ARGMAX_BLOCKS`` out of reach, which is the code before blocks (float32 rows widened a few at a time
   and ``argmax``). The tokens of both variants are compared: they must be the same.

Tables: the medians over rounds and their ratio (blocks / plain). Results go to
bench/results/argmax_<model>_<quantization>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.engine_throughput import PROMPTS, load  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from bench.stats import median_call_s  # noqa: E402
from chatstream.config import EngineConfig, SamplingParams  # noqa: E402
from chatstream.engine import sampler  # noqa: E402
from chatstream.engine.async_engine import TransformersEngine  # noqa: E402
from chatstream.engine.base import GenerationRequest  # noqa: E402

VOCAB = 262_144
VARIANTS = ("plain", "blocks")


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Within the block, ``greedy_argmax`` runs as ``name`` says."""
    kept = sampler.MIN_ARGMAX_BLOCKS
    if name == "plain":
        sampler.MIN_ARGMAX_BLOCKS = 1 << 62
    try:
        yield
    finally:
        sampler.MIN_ARGMAX_BLOCKS = kept


def _order(round_: int) -> tuple[str, ...]:
    return VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]


def _summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    medians = {name: statistics.median(r[name] for r in rounds) for name in VARIANTS}
    return {"median": medians, "ratio": medians["blocks"] / medians["plain"], "rounds": rounds}


def time_calls(args: argparse.Namespace) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for size in args.rows:
            logits = torch.randn(size, VOCAB, generator=generator).to(dtype)
            rounds = []
            for round_ in range(args.rounds + 1):
                times = {}
                for name in _order(round_):
                    with variant(name):
                        times[name] = 1000 * median_call_s(functools.partial(sampler.greedy_argmax, logits), args.calls)
                if round_ > 0:  # round 0 warms up
                    rounds.append(times)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "rows": size, **_summary(rounds)})
    return rows


async def _round(engine: TransformersEngine, concurrency: int, max_new: int, tag: str) -> tuple[float, list[Any]]:
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    streams = [
        engine.add_request(GenerationRequest(f"{tag}-{i}", PROMPTS[i % len(PROMPTS)], params))
        for i in range(concurrency)
    ]

    async def tokens(stream: Any) -> list[int]:
        return [token for delta in [d async for d in stream] for token in delta.token_ids]

    outputs = await asyncio.gather(*(tokens(s) for s in streams))
    return sum(len(o) for o in outputs) / (time.perf_counter() - started), outputs


async def time_engine(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tokenizer = load(args.model, "bf16", None)
    quantization = None if args.quantization == "none" else args.quantization
    config = EngineConfig(max_batch_size=max(args.concurrency), prefix_cache_bytes=0, weight_quantization=quantization)
    engine = TransformersEngine(model, tokenizer, config)
    engine.start()
    try:
        rows = []
        for concurrency in args.concurrency:
            rounds, same = [], True
            for round_ in range(args.rounds + 1):
                rates, outputs = {}, {}
                for name in _order(round_):
                    with variant(name):
                        tag = f"{name}-{concurrency}-{round_}"
                        rates[name], outputs[name] = await _round(engine, concurrency, args.max_new_tokens, tag)
                same = same and outputs["plain"] == outputs["blocks"]
                if round_ > 0:
                    rounds.append(rates)
            rows.append({"concurrency": concurrency, "same_tokens": same, **_summary(rounds)})
            print(f"c={concurrency}: {rows[-1]['median']} tok/s, same tokens: {same}", flush=True)
        return rows
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="gemma")
    parser.add_argument("--quantization", default="w8a8", help="the engine's weight quantization, or none")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32], help="rows of the call alone")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    calls = time_calls(args)
    print_markdown(
        ["dtype", "rows", "plain ms", "blocks ms", "blocks / plain"],
        [[r["dtype"], str(r["rows"]), f"{r['median']['plain']:.3f}", f"{r['median']['blocks']:.3f}",
          f"{r['ratio']:.2f}"] for r in calls],
    )  # fmt: skip
    engine = asyncio.run(time_engine(args))
    print_markdown(
        ["concurrency", "plain tok/s", "blocks tok/s", "blocks / plain", "same tokens"],
        [[str(r["concurrency"]), f"{r['median']['plain']:.1f}", f"{r['median']['blocks']:.1f}", f"{r['ratio']:.3f}",
          str(r["same_tokens"])] for r in engine],
    )  # fmt: skip
    meta = {"model": args.model, "quantization": args.quantization, "rounds": args.rounds, "calls": args.calls,
            "max_new_tokens": args.max_new_tokens}  # fmt: skip
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    report = {"meta": meta, "calls": calls, "engine": engine}
    write_json(ROOT / "bench" / "results", f"argmax_{args.model}_{args.quantization}.json", report)


if __name__ == "__main__":
    main()
