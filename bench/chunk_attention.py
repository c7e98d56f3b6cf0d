"""The attention of one row's new tokens: the w8a8 extension's kernel against ``scaled_dot_product_attention`` (the
flash kernel the fused decoder calls otherwise), at the shapes of a prompt's chunk and of a decode step.

    PYTHONPATH=src python bench/chunk_attention.py                  # Gemma-3-270M's heads (4 on one key head, 256)
    PYTHONPATH=src python bench/chunk_attention.py --rounds 9 --head-dim 128 --groups 8

Per shape (tokens, key columns, window), each round times both ways back to back (the order alternating between
rounds) as the median of ``--calls`` calls; the table shows the medians over rounds, their ratio, and each way's
largest difference from a float32 reference (masked ``scaled_dot_product_attention`` on float32 copies). Needs a
CPU with AVX512-BF16. Results go to bench/results/chunk_attention_<groups>x<head_dim>.json.
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
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.report import print_markdown, write_json  # noqa: E402
from bench.stats import median_call_s  # noqa: E402
from chatstream.engine.cpu import w8a8  # noqa: E402

SHAPES = [  # (new tokens, key columns, window): decode steps, then chunks early and late in a long prompt
    (1, 512, 512),
    (1, 1520, 0),
    (16, 528, 512),
    (16, 1000, 0),
    (32, 544, 512),
    (32, 1500, 0),
    (64, 576, 512),
    (64, 1000, 0),
    (256, 256, 0),
    (256, 1536, 0),
]


def _median_ms(fn: Any, calls: int) -> float:
    """The median milliseconds of ``calls`` calls of ``fn``, after one warm-up call."""
    fn()
    return median_call_s(fn, calls) * 1e3


def _inputs(tokens: int, columns: int, window: int, groups: int, head_dim: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(tokens * 10_000 + columns)
    rows = groups * tokens
    q = torch.randn(rows, head_dim, generator=generator).to(torch.bfloat16)
    k = (2 * torch.randn(columns, head_dim, generator=generator)).to(torch.bfloat16)
    v = torch.randn(columns, head_dim, generator=generator).to(torch.bfloat16)
    own = columns - tokens + torch.arange(rows) % tokens  # row m is token m % tokens, at the last columns
    keys = torch.arange(columns)[None]
    allowed = keys <= own[:, None]
    if window:
        allowed &= keys > own[:, None] - window
    return {"q": q, "k": k, "v": v, "mask": allowed[None, None], "offset": columns - tokens}


def _measure(x: dict[str, Any], tokens: int, window: int, scale: float, args: argparse.Namespace) -> dict[str, Any]:
    q4, k4, v4 = x["q"][None, None], x["k"][None, None], x["v"][None, None]
    ways = {
        "sdpa": lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=x["mask"], scale=scale)[0, 0],
        "kernel": lambda: w8a8.chunk_attention(x["q"], x["k"], x["v"], tokens, x["offset"], window, scale),
    }
    reference = F.scaled_dot_product_attention(q4.float(), k4.float(), v4.float(), attn_mask=x["mask"], scale=scale)
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name in ways if round_ % 2 == 0 else reversed(list(ways)):
            rounds[name].append(_median_ms(ways[name], args.calls))
    medians = {name: statistics.median(times) for name, times in rounds.items()}
    errors = {name: float((fn().float() - reference[0, 0]).abs().max()) for name, fn in ways.items()}
    columns = x["k"].shape[0]
    flops = 4 * args.groups * tokens * columns * args.head_dim  # both products, every column (an upper bound)
    return {
        "tokens": tokens, "columns": columns, "window": window, "median_ms": medians, "rounds_ms": rounds,
        "kernel_over_sdpa": medians["kernel"] / medians["sdpa"], "max_abs_error_vs_float32": errors,
        "gflops_upper_bound": {name: flops / ms / 1e6 for name, ms in medians.items()},
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = w8a8.attention_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the chunk attention kernel cannot run here: {reason}")
    scale = args.head_dim**-0.5
    results: dict[str, dict[str, Any]] = {}
    for tokens, columns, window in SHAPES:
        x = _inputs(tokens, columns, window, args.groups, args.head_dim)
        results[f"{tokens}x{columns}" + (f"/w{window}" if window else "")] = _measure(x, tokens, window, scale, args)
    meta = {"groups": args.groups, "head_dim": args.head_dim, "rounds": args.rounds, "calls": args.calls}
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"meta": meta, "shapes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4, help="query heads per key head")
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per way and round")
    args = parser.parse_args()
    report = run(args)
    rows = []
    for name, shape in report["shapes"].items():
        ms, err = shape["median_ms"], shape["max_abs_error_vs_float32"]
        rows.append([name, f"{ms['sdpa']:.3f}", f"{ms['kernel']:.3f}", f"{shape['kernel_over_sdpa']:.2f}",
                     f"{err['sdpa']:.4f}", f"{err['kernel']:.4f}"])  # fmt: skip
    print_markdown(["tokens x columns", "sdpa ms", "kernel ms", "kernel / sdpa", "sdpa error", "kernel error"], rows)
    write_json(ROOT / "bench" / "results", f"chunk_attention_{args.groups}x{args.head_dim}.json", report)


if __name__ == "__main__":
    main()
