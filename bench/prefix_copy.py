"""What copying cached prefixes into a new prefill group costs (``BatchKVCache.from_segments``): one ``torch.cat`` per
row and tensor, against one copy call per cached piece (how it copied before round 15), alternating in one process.
Both run inside ``from_segments`` (its ``_place`` swapped), so the allocation and its page faults are the same: on
this project's VM a fresh 150 MB buffer costs 20-30 ms of page faults or none, depending on what the allocator kept
from the round before, as much as the copy itself.

    PYTHONPATH=src python bench/prefix_copy.py                      # 8 rows of 12 pieces of 70 tokens, Gemma-3-270M
    PYTHONPATH=src python bench/prefix_copy.py --rows 8 --pieces 2 --tokens 400

A conversation's sixth turn finds its history in about a dozen pieces of the prefix cache (each turn's prompt and
answer); the default shape is eight such conversations arriving together (bfloat16, 18 layers, one key head of 256).
Results go to bench/results/prefix_copy.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.report import write_json  # noqa: E402
from chatstream.engine import kv_cache  # noqa: E402
from chatstream.engine.kv_cache import BatchKVCache, RowKV  # noqa: E402


def per_piece(
    keys: torch.Tensor, values: torch.Tensor, pieces: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]], pad: int
) -> None:
    """``kv_cache._place`` before round 15: a ``copy_`` per piece (and tensor), into the same destination."""
    if pad:
        keys[:, :pad].zero_()
        values[:, :pad].zero_()
    column = pad
    for (key, value), n in pieces:
        keys[:, column : column + n].copy_(key[:, :n])
        values[:, column : column + n].copy_(value[:, :n])
        column += n


def run(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)

    def piece() -> RowKV:
        shape = (args.kv_heads, args.tokens, args.head_dim)

        def tensor() -> torch.Tensor:
            return torch.randn(shape, generator=generator).bfloat16()

        return RowKV(tuple((tensor(), tensor()) for _ in range(args.layers)))

    # each row a different number of tokens from its last piece, so rows are left-padded differently
    rows = [[(piece(), args.tokens) for _ in range(args.pieces - 1)] + [(piece(), args.tokens - r)]
            for r in range(args.rows)]  # fmt: skip
    variants = {"one cat per row": kv_cache._place, "a copy per piece": per_piece}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for round_ in range(args.rounds):
            for name in list(variants)[:: 1 if round_ % 2 == 0 else -1]:
                kv_cache._place = variants[name]  # the same allocation either way: only the copying differs
                started = time.perf_counter()
                BatchKVCache.from_segments(rows, args.layers)
                times[name].append(time.perf_counter() - started)
    finally:
        kv_cache._place = variants["one cat per row"]
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    megabytes = args.rows * args.pieces * args.tokens * args.layers * 2 * args.kv_heads * args.head_dim * 2 / 1e6
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "megabytes": round(megabytes, 1),
            **{key: value for key, value in vars(args).items() if key != "out"}}  # fmt: skip
    return {"meta": meta, "median_ms": medians, "ratio": medians["one cat per row"] / medians["a copy per piece"],
            "ms": {name: [1000 * t for t in values] for name, values in times.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--pieces", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=70, help="tokens per piece")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix_copy.json")
    args = parser.parse_args()
    report = run(args)
    write_json(args.out.parent, args.out.name, report)
    print(f"{report['meta']['megabytes']} MB: " + ", ".join(f"{k} {v:.2f} ms" for k, v in report["median_ms"].items())
          + f" (ratio {report['ratio']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
