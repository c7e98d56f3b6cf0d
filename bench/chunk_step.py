"""Where a decode step's time goes when a prefill chunk rides along: the running batch's step with and without a chunk
of a long prompt, split into the fused decoder's parts (linear layers, the decode rows' attention, the chunk's
attention, norms, element-wise work, LM head, the rest).

    PYTHONPATH=src python bench/chunk_step.py                       # Gemma-3-270M, w8a8, 8 rows, chunks 16/32/64
    PYTHONPATH=src python bench/chunk_step.py --quantization none --chunks 32 --rounds 3

``--batch`` streams decode (60-token prompts); each round, per chunk size in ``--chunks`` (the order alternating
between rounds), a prompt joins them and is prefilled in chunks of up to 256 tokens that end at column ``--column``,
then ``--steps`` steps with a chunk of that size are timed (the prompt is long enough that each carries a whole
one); and ``--steps`` decode-only steps are timed before the joiners. The chunk size is set through the pacer's
``max_tokens`` with its time budget off, so every timed step carries exactly that chunk. Where the chunk's attention
runs on the extension's kernel (w8a8 on a CPU with AVX512-BF16), ``--attention both`` (the default) times every chunk
size, and the decode-only steps, with it and with ``scaled_dot_product_attention``, alternating within each
round. Wall-clock timers wrap the
decoder's parts (no profiler; they add about a microsecond per call).

The table: per step kind, the median over rounds of each part's mean milliseconds per step; "chunk attention" is the
chunk's attention over every column before it (a sliding-window layer: its window). Results go to
bench/results/chunk_step_<model>_<quantization>_column<column>[_<attention>].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.engine_throughput import load  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from bench.stats import timed  # noqa: E402
from chatstream.config import EngineConfig, SamplingParams  # noqa: E402
from chatstream.engine.base import GenerationRequest  # noqa: E402
from chatstream.engine.llm_engine import LLMEngine  # noqa: E402

LEAD_IN_CHUNK = 256
"""Prompt tokens per step before and after the timed steps."""

PARTS = ("linear", "decode attention", "chunk attention", "norms", "element-wise", "LM head", "rest")


class PartTimer:
    """Seconds spent in each part of the fused decoder since the last :meth:`reset`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        decoder = engine.model_runner.fused
        if decoder is None:
            raise SystemExit("the fused decoder is not in use for this model: nothing to split")
        for layer in decoder.layers:
            for name in ("qkv", "o_proj", "gate_up", "down"):
                setattr(layer, name, self.timed("linear", getattr(layer, name)))
            for norm in dataclasses.fields(layer.norms):
                if getattr(layer.norms, norm.name) is not None:
                    setattr(layer.norms, norm.name, self.timed("norms", getattr(layer.norms, norm.name)))
        ops = decoder.ops
        decoder.ops = dataclasses.replace(
            ops, rotate=self.timed("element-wise", ops.rotate), gated=self.timed("element-wise", ops.gated)
        )
        decoder.lm_head = self.timed("LM head", decoder.lm_head)
        attend = decoder._attend

        def timed_attend(layer: Any, qk: torch.Tensor, v: torch.Tensor, size: int, *rest: Any) -> torch.Tensor:
            part = "chunk attention" if qk.shape[0] > size else "decode attention"
            return self.timed(part, attend)(layer, qk, v, size, *rest)

        decoder._attend = timed_attend
        decoder.forward = self.timed("forward", decoder.forward)

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return timed(self.seconds, part, fn)

    def reset(self) -> None:
        self.seconds.clear()

    def per_step_ms(self, steps: int, wall_s: float) -> dict[str, float]:
        parts = {part: 1000 * self.seconds.get(part, 0.0) / steps for part in PARTS if part != "rest"}
        forward = 1000 * self.seconds.get("forward", 0.0) / steps
        parts["rest"] = forward - sum(parts.values())  # inside the forward: embedding, masks, rotary tables, copies
        parts["forward"] = forward
        parts["step"] = 1000 * wall_s / steps  # the forward plus scheduling and sampling
        return parts


