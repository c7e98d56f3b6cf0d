"""The constrained sampler's added cost per decode step (engine/structured.py): computing each row's token mask,
applying the masks to the ``[B, V]`` logits, and advancing each row's grammar by its sampled token.

    PYTHONPATH=src python bench/structured_cost.py                     # tiny and Gemma vocabularies, 8 and 32 rows
    PYTHONPATH=src python bench/structured_cost.py --vocab tiny --runs 3
    PYTHONPATH=src python bench/structured_cost.py --compare           # xgrammar too, when it is installed

Every row is constrained by the same JSON schema (strings, a bounded integer, an enum, an array, a nested object).
Each run drives the rows for ``--steps`` decode steps on random logits, sampling with the engine's own sampler
(temperature 1, seeded); a row that completes its JSON starts a new one, so every step masks every row. The sampler's
own time on the same logits is reported beside the added cost for scale. Figures are medians over runs of the
per-step medians, in milliseconds. Results go to bench/results/structured_cost.json.
"""

from __future__ import annotations

import argparse
import json
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

from chatstream.config import SamplingParams  # noqa: E402
from chatstream.engine.sampler import make_generator, sample  # noqa: E402
from chatstream.engine.structured import (  # noqa: E402
    GrammarCompiler,
    GrammarSpec,
    allocate_bitmask,
    apply_bitmask,
    apply_masks,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
}
RESULTS = ROOT / "bench" / "results" / "structured_cost.json"


def load_tokenizer(vocab: str) -> tuple[Any, int]:
    """The tokenizer and the model's logits width."""
    if vocab == "tiny":
        from tests.tiny_model import build_tokenizer

        tokenizer = build_tokenizer()
        return tokenizer, len(tokenizer)
    from transformers import AutoConfig, AutoTokenizer

    from chatstream.models import prepare_model_dir

    model_dir = prepare_model_dir(None)  # the embedded Gemma-3-270M, converted once and cached
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True), int(config.vocab_size)


class Rows:
    """``rows`` constrained sequences of one library: masks, accepts, restarts of finished rows."""

    def __init__(self, new_matcher: Callable[[], Any], rows: int, stop_ids: list[int]) -> None:
        self.new_matcher, self.stop_ids = new_matcher, set(stop_ids)
        self.matchers = [new_matcher() for _ in range(rows)]

    def accept(self, tokens: list[int], accept: Callable[[Any, int], bool]) -> None:
        for row, token in enumerate(tokens):
            if not accept(self.matchers[row], token):
                raise RuntimeError(f"row {row}: token {token} refused by its grammar")
            if token in self.stop_ids:
                self.matchers[row] = self.new_matcher()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - started) * 1e3


