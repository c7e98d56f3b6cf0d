"""The w8a8 kernel with and without its weight prefetch, side by side in one process: the extension built twice from
the same source (``-DCHATSTREAM_W8A8_PREFETCH=1`` / ``=0``), alternating within every round.

    PYTHONPATH=src python bench/w8a8_prefetch.py                     # kernel and engine, 5 rounds
    PYTHONPATH=src python bench/w8a8_prefetch.py --level kernel --rows 1 8 16 24 64 --rounds 7

- **kernel**: the linear layers of Gemma-3-270M's 18 layers (q/k/v, o, gate/up, down; random int8 weights), called
  one after the other as a step calls them, so that every weight comes from memory (*cold*: 100 MB, over the L3
  cache), and layer 0's four products 18 times over (*hot*: their 9 MB stay in the caches); the median of
  ``--calls`` passes per round.
- **engine**: two engines on the embedded model (w8a8), one per build; per round and build, the median step of 8
  and of 32 decoding streams, and of 8 streams with a prefill chunk of 16 / 32 / 64 tokens of a prompt ≈ 1,000
  tokens in (the chunk size fixed through the pacer's ``max_tokens``).

The table: per case, each build's median over rounds and the median of the rounds' ratios (prefetch / none).
Results go to bench/results/w8a8_prefetch.json.
"""

from __future__ import annotations

import argparse
import gc
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
from bench.stats import median_call_s  # noqa: E402
from bench.w8a8_kernel import SHAPES  # noqa: E402
from chatstream.config import EngineConfig, SamplingParams  # noqa: E402
from chatstream.engine.base import GenerationRequest  # noqa: E402
from chatstream.engine.cpu import w8a8  # noqa: E402
from chatstream.engine.cpu.quantized import quantize_int8  # noqa: E402
from chatstream.engine.llm_engine import LLMEngine  # noqa: E402

BUILDS = ("prefetch", "none")
LAYERS = 18
CHUNKS = (16, 32, 64)


