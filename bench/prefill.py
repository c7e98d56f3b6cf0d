"""Whole-prompt prefill time of the fused decoder at several prompt lengths: attention in query blocks (each block
of ``QUERY_BLOCK`` queries reads only the columns it can see) against one masked attention call per layer, side by
side in one run.

    PYTHONPATH=src python bench/prefill.py --model gemma --dtype bf16 --lengths 512 1024 1536 --rounds 7

Each round prefills one fresh random prompt of each length through ``ModelRunner.prefill`` once per variant, the
variants alternating, so that a machine's drift reaches both alike; the table shows medians over rounds (after one
warm-up round) and the ratio blocked / one call. Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
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

from bench.engine_throughput import load  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from chatstream.engine.cpu import attention  # noqa: E402
from chatstream.engine.model_runner import ModelRunner  # noqa: E402

VARIANTS = {"blocked": attention.QUERY_BLOCK, "one call": 1 << 30}
"""Variant name → the query block size it runs with (a block larger than any prompt: one masked call)."""


def prefill_seconds(runner: ModelRunner, prompt: list[int], query_block: int) -> float:
    attention.QUERY_BLOCK = query_block
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            runner.prefill([prompt])
            return time.perf_counter() - started
    finally:
        attention.QUERY_BLOCK = VARIANTS["blocked"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load(args.model, args.dtype, None)
    runner = ModelRunner(model)
    if runner.fused is None:
        raise SystemExit("the fused decoder is not in use for this model: nothing to compare")
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    times: dict[tuple[int, str], list[float]] = {(n, v): [] for n in args.lengths for v in VARIANTS}
    for round_ in range(args.rounds + 1):
        for n in args.lengths:
            prompt = torch.randint(3, vocab, (n,), generator=generator).tolist()
            order = list(VARIANTS.items()) if round_ % 2 == 0 else list(reversed(VARIANTS.items()))
            for name, block in order:
                seconds = prefill_seconds(runner, prompt, block)
                if round_ > 0:  # round 0 warms up
                    times[(n, name)].append(seconds)
    rows = []
    for n in args.lengths:
        medians = {name: statistics.median(times[(n, name)]) for name in VARIANTS}
        rows.append(
            {
                "prompt_tokens": n,
                "blocked_ms": 1000 * medians["blocked"],
                "one_call_ms": 1000 * medians["one call"],
                "ratio": medians["blocked"] / medians["one call"],
                "blocked_all_ms": [1000 * s for s in times[(n, "blocked")]],
                "one_call_all_ms": [1000 * s for s in times[(n, "one call")]],
            }
        )
    meta = {"model": args.model, "dtype": args.dtype, "rounds": args.rounds, "query_block": VARIANTS["blocked"]}
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"meta": meta, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 1536])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    report = run(args)
    print_markdown(
        ("prompt tokens", "blocked (ms)", "one call (ms)", "blocked / one call"),
        [
            (str(row["prompt_tokens"]), f"{row['blocked_ms']:.0f}", f"{row['one_call_ms']:.0f}", f"{row['ratio']:.2f}")
            for row in report["results"]
        ],
    )
    write_json(args.out, f"prefill_query_blocks_{args.model}_{args.dtype}.json", report)


if __name__ == "__main__":
    main()
