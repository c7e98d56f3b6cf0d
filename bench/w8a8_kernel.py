"""The linear layers of a decode step on each kernel the engine can use, side by side in one run: oneDNN-packed
bfloat16 (the unquantized default on a CPU with AVX512-BF16), PyTorch's weight-only int8 (``--weight-quantization
int8``), this package's w8a8 kernel (``w8a8``) and, for reference, fbgemm's dynamic int8 linear (per-tensor
activations, so a row's result would depend on the other rows: not used by the engine).

    PYTHONPATH=src python bench/w8a8_kernel.py                      # Gemma-3-270M's shapes, 1 / 8 / 32 rows
    PYTHONPATH=src python bench/w8a8_kernel.py --rows 1 8 16 32 --rounds 7

Random weights of each shape (the LM head 262,144 x 640, q/k/v 1,536 x 640, o 640 x 1,024, gate/up 4,096 x 640,
down 640 x 2,048); each round times every kernel in turn (order rotating between rounds) on the same input, the
median of ``--calls`` calls; the table shows the median over rounds and each kernel's time over bf16's. Also the
rate at which one core issues VPDPBUSD (and VDPBF16PS where the CPU has AVX512-BF16) with 16 independent sums in
registers, the arithmetic roof of the w8a8 products (and of the extension's attention): a loop compiled here with
PyTorch's extension builder (≈ 20 s the first time). Results go to bench/results/w8a8_kernel.json.
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


ROOF_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>

// 16 sums in registers, one instruction each per iteration (inline assembly, so that the compiler neither folds
// nor copies them); the operands come from the run-time seed.
#define SEED(i) _mm512_set1_epi32(seed + i)
#define ROOF(NAME, INSTRUCTION)                                                                            \
  double NAME(int64_t iterations, int64_t seed) {                                                        \
    __m512i a0 = SEED(0), a1 = SEED(1), a2 = SEED(2), a3 = SEED(3), a4 = SEED(4), a5 = SEED(5), a6 = SEED(6),      \
            a7 = SEED(7), a8 = SEED(8), a9 = SEED(9), a10 = SEED(10), a11 = SEED(11), a12 = SEED(12),            \
            a13 = SEED(13), a14 = SEED(14), a15 = SEED(15);                                                      \
    const __m512i w = _mm512_set1_epi32(0x3F803F80 + seed), x = _mm512_set1_epi32(0x3F803F81 + seed);     \
    const auto start = std::chrono::steady_clock::now();                                                 \
    for (int64_t n = 0; n < iterations; ++n) {                                                           \
      asm(INSTRUCTION " %[w], %[x], %[a0]\n\t" INSTRUCTION " %[w], %[x], %[a1]\n\t"                    \
          INSTRUCTION " %[w], %[x], %[a2]\n\t" INSTRUCTION " %[w], %[x], %[a3]\n\t"                    \
          INSTRUCTION " %[w], %[x], %[a4]\n\t" INSTRUCTION " %[w], %[x], %[a5]\n\t"                    \
          INSTRUCTION " %[w], %[x], %[a6]\n\t" INSTRUCTION " %[w], %[x], %[a7]"                          \
          : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3), [a4] "+v"(a4), [a5] "+v"(a5),     \
            [a6] "+v"(a6), [a7] "+v"(a7)                                                                 \
          : [w] "v"(w), [x] "v"(x));                                                                     \
      asm(INSTRUCTION " %[w], %[x], %[a8]\n\t" INSTRUCTION " %[w], %[x], %[a9]\n\t"                    \
          INSTRUCTION " %[w], %[x], %[a10]\n\t" INSTRUCTION " %[w], %[x], %[a11]\n\t"                  \
          INSTRUCTION " %[w], %[x], %[a12]\n\t" INSTRUCTION " %[w], %[x], %[a13]\n\t"                  \
          INSTRUCTION " %[w], %[x], %[a14]\n\t" INSTRUCTION " %[w], %[x], %[a15]"                        \
          : [a8] "+v"(a8), [a9] "+v"(a9), [a10] "+v"(a10), [a11] "+v"(a11), [a12] "+v"(a12),              \
            [a13] "+v"(a13), [a14] "+v"(a14), [a15] "+v"(a15)                                            \
          : [w] "v"(w), [x] "v"(x));                                                                     \
    }                                                                                                    \
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); \
    const __m512i all = _mm512_or_si512(                                                                 \
        _mm512_or_si512(_mm512_or_si512(_mm512_or_si512(a0, a1), _mm512_or_si512(a2, a3)),               \
                        _mm512_or_si512(_mm512_or_si512(a4, a5), _mm512_or_si512(a6, a7))),              \
        _mm512_or_si512(_mm512_or_si512(_mm512_or_si512(a8, a9), _mm512_or_si512(a10, a11)),             \
                        _mm512_or_si512(_mm512_or_si512(a12, a13), _mm512_or_si512(a14, a15))));         \
    volatile int sink = _mm512_reduce_or_epi32(all);                                                     \
    (void)sink;                                                                                          \
    return iterations * 16 / seconds;                                                                    \
  }

ROOF(vnni_rate, "vpdpbusd")
ROOF(bf16_rate, "vdpbf16ps")
"""
"""Two loops of 16 independent sums of one instruction each; the VDPBF16PS one is called only where the CPU has it."""


def roof(seconds: float = 0.5) -> dict[str, float]:
    """Instructions per second one thread issues: VPDPBUSD, and VDPBF16PS where the CPU has AVX512-BF16."""
    from torch.utils.cpp_extension import load_inline

    has_bf16 = w8a8.attention_unavailable_reason() is None
    functions = ["vnni_rate", *(["bf16_rate"] if has_bf16 else [])]
    module = load_inline(name="chatstream_bench_roof", cpp_sources=[ROOF_SOURCE], functions=functions,
                         extra_cflags=["-O2", "-mavx512f"],
                         verbose=False)  # fmt: skip
    rates = {}
    for name in functions:
        fn = getattr(module, name)
        iterations = max(1000, int(fn(100_000, 1) * seconds / 16))  # a first call sizes the timed one
        rates[name.replace("_rate", "")] = max(fn(iterations, r + 2) for r in range(3))
    return {{"vnni": "vpdpbusd_per_s", "bf16": "vdpbf16ps_per_s"}[k]: v for k, v in rates.items()}


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
    rates = roof()
    print("one thread issues " + ", ".join(f"{name} {rate / 1e9:.2f} x 10^9" for name, rate in rates.items()))
    write_json(args.out, "w8a8_kernel.json", {"meta": meta, "roof": rates, "results": results})


if __name__ == "__main__":
    main()
