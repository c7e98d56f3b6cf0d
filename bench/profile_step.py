"""Where one decode step of the engine spends its time, at several batch sizes.

    PYTHONPATH=src python bench/profile_step.py --model gemma --dtype bf16 --batch 1 8 32
    PYTHONPATH=src python bench/profile_step.py --model tiny --batch 1 4 --steps 4
    PYTHONPATH=src python bench/profile_step.py --model gemma --dtype bf16 --quantization int4 --batch 1

Two views per batch size B:

1. **Phases of the real engine step** (wall clock, no profiler): B greedy requests run in the engine thread; once all
   B are in the batch, each decode step is split into the model forward (``ModelRunner._forward_parts``: the step's
   decode groups in one forward), sampling, postprocessing (``Scheduler.update_from_output``: detokenize, stop
   checks), delivery to the event loop and the rest of the step (scheduling, deltas).
2. **Operators and modules** (``torch.profiler``, on this thread): the same decode + greedy sample on a prefilled
   batch, grouped by module (embedding, masks, rotary, attention and its projections, MLP, norms, LM head) and the top
   operators by self CPU time. The profiler adds per-op overhead, so compare its shares, not its absolute times, with
   view 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.engine_throughput import PROMPTS, load  # noqa: E402
from bench.stats import timed  # noqa: E402
from chatstream.config import WEIGHT_QUANTIZATIONS, EngineConfig, SamplingParams  # noqa: E402
from chatstream.engine import sampler  # noqa: E402
from chatstream.engine.async_engine import TransformersEngine  # noqa: E402
from chatstream.engine.base import GenerationRequest  # noqa: E402
from chatstream.engine.model_runner import ModelRunner  # noqa: E402

PHASES = ("forward", "sample", "postprocess", "deliver")


# ---- view 1: phases of the real engine step ------------------------------------------------------------------------


class PhaseTimer:
    """Wraps engine methods to time them; keeps only the steps where the whole batch of ``size`` rows decodes.

    A step's record is closed when the next step starts, so that it includes the delivery of its deltas.
    """

    def __init__(self, engine: TransformersEngine, size: int) -> None:
        self.engine, self.size = engine, size
        self.current: dict[str, float] = defaultdict(float)
        self.full = False
        self.steps: list[dict[str, float]] = []
        runner, scheduler = engine.llm.model_runner, engine.llm.scheduler
        runner._forward_parts = self._timed("forward", runner._forward_parts)  # type: ignore[method-assign]
        runner._sample = self._timed("sample", runner._sample)  # type: ignore[method-assign]
        scheduler.update_from_output = self._timed("postprocess", scheduler.update_from_output)  # type: ignore[method-assign]
        engine._deliver = self._timed("deliver", engine._deliver)  # type: ignore[method-assign]
        engine._step = self._timed_step(engine._step)  # type: ignore[method-assign]

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return timed(self.current, name, fn)

    def _timed_step(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def wrapper() -> Any:
            if self.full:
                self.current["step"] += self.current["deliver"]
                self.steps.append(dict(self.current))
            scheduler = self.engine.llm.scheduler
            self.current = defaultdict(float)
            self.full = len(scheduler.running) == self.size and not scheduler.waiting
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self.current["step"] += time.perf_counter() - started

        return wrapper

    def summary(self, skip: int) -> dict[str, float]:
        """Median milliseconds per phase over the full-batch steps after the first ``skip``."""
        steps = self.steps[skip:] or self.steps
        out = {name: 1000 * statistics.median(s.get(name, 0.0) for s in steps) for name in (*PHASES, "step")}
        out["other"] = out["step"] - sum(out[name] for name in PHASES)
        out["steps"] = len(steps)
        return out


async def _run_requests(engine: TransformersEngine, size: int, new_tokens: int) -> None:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    streams = [
        engine.add_request(GenerationRequest(f"p{size}-{i}", PROMPTS[i % len(PROMPTS)], params)) for i in range(size)
    ]

    async def drain(stream: Any) -> None:
        async for _ in stream:
            pass

    await asyncio.gather(*(drain(s) for s in streams))


def engine_phases(
    model: Any, tokenizer: Any, size: int, steps: int, threads: int | None, quantization: str | None = None
) -> dict[str, float]:
    config = EngineConfig(max_batch_size=size, prefix_cache_bytes=0, weight_quantization=quantization)
    engine = TransformersEngine(model, tokenizer, config, num_threads=threads)
    timer = PhaseTimer(engine, size)
    engine.start()
    try:
        asyncio.run(_run_requests(engine, size, steps + 4))
    finally:
        engine.stop()
    return timer.summary(skip=2)


# ---- view 2: operators and modules ---------------------------------------------------------------------------------

MODULE_GROUPS = {
    "embed_tokens": "embedding",
    "rotary_emb": "rotary",
    "self_attn": "attention (all)",
    "q_proj": "attention projections",
    "k_proj": "attention projections",
    "v_proj": "attention projections",
    "o_proj": "attention projections",
    "mlp": "mlp",
    "lm_head": "lm_head",
}


def _group_of(name: str, module: torch.nn.Module) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in MODULE_GROUPS:
        return MODULE_GROUPS[leaf]
    if "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
        return "norms"
    return None


@contextmanager
def labelled_modules(model: Any) -> Iterator[None]:
    """Wrap the forward of every grouped module (and the mask builders) in a profiler label."""
    restore: list[tuple[Any, str, Any]] = []
    for name, module in model.named_modules():
        group = _group_of(name, module)
        if group is not None:
            restore.append((module, "forward", module.forward))
            module.forward = _labelled(f"## {group}", module.forward)
    modeling = sys.modules.get(type(model).__module__)
    for fn_name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        if modeling is not None and hasattr(modeling, fn_name):
            restore.append((modeling, fn_name, getattr(modeling, fn_name)))
            setattr(modeling, fn_name, _labelled("## masks", getattr(modeling, fn_name)))
    try:
        yield
    finally:
        for owner, attr, original in reversed(restore):
            if owner is modeling:
                setattr(owner, attr, original)
            else:
                del owner.__dict__[attr]


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def operator_profile(
    model: Any, tokenizer: Any, size: int, steps: int, top: int, quantization: str | None = None
) -> None:
    runner = ModelRunner(model, quantization=quantization)
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(size)]
    params = [SamplingParams(temperature=0.0)] * size
    with torch.inference_mode():
        batch, logits = runner.prefill(prompts)
        batch.next_tokens = logits.argmax(dim=-1)
        for _ in range(3):
            batch.next_tokens = runner.decode(batch).argmax(dim=-1)
        with labelled_modules(model), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("## step"):
                    with record_function("## forward"):
                        logits = runner.decode(batch)
                    with record_function("## sample"):
                        batch.next_tokens = sampler.sample(
                            logits, params, prompts, [[] for _ in prompts], [None] * size
                        )
    _print_profile(prof, steps, top)


def _print_profile(prof: Any, steps: int, top: int) -> None:
    events = prof.key_averages()
    labels = {e.key: e.cpu_time_total / steps / 1000 for e in events if e.key.startswith("## ")}
    step = labels.get("## step", 0.0)
    print(f"  modules (inclusive ms per step under the profiler; step = {step:.2f} ms):")
    for key, ms in sorted(labels.items(), key=lambda kv: -kv[1]):
        share = 100 * ms / step if step else 0.0
        print(f"    {key[3:]:24} {ms:8.2f}  {share:5.1f}%")
    ops = sorted((e for e in events if not e.key.startswith("## ")), key=lambda e: -e.self_cpu_time_total)
    print(f"  top {top} operators by self CPU time (ms per step, calls per step):")
    for e in ops[:top]:
        print(f"    {e.key:40} {e.self_cpu_time_total / steps / 1000:8.2f}  {e.count / steps:6.1f}")
    calls = sum(e.count for e in events if not e.key.startswith("## ")) / steps
    print(f"  operator calls per step: {calls:.0f}")


# ---- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=16, help="decode steps measured per batch size")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's choice)")
    parser.add_argument("--skip-ops", action="store_true", help="only the phase view")
    parser.add_argument(
        "--quantization", choices=WEIGHT_QUANTIZATIONS, default=None, help="weight-only quantized decode"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # this thread (the operator view); the engine sets its own thread
    model, tokenizer = load(args.model, args.dtype, None)
    for size in args.batch:
        phases = engine_phases(model, tokenizer, size, args.steps, args.threads, args.quantization)
        label = f"{args.model} {args.dtype}" + (f" {args.quantization}" if args.quantization else "")
        print(f"\nB={size} {label} threads={torch.get_num_threads()}: engine step (median ms)")
        print("  " + "  ".join(f"{k} {phases[k]:.2f}" for k in (*PHASES, "other", "step")))
        print(f"  => {size / phases['step'] * 1000:.1f} tok/s over {phases['steps']:.0f} full-batch steps")
        if not args.skip_ops:
            operator_profile(model, tokenizer, size, args.steps, args.top, args.quantization)


if __name__ == "__main__":
    main()
