"""The w8a8 mode's element-wise operations on the kernel extension (RMSNorms, rotary embedding, MLP gate) against
PyTorch's, side by side in one run: one norm call, and a whole decode step of the engine's fused decoder with either
set.

    PYTHONPATH=src python bench/norms.py                          # Gemma-3-270M in bf16, 1 and 8 rows
    PYTHONPATH=src python bench/norms.py --batch 1 --rounds 9

1. **One norm**: a ``[rows, 640]`` input (the hidden size) and a ``[rows, 5, 256]`` one (the q and k heads, per-head
   weights), ``--calls`` calls of each variant per round, the order alternating between rounds.
2. **Decode step**: the model with ``--weight-quantization w8a8``; per batch size, ``--batch`` rows of the fixed
   prompts are prefilled, then each round times ``--steps`` greedy decode steps with the extension's operations
   and ``--steps`` with PyTorch's (``FusedDecoder.use_ops`` switches between them), the order alternating. The
   greedy tokens of both are compared (the two differ only in the order of the norms' float32 sums of squares).

Tables: the medians over rounds of each round's median, their ratio (kernel / PyTorch) and the median of the rounds'
own ratios. Results go to bench/results/norms_<model>_<dtype>.json.
"""

from __future__ import annotations

import argparse
import functools
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

from bench.engine_throughput import PROMPTS, load  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from bench.stats import median_call_s  # noqa: E402
from chatstream.engine.cpu import fast_path, w8a8  # noqa: E402
from chatstream.engine.model_runner import ModelRunner  # noqa: E402

VARIANTS = {"kernel": w8a8.rms_norm, "pytorch": fast_path.rms_norm}
STEP_OPS = {
    "kernel": fast_path.LayerOps(rms_norm=w8a8.rms_norm, rotate=w8a8.rotate, gated=w8a8.gated),
    "pytorch": fast_path.LayerOps(),
}


def _summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    kernel = statistics.median(r["kernel"] for r in rounds)
    pytorch = statistics.median(r["pytorch"] for r in rounds)
    return {
        "median": {"kernel": kernel, "pytorch": pytorch},
        "ratio": kernel / pytorch,
        "median_round_ratio": statistics.median(r["kernel"] / r["pytorch"] for r in rounds),
        "rounds": rounds,
    }


@torch.inference_mode()
def one_norm(rows: int, dtype: torch.dtype, rounds: int, calls: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(rows)
    cases = {
        "hidden": (torch.randn(640, generator=generator), torch.randn(rows, 640, generator=generator)),
        "q_k_heads": (torch.randn(5, 256, generator=generator), torch.randn(rows, 5, 256, generator=generator)),
    }
    out: dict[str, Any] = {}
    for name, (weight, x) in cases.items():
        x = x.to(dtype)
        built = {variant: build(weight, 1e-6, one_plus_weight=True) for variant, build in VARIANTS.items()}
        per_round = []
        for index in range(rounds):
            order = list(built) if index % 2 == 0 else list(reversed(built))
            calls_of = {variant: functools.partial(built[variant], x) for variant in order}
            per_round.append({variant: 1e6 * median_call_s(calls_of[variant], calls) for variant in order})
        out[name] = _summary(per_round)
    return out


@torch.inference_mode()
def decode_steps(runner: ModelRunner, model: Any, tokenizer: Any, size: int, rounds: int, steps: int) -> dict[str, Any]:
    fused = runner.fused
    assert fused is not None
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(size)]
    tokens: dict[str, list[list[int]]] = {}
    per_round = []
    for index in range(rounds):
        order = list(STEP_OPS) if index % 2 == 0 else list(reversed(STEP_OPS))
        times: dict[str, float] = {}
        for variant in order:
            fused.use_ops(model, STEP_OPS[variant])
            batch, logits = runner.prefill(prompts)
            batch.next_tokens = logits.argmax(dim=-1)
            step_times, generated = [], []
            for _ in range(steps):
                started = time.perf_counter()
                batch.next_tokens = runner.decode(batch).argmax(dim=-1)
                step_times.append(time.perf_counter() - started)
                generated.append(batch.next_tokens.tolist())
            times[variant] = 1000 * statistics.median(step_times[2:])
            tokens[variant] = generated
        per_round.append(times)
    fused.use_ops(model, STEP_OPS["kernel"])
    out = _summary(per_round)
    out["same_greedy_tokens"] = tokens["kernel"] == tokens["pytorch"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="gemma")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per variant and round")
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant and round of one norm")
    args = parser.parse_args()
    reason = w8a8.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the kernel cannot run here: {reason}")
    model, tokenizer = load(args.model, args.dtype, None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    runner = ModelRunner(model, quantization="w8a8")
    report: dict[str, Any] = {
        "meta": {
            "model": args.model,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "steps": args.steps,
            "calls": args.calls,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "one_norm_us": {},
        "decode_step_ms": {},
    }
    rows = []
    for size in args.batch:
        norms = report["one_norm_us"][str(size)] = one_norm(size, dtype, args.rounds, args.calls)
        for name, result in norms.items():
            rows.append([f"one norm, {name}, {size} rows (µs)", *_cells(result)])
    for size in args.batch:
        step = decode_steps(runner, model, tokenizer, size, args.rounds, args.steps)
        report["decode_step_ms"][str(size)] = step
        rows.append([f"decode step, {size} rows (ms)", *_cells(step)])
        print(f"batch {size}: greedy tokens the same with both sets of operations: {step['same_greedy_tokens']}")
    print_markdown(["", "kernel", "PyTorch", "kernel ÷ PyTorch", "median of rounds' ratios"], rows)
    write_json(ROOT / "bench" / "results", f"norms_{args.model}_{args.dtype}.json", report)


def _cells(result: dict[str, Any]) -> list[str]:
    median = result["median"]
    return [f"{median['kernel']:.2f}", f"{median['pytorch']:.2f}", f"{result['ratio']:.2f}",
            f"{result['median_round_ratio']:.2f}"]  # fmt: skip


if __name__ == "__main__":
    main()