def _ids(generator: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(300, vocab, (n,), generator=generator).tolist()


def _length(args: argparse.Namespace, chunk: int) -> int:
    """The joiner's prompt: every timed step carries a whole chunk (the prompt's last one is not timed)."""
    return args.column + args.steps * chunk + 16


def _timed_steps(engine: LLMEngine, timer: PartTimer, steps: int) -> dict[str, float]:
    timer.reset()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return timer.per_step_ms(steps, time.perf_counter() - started)


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load(args.model, "bf16", None)
    quantization = None if args.quantization == "none" else args.quantization
    config = EngineConfig(
        weight_quantization=quantization, context_len=4096, max_prefill_tokens=LEAD_IN_CHUNK, max_decode_slowdown=None
    )
    engine = LLMEngine(model, tokenizer, config)
    timer = PartTimer(engine)
    pacer, scheduler = engine.scheduler.pacer, engine.scheduler
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    streams = SamplingParams(max_new_tokens=1_000_000, temperature=0.0, ignore_eos=True)
    joiner = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(GenerationRequest(f"stream-{i}", "", streams, prompt_token_ids=_ids(generator, vocab, 60)))
    for _ in range(20):  # every stream prefilled and decoding
        engine.step()
    decoder = engine.model_runner.fused
    assert decoder is not None
    kernel = decoder.ops.chunk_attention
    if args.attention == "kernel" and kernel is None:
        raise SystemExit("the chunk attention kernel is not in use here (w8a8 on a CPU with AVX512-BF16)")
    variants = {"kernel": kernel, "sdpa": None}
    choice = "sdpa" if kernel is None else args.attention
    if choice != "both":
        variants = {choice: variants[choice]}
    tags = {name: "" if len(variants) == 1 else f" ({name})" for name in variants}
    kinds = [*(f"decode only{tags[name]}" for name in variants)]
    kinds += [f"chunk {c}{tags[name]}" for c in args.chunks for name in variants]
    rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = args.chunks if round_ % 2 == 0 else list(reversed(args.chunks))
        results = {}
        for name in variants if round_ % 2 == 0 else reversed(variants):
            decoder.ops = dataclasses.replace(decoder.ops, chunk_attention=variants[name])
            results[f"decode only{tags[name]}"] = _timed_steps(engine, timer, args.steps)
        runs = [(chunk, name) for chunk in order for name in (variants if round_ % 2 == 0 else reversed(variants))]
        for chunk, name in runs:
            decoder.ops = dataclasses.replace(decoder.ops, chunk_attention=variants[name])
            engine.add_request(
                GenerationRequest(f"joiner-{round_}-{chunk}-{name}", "", joiner, prompt_token_ids=_ids(generator, vocab,
                                                                                                _length(args, chunk)))
            )  # fmt: skip
            pacer.max_tokens = min(LEAD_IN_CHUNK, args.column)  # the first chunks end exactly at the column
            while not scheduler.prefilling or scheduler._done < args.column:
                engine.step()
                pacer.max_tokens = max(1, min(LEAD_IN_CHUNK, args.column - scheduler._done))
            pacer.max_tokens = chunk
            results[f"chunk {chunk}{tags[name]}"] = _timed_steps(engine, timer, args.steps)
            pacer.max_tokens = LEAD_IN_CHUNK
            while scheduler.prefilling:
                engine.step()
        if round_ > 0:
            for kind, parts in results.items():
                rounds[kind].append(parts)
    table = {
        kind: {part: statistics.median(r[part] for r in rounds[kind]) for part in rounds[kind][0]} for kind in kinds
    }
    meta = {"model": args.model, "quantization": args.quantization, "batch": args.batch, "chunks": args.chunks,
            "column": args.column, "steps": args.steps, "rounds": args.rounds,
            "attention": list(variants)}  # fmt: skip
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"meta": meta, "median_ms_per_step": table, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="gemma")
    parser.add_argument("--quantization", default="w8a8", help="the engine's weight quantization, or none")
    parser.add_argument("--batch", type=int, default=8, help="streams decoding")
    parser.add_argument("--chunks", nargs="+", type=int, default=[16, 32, 64], help="prompt tokens per timed step")
    parser.add_argument("--column", type=int, default=1000, help="prompt column where the timed chunks start")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per kind and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attention", choices=("both", "kernel", "sdpa"), default="both",
                        help="the chunk's attention: the extension's kernel, scaled_dot_product_attention, or both "
                        "alternating (w8a8 only; other modes: sdpa)")  # fmt: skip
    args = parser.parse_args()
    report = run(args)
    rows = []
    table = report["median_ms_per_step"]
    for kind, parts in table.items():
        rows.append([kind, *(f"{parts[p]:.1f}" for p in (*PARTS, "forward", "step"))])
    print_markdown(["step", *PARTS, "forward", "step"], rows)
    variants = report["meta"]["attention"]
    suffix = "" if variants == ["sdpa"] else "_" + "_".join(variants)  # round 11's files: the flash kernel alone
    name = f"chunk_step_{args.model}_{args.quantization}_column{args.column}{suffix}.json"
    write_json(ROOT / "bench" / "results", name, report)


if __name__ == "__main__":
    main()
