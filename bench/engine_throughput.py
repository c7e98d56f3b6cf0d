"""Aggregate output tokens/s of TransformersEngine at several concurrency levels.

    PYTHONPATH=src python bench/engine_throughput.py --model tiny
    PYTHONPATH=src python bench/engine_throughput.py --model gemma --dtype bf16 fp32 --rounds 3
    PYTHONPATH=src python bench/engine_throughput.py --model gemma --dtype bf16 --threads 1 --no-pack --no-fused-decoder

Each round submits ``concurrency`` greedy requests at once (64 new tokens, ignore_eos) and times them until the last
one finishes; the table shows the median over rounds (after one warm-up round). Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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

from chatstream.config import WEIGHT_QUANTIZATIONS, EngineConfig, SamplingParams  # noqa: E402
from chatstream.engine.async_engine import TransformersEngine  # noqa: E402
from chatstream.engine.base import GenerationRequest, RequestStream  # noqa: E402

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a transformer language model is in two sentences.",
    "日本の首都はどこですか？",
    "List three fruits and their colors.",
    "Tell me a story about a cat who learned to code.",
    "What is 12 times 13?",
    "Translate 'good morning' into Japanese.",
    "Summarize the plot of a detective novel in one paragraph.",
)

logger = logging.getLogger("bench.engine_throughput")


def load(model: str, dtype: str, device: str | None) -> tuple[Any, Any]:
    if model == "tiny":
        from tests.tiny_model import build_tiny

        m, tok = build_tiny()
        return m.to(dtype=_dtype(dtype), device=device or "cpu"), tok
    from chatstream.models import load_model

    return load_model(None, dtype=dtype, device=device, progress=False)


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


async def _drain(stream: RequestStream, started: float) -> tuple[int, float]:
    tokens, first = 0, 0.0
    async for delta in stream:
        if delta.token_ids and not tokens:
            first = time.perf_counter() - started
        tokens += len(delta.token_ids)
    return tokens, first


async def one_round(engine: TransformersEngine, concurrency: int, max_new: int, tag: str) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    streams = [
        engine.add_request(GenerationRequest(f"{tag}-{i}", PROMPTS[i % len(PROMPTS)], params))
        for i in range(concurrency)
    ]
    results = await asyncio.gather(*(_drain(s, started) for s in streams))
    elapsed = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    return {"tokens": tokens, "seconds": elapsed, "ttft_median": statistics.median(f for _, f in results)}


async def run_level(engine: TransformersEngine, concurrency: int, rounds: int, max_new: int) -> dict[str, Any]:
    await one_round(engine, concurrency, max_new, f"warm{concurrency}")
    samples = [await one_round(engine, concurrency, max_new, f"c{concurrency}r{r}") for r in range(rounds)]
    rates = [s["tokens"] / s["seconds"] for s in samples]
    return {
        "concurrency": concurrency,
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_all": rates,
        "ttft_median_s": statistics.median(s["ttft_median"] for s in samples),
    }


async def bench(args: argparse.Namespace, dtype: str) -> list[dict[str, Any]]:
    model, tokenizer = load(args.model, dtype, args.device)
    config = EngineConfig(
        max_batch_size=max(args.concurrency),
        prefix_cache_bytes=0,
        fused_decoder=not args.no_fused_decoder,
        weight_quantization=args.quantization,
    )
    engine = TransformersEngine(model, tokenizer, config, num_threads=args.threads, pack_weights=not args.no_pack)
    engine.start()
    try:
        rows = []
        for c in args.concurrency:
            row = await run_level(engine, c, args.rounds, args.max_new_tokens)
            row.update(model=args.model, dtype=dtype, device=str(model.device), quantization=args.quantization)
            print(
                f"{args.model:6} {dtype:5} {args.quantization or '-':4} c={c:3d}  "
                f"{row['tokens_per_s_median']:8.1f} tok/s  "
                f"ttft {row['ttft_median_s'] * 1000:7.1f} ms",
                flush=True,
            )
            rows.append(row)
        return rows
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's choice)")
    parser.add_argument("--no-pack", action="store_true", help="plain nn.Linear weights (no oneDNN prepacking)")
    parser.add_argument("--no-fused-decoder", action="store_true", help="transformers' forward, not the fused decoder")
    parser.add_argument("--quantization", choices=WEIGHT_QUANTIZATIONS, default=None, help="weight-only quantization")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[dict[str, Any]] = []
    for dtype in args.dtype:
        rows.extend(asyncio.run(bench(args, dtype)))
    _print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    device = rows[0]["device"].split(":")[0] if rows else "cpu"
    suffix = f"_{args.quantization}" if args.quantization else ""
    path = args.out / f"engine_throughput_{args.model}_{device}{suffix}.json"
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    meta.update(load_average_after=os.getloadavg()[0], packed_weights=not args.no_pack)
    meta.update(fused_decoder=not args.no_fused_decoder)
    meta.update(max_new_tokens=args.max_new_tokens, rounds=args.rounds, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {path} (load average after: {os.getloadavg()[0]:.2f})")


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| model | dtype | device | concurrency | tok/s (median) | TTFT median (ms) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['device']} | {r['concurrency']} | "
            f"{r['tokens_per_s_median']:.1f} | {r['ttft_median_s'] * 1000:.1f} |"
        )


if __name__ == "__main__":
    main()