class Laps:
    """Milliseconds between consecutive :meth:`lap` calls, collected by name."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times.setdefault(name, []).append((now - self.last) * 1e3)
        self.last = now


def sampling(rows: int) -> tuple[list[SamplingParams], list[torch.Generator | None]]:
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=row) for row in range(rows)]
    return params, [make_generator(p.seed) for p in params]


def run_ours(compiler: GrammarCompiler, logits_bank: list[torch.Tensor], rows: int, steps: int) -> dict[str, float]:
    """Per-step medians (ms) of one run with engine/structured.py; ``mask`` is the whole :func:`apply_masks`."""
    spec = GrammarSpec.json_schema(SCHEMA)
    state = Rows(lambda: compiler.matcher(spec), rows, list(compiler.stop_token_ids))
    params, generators = sampling(rows)
    laps = Laps()
    for step in range(steps):
        logits = logits_bank[step % len(logits_bank)].clone()  # [B, V]
        bitmask = allocate_bitmask(rows, logits.shape[-1])  # [B, W]
        laps.start()
        for row, matcher in enumerate(state.matchers):
            matcher.fill_bitmask(bitmask, row)
        laps.lap("fill")
        apply_masks(logits, state.matchers)
        laps.lap("mask")
        tokens = sample(logits, params, [()] * rows, [()] * rows, generators).tolist()
        laps.lap("sampler")
        state.accept(tokens, lambda m, t: m.accept(t))
        laps.lap("accept")
    return summarise(laps.times, added=("mask", "accept"))


def run_xgrammar(setup: tuple[Any, Any], logits_bank: list[torch.Tensor], rows: int, steps: int) -> dict[str, float]:
    """The same run with xgrammar's matchers; masks applied with xgrammar's own CPU function and with ours (the
    bitmask layout is the same). ``added`` counts ours: the apply step is the same code for both libraries, so the
    libraries differ in ``fill`` and ``accept``."""
    import xgrammar as xgr

    compiled, stop_ids = setup
    state = Rows(lambda: xgr.GrammarMatcher(compiled), rows, stop_ids)
    params, generators = sampling(rows)
    laps = Laps()
    for step in range(steps):
        logits = logits_bank[step % len(logits_bank)].clone()  # [B, V]
        other = logits.clone()
        bitmask = allocate_bitmask(rows, logits.shape[-1])  # [B, W]
        laps.start()
        for row, matcher in enumerate(state.matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        laps.lap("fill")
        xgr.apply_token_bitmask_inplace(other, bitmask)
        laps.lap("apply_own")
        apply_bitmask(logits, range(rows), bitmask)
        laps.lap("apply_ours")
        tokens = sample(logits, params, [()] * rows, [()] * rows, generators).tolist()
        laps.start()
        state.accept(tokens, lambda m, t: m.accept_token(t))
        laps.lap("accept")
    return summarise(laps.times, added=("fill", "apply_ours", "accept"))


def summarise(times: dict[str, list[float]], added: tuple[str, ...]) -> dict[str, float]:
    medians = {key: statistics.median(values) for key, values in times.items()}
    totals = [sum(times[key][step] for key in added) for step in range(len(times[added[0]]))]
    medians["added"] = statistics.median(totals)
    return medians


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(run[key] for run in runs), 4) for key in runs[0]}


def measure_vocab(vocab: str, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer, vocab_size = load_tokenizer(vocab)
    stop_ids = [int(tokenizer.eos_token_id)]
    compiler, build_ms = timed(lambda: GrammarCompiler(tokenizer, vocab_size, stop_ids))
    _, compile_ms = timed(lambda: compiler.validate(GrammarSpec.json_schema(SCHEMA)))
    _, matcher_ms = timed(lambda: compiler.matcher(GrammarSpec.json_schema(SCHEMA)))
    result: dict[str, Any] = {
        "vocab_size": vocab_size,
        "llguidance": {"tokenizer_build_ms": build_ms, "first_compile_ms": compile_ms, "new_matcher_ms": matcher_ms},
    }
    xgr_setup = setup_xgrammar(tokenizer, vocab_size, stop_ids, result) if args.compare else None
    for rows in args.rows:
        bank = [torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(i)) * 4 for i in range(4)]
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        for _ in range(args.runs):  # alternated, so load on the shared machine hits both alike
            ours.append(run_ours(compiler, bank, rows, args.steps))
            if xgr_setup is not None:
                theirs.append(run_xgrammar(xgr_setup, bank, rows, args.steps))
        result["llguidance"][f"rows_{rows}"] = median_runs(ours)
        if theirs:
            result["xgrammar"][f"rows_{rows}"] = median_runs(theirs)
        print(f"{vocab} V={vocab_size} rows={rows}: ours {result['llguidance'][f'rows_{rows}']}", flush=True)
        if theirs:
            print(f"{vocab} V={vocab_size} rows={rows}: xgrammar {result['xgrammar'][f'rows_{rows}']}", flush=True)
    return result


def setup_xgrammar(tokenizer: Any, vocab_size: int, stop_ids: list[int], result: dict[str, Any]) -> Any:
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar is not installed: --compare skipped", flush=True)
        return None
    info, build_ms = timed(
        lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    compiled, compile_ms = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    result["xgrammar"] = {"tokenizer_build_ms": build_ms, "first_compile_ms": compile_ms}
    return compiled, stop_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", nargs="+", choices=("tiny", "gemma"), default=["tiny", "gemma"])
    parser.add_argument("--rows", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--steps", type=int, default=48, help="decode steps per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the engine uses one per core)")
    parser.add_argument("--compare", action="store_true", help="also measure xgrammar when it is importable")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "steps": args.steps,
        "runs": args.runs,
        "results": {vocab: measure_vocab(vocab, args) for vocab in args.vocab},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
