"""Whole-prompt prefill time of the fused decoder at several prompt lengths, two variants side by side in one run:
attention in query blocks (each block of ``QUERY_BLOCK`` queries reads only the columns it can see) against one
masked attention call per layer, or, with ``--weight-quantization MODE``, the model's own weights against MODE (a
mode whose kernel serves prefill rows too: w8a8).

    PYTHONPATH=src python bench/prefill.py --model gemma --dtype bf16 --lengths 512 1024 1536 --rounds 7
    PYTHONPATH=src python bench/prefill.py --model gemma --dtype bf16 --weight-quantization w8a8 --lengths 256 1536

Each round prefills one fresh random prompt of each length through ``ModelRunner.prefill`` once per variant, the
variants alternating, so that a machine's drift reaches both alike; the table shows medians over rounds (after one
warm-up round) and the ratio second / first variant. Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.engine_throughput import load  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from chatstream.config import WEIGHT_QUANTIZATIONS  # noqa: E402
from chatstream.engine.cpu import attention  # noqa: E402
from chatstream.engine.model_runner import ModelRunner  # noqa: E402

QUERY_BLOCK = attention.QUERY_BLOCK
ONE_CALL = 1 << 30
"""A query block larger than any prompt: one masked call."""


def prefill_seconds(runner: ModelRunner, prompt: list[int], query_block: int = QUERY_BLOCK) -> float:
    attention.QUERY_BLOCK = query_block
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            runner.prefill([prompt])
            return time.perf_counter() - started
    finally:
        attention.QUERY_BLOCK = QUERY_BLOCK


def variants(model: Any, quantization: str | None) -> dict[str, Callable[[list[int]], float]]:
    """Variant name → a prompt's prefill seconds on it."""
    runner = ModelRunner(model)
    if runner.fused is None:
        raise SystemExit("the fused decoder is not in use for this model: nothing to compare")
    if quantization is None:
        return {
            "blocked": lambda p: prefill_seconds(runner, p),
            "one call": lambda p: prefill_seconds(runner, p, ONE_CALL),
        }
    quantized = ModelRunner(model, quantization=quantization)
    return {
        "model's weights": lambda p: prefill_seconds(runner, p),
        quantization: lambda p: prefill_seconds(quantized, p),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load(args.model, args.dtype, None)
    timers = variants(model, args.weight_quantization)
    first, second = timers
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    times: dict[tuple[int, str], list[float]] = {(n, v): [] for n in args.lengths for v in timers}
    for round_ in range(args.rounds + 1):
        for n in args.lengths:
            prompt = torch.randint(3, vocab, (n,), generator=generator).tolist()
            order = list(timers.items()) if round_ % 2 == 0 else list(reversed(timers.items()))
            for name, timer in order:
                seconds = timer(prompt)
                if round_ > 0:  # round 0 warms up
                    times[(n, name)].append(seconds)
    rows = []
    for n in args.lengths:
        medians = {name: statistics.median(times[(n, name)]) for name in timers}
        rows.append(
            {
                "prompt_tokens": n,
                "variants": [first, second],
                "median_ms": {name: 1000 * medians[name] for name in timers},
                "ratio": medians[second] / medians[first],
                "all_ms": {name: [1000 * s for s in times[(n, name)]] for name in timers},
            }
        )
    meta = {"model": args.model, "dtype": args.dtype, "rounds": args.rounds, "query_block": QUERY_BLOCK,
            "weight_quantization": args.weight_quantization}  # fmt: skip
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"meta": meta, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 1536])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--weight-quantization",
        choices=WEIGHT_QUANTIZATIONS,
        default=None,
        help="compare the model's own weights with this mode instead of the two attentions",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    report = run(args)
    first, second = report["results"][0]["variants"]
    print_markdown(
        ("prompt tokens", f"{first} (ms)", f"{second} (ms)", f"{second} / {first}"),
        [
            (str(row["prompt_tokens"]), f"{row['median_ms'][first]:.0f}", f"{row['median_ms'][second]:.0f}",
             f"{row['ratio']:.2f}")
            for row in report["results"]
        ],
    )  # fmt: skip
    compared = f"weights_{args.weight_quantization}" if args.weight_quantization else "query_blocks"
    write_json(args.out, f"prefill_{compared}_{args.model}_{args.dtype}.json", report)


if __name__ == "__main__":
    main()
