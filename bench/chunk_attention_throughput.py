"""The engine's throughput with the chunk attention kernel against ``scaled_dot_product_attention`` (w8a8, the
decode steps of a burst of greedy requests), or with all the kernel extension's operations against PyTorch's (bf16,
``--compare cpu-kernels``: ``EngineConfig.cpu_kernels`` on and off), the two ways alternating within one process.

    PYTHONPATH=src python bench/chunk_attention_throughput.py                    # Gemma-3-270M, 8 and 32 chats
    PYTHONPATH=src python bench/chunk_attention_throughput.py --rounds 9 --concurrency 8
    PYTHONPATH=src python bench/chunk_attention_throughput.py --compare cpu-kernels --concurrency 1 8 32

Each round runs, per concurrency, one burst (``bench/engine_throughput.py``'s ``one_round``: that many requests at
once, 128 greedy tokens each) one way and then the other, the order alternating between rounds; the table shows
each way's median tokens/s and the median of the per-round ratios (kernel / the other), with their range. Results go
to bench/results/chunk_attention_throughput.json (``--compare cpu-kernels``: cpu_kernels_throughput.json).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.engine_throughput import load, one_round  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from chatstream.config import EngineConfig  # noqa: E402
from chatstream.engine.async_engine import TransformersEngine  # noqa: E402
from chatstream.engine.cpu import w8a8  # noqa: E402
from chatstream.engine.cpu.fast_path import LayerOps  # noqa: E402

COMPARISONS = {"attention": ("sdpa", "chunk_attention_throughput.json"),
               "cpu-kernels": ("pytorch", "cpu_kernels_throughput.json")}  # fmt: skip
"""``--compare``: the name of the way the kernel is measured against, and the results file."""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load("gemma", "bf16", None)
    quantization = "w8a8" if args.compare == "attention" else None
    config = EngineConfig(max_batch_size=max(args.concurrency), prefix_cache_bytes=0, weight_quantization=quantization)
    engine = TransformersEngine(model, tokenizer, config)
    decoder = engine.llm.model_runner.fused
    if decoder is None or decoder.ops == LayerOps():
        raise SystemExit(f"the kernel extension is not in use here: {w8a8.unavailable_reason()}")
    if args.compare == "attention":
        if w8a8.attention_unavailable_reason() is not None:
            raise SystemExit(f"the extension's attention cannot run here: {w8a8.attention_unavailable_reason()}")
        decoder.ops = dataclasses.replace(decoder.ops, chunk_attention=w8a8.chunk_attention_into)
        variants = {"kernel": decoder.ops, "sdpa": dataclasses.replace(decoder.ops, chunk_attention=None)}
    else:
        variants = {"kernel": decoder.ops, COMPARISONS[args.compare][0]: LayerOps()}
    engine.start()
    try:
        rates: dict[int, dict[str, list[float]]] = {c: {name: [] for name in variants} for c in args.concurrency}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for c in args.concurrency:
                for name in variants if round_ % 2 == 0 else reversed(list(variants)):
                    decoder.ops = variants[name]
                    sample = await one_round(engine, c, args.max_new_tokens, f"r{round_}-{c}-{name}")
                    if round_:
                        rates[c][name].append(sample["tokens"] / sample["seconds"])
    finally:
        engine.stop()
    levels = {}
    for c, ways in rates.items():
        kernel, other = ways.values()
        ratios = [k / o for k, o in zip(kernel, other, strict=True)]
        levels[str(c)] = {
            "tokens_per_s": ways,
            "median": {name: statistics.median(r) for name, r in ways.items()},
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        }
    meta = {"compare": args.compare, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens}
    meta.update(concurrency=args.concurrency)
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"meta": meta, "levels": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=list(COMPARISONS), default="attention")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    other, name = COMPARISONS[args.compare]
    rows = []
    for c, level in report["levels"].items():
        low, high = level["ratio_range"]
        rows.append([c, f"{level['median'][other]:.1f}", f"{level['median']['kernel']:.1f}",
                     f"{level['ratio_median']:.3f}", f"{low:.3f}–{high:.3f}"])  # fmt: skip
    print_markdown(["chats", f"{other} tok/s", "kernel tok/s", f"kernel / {other} (median)", "range"], rows)
    write_json(ROOT / "bench" / "results", name, report)


if __name__ == "__main__":
    main()