def build(name: str) -> Any:
    """The extension compiled with its prefetch on (``prefetch``) or off (``none``), under a name of its own."""
    from torch.utils.cpp_extension import load as load_extension

    flag = "1" if name == "prefetch" else "0"
    return load_extension(name=f"chatstream_w8a8_bench_{name}", sources=[str(w8a8.SOURCE)],
                          extra_cflags=[*w8a8.COMPILER_FLAGS, f"-DCHATSTREAM_W8A8_PREFETCH={flag}"],
                          extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip


def median_ms(fn: Callable[[], Any], calls: int) -> float:
    """The median milliseconds of ``calls`` calls of ``fn``, after one warm-up call."""
    fn()
    return median_call_s(fn, calls) * 1e3


Case = Callable[[Any], Any]
"""A kernel case: called with the build's module."""


def kernel_cases(modules: dict[str, Any], rows: list[int], generator: torch.Generator) -> dict[str, Case]:
    """``case -> (module -> None)``: a cold pass over every layer's products and a hot pass over layer 0's."""
    shapes = [SHAPES[name] for name in ("qkv", "o_proj", "gate_up", "down")]
    packer = next(iter(modules.values()))
    layers = []
    for _ in range(LAYERS):
        for n, k in shapes:
            q, scale = quantize_int8(torch.randn(n, k, generator=generator) * 0.02)
            layers.append((packer.pack_weight(q), scale.float().contiguous(), k))
    cases: dict[str, Case] = {}
    for m in rows:
        xs = {k: torch.randn(m, k, generator=generator).bfloat16() for k in {k for _, k in shapes}}

        def cold(module: Any, xs: dict[int, torch.Tensor] = xs) -> None:
            for packed, scale, k in layers:
                module.linear(xs[k], packed, scale, None)

        def hot(module: Any, xs: dict[int, torch.Tensor] = xs) -> None:
            for _ in range(LAYERS):
                for packed, scale, k in layers[:4]:
                    module.linear(xs[k], packed, scale, None)

        cases[f"kernel cold, {m} rows"] = cold
        cases[f"kernel hot, {m} rows"] = hot
    return cases


def engine_round(engine: LLMEngine, ids: Callable[[int], list[int]], tag: str, steps: int) -> dict[str, float]:
    """One round on one engine: decode steps at 8 and 32 rows, and 8 rows with chunks of each size."""
    out: dict[str, float] = {}
    streams = SamplingParams(max_new_tokens=1_000_000, temperature=0.0, ignore_eos=True)
    pacer = engine.scheduler.pacer
    for batch in (8, 32):
        for i in range(batch):
            engine.add_request(GenerationRequest(f"{tag}-{batch}-{i}", "", streams, prompt_token_ids=ids(60)))
        for _ in range(12):  # every stream prefilled and decoding
            engine.step()
        out[f"engine decode, {batch} rows"] = median_ms(engine.step, steps)
        if batch == 8:
            joiner = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
            engine.add_request(GenerationRequest(f"{tag}-joiner", "", joiner, prompt_token_ids=ids(1600)))
            pacer.max_tokens = 256
            for _ in range(4):  # 1,024 columns prefilled
                engine.step()
            for chunk in CHUNKS:
                pacer.max_tokens = chunk
                out[f"engine 8 rows + chunk of {chunk}"] = median_ms(engine.step, 4)
            pacer.max_tokens = 256
        engine.abort_all()
        for _ in range(3):
            engine.step()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", choices=["kernel", "engine", "both"], default="both")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per engine case and round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    reason = w8a8.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"w8a8 cannot run here: {reason}")
    modules = {name: build(name) for name in BUILDS}
    generator = torch.Generator().manual_seed(0)
    samples: dict[str, dict[str, list[float]]] = {}

    def record(case: str, build_name: str, ms: float) -> None:
        samples.setdefault(case, {name: [] for name in BUILDS})[build_name].append(ms)

    with torch.inference_mode():
        cases = kernel_cases(modules, args.rows, generator) if args.level != "engine" else {}
        engines: dict[str, LLMEngine] = {}
        if args.level != "kernel":
            model, tokenizer = load("default", "bf16", None)
            original = w8a8.kernel
            for name, module in modules.items():  # each engine's layers bind the build current when it is made
                w8a8.kernel = lambda module=module: module  # type: ignore[assignment]
                config = EngineConfig(weight_quantization="w8a8", context_len=4096, max_decode_slowdown=None)
                engines[name] = LLMEngine(model, tokenizer, config)
            w8a8.kernel = original  # type: ignore[assignment]
            vocab = int(model.config.vocab_size)

            def ids(n: int) -> list[int]:
                return torch.randint(300, vocab, (n,), generator=generator).tolist()

        gc.collect()
        for round_ in range(args.rounds + 1):  # round 0 warms up
            order = BUILDS if round_ % 2 == 0 else tuple(reversed(BUILDS))
            for name in order:
                for case, fn in cases.items():
                    ms = median_ms(lambda fn=fn, module=modules[name]: fn(module), args.calls)
                    if round_:
                        record(case, name, ms)
                if engines:
                    w8a8.kernel = lambda name=name: modules[name]  # type: ignore[assignment]  # calls made per step
                    for case, ms in engine_round(engines[name], ids, f"r{round_}-{name}", args.steps).items():
                        if round_:
                            record(case, name, ms)
            print(f"round {round_} done", flush=True)
    table, results = [], {}
    for case, by_build in samples.items():
        ratios = [a / b for a, b in zip(by_build["prefetch"], by_build["none"], strict=True)]
        medians = {name: statistics.median(values) for name, values in by_build.items()}
        results[case] = {"median_ms": medians, "rounds_ms": by_build, "ratio": statistics.median(ratios),
                         "rounds_ratio": ratios}  # fmt: skip
        table.append([case, f"{medians['none']:.2f}", f"{medians['prefetch']:.2f}", f"{statistics.median(ratios):.2f}",
                      f"{min(ratios):.2f}–{max(ratios):.2f}"])  # fmt: skip
    print_markdown(["case", "no prefetch ms", "prefetch ms", "ratio (median)", "rounds"], table)
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rounds": args.rounds, "calls": args.calls, "steps": args.steps, "level": args.level,
            "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()[0]}  # fmt: skip
    write_json(args.out, "w8a8_prefetch.json", {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
