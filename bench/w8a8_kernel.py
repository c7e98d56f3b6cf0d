"""The linear layers of a decode step on each kernel the engine can use, side by side in one run: oneDNN-packed
bfloat16 (the unquantized default on a CPU with AVX512-BF16), PyTorch's weight-only int8 (``--weight-quantization
int8``), this package's w8a8 kernel (``w8a8``) and, for reference, fbgemm's dynamic int8 linear (per-tensor
activations, so a row's result would depend on the other rows: not used by the engine).

    PYTHONPATH=src python bench/w8a8_kernel.py                      # Gemma-3-270M's shapes, 1 / 8 / 32 rows
    PYTHONPATH=src python bench/w8a8_kernel.py --rows 1 8 16 32 --rounds 7

Random weights of each shape (the LM head 262,144 x 640, q/k/v 1,536 x 640, o 640 x 1,024, gate/up 4,096 x 640,
down 640 x 2,048); each round times every kernel in turn (order rotating between rounds) on the same input, the
median of ``--calls`` calls; the table shows the median over rounds and each kernel's time over bf16's. Also the
rate at which one core issues VPDPBUSD and VDPBF16PS (24 independent sums), the arithmetic roof of both kernels.
Results go to bench/results/w8a8_kernel.json.
"""

from __future__ import annotations

import argparse
import functools
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

from bench.report import print_markdown, write_json  # noqa: E402
from bench.stats import median_call_s  # noqa: E402
from chatstream.engine.cpu import w8a8  # noqa: E402
from chatstream.engine.cpu.quantized import int8_linear, quantize_int8  # noqa: E402

SHAPES = {"lm_head": (262144, 640), "qkv": (1536, 640), "o_proj": (640, 1024), "gate_up": (4096, 640),
          "down": (640, 2048)}  # fmt: skip


def timed(fn: Callable[[], Any], calls: int) -> float:
    """Median seconds of ``calls`` calls, after two warm-up calls."""
    fn(), fn()
    return median_call_s(fn, calls)


def kernels(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each kernel's ``x -> x @ weight.T``, built once."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16().contiguous(), None)
    q, scale = quantize_int8(weight)
    fbgemm_weight = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
                                               torch.qint8)  # fmt: skip
    prepacked = torch.ops.quantized.linear_prepack(fbgemm_weight, None)
    return {
        "bf16": lambda x: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], ""),
        "int8 (weight-only)": int8_linear(weight, None),
        "w8a8": w8a8.w8a8_linear(q, scale, None),
        "fbgemm dynamic": lambda x: torch.ops.quantized.linear_dynamic(x, prepacked, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    reason = w8a8.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"w8a8 cannot run here: {reason}")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    generator = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {}
    table = []
    names: list[str] = []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, generator=generator) * 0.02
        fns = kernels(weight)
        names = list(fns)
        for rows in args.rows:
            x = torch.randn(rows, k, generator=generator)
            samples: dict[str, list[float]] = {kernel: [] for kernel in fns}
            for r in range(args.rounds):
                order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
                for kernel in order:
                    samples[kernel].append(timed(functools.partial(fns[kernel], x), args.calls))
            ms = {kernel: statistics.median(values) * 1e3 for kernel, values in samples.items()}
            results[f"{name} {n}x{k} rows={rows}"] = {"ms": ms, "rounds_ms": samples}
            table.append([f"{name} ({n} x {k})", str(rows)]
                         + [f"{ms[kernel]:.3f} ({ms[kernel] / ms['bf16']:.2f})" for kernel in fns])  # fmt: skip
            print(table[-1], flush=True)
    print_markdown(["layer", "rows", *(f"{kernel} ms (÷ bf16)" for kernel in names)], table)
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, "threads": args.threads,
            "rounds": args.rounds, "calls": args.calls, "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg()[0]}  # fmt: skip
    write_json(args.out, "w8a8_kernel.json", {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
