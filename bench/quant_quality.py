"""What weight-only quantization does to the outputs: the quantized modes next to the model's own weights.

    PYTHONPATH=src python bench/quant_quality.py                      # the embedded Gemma-3-270M, fp32
    PYTHONPATH=src python bench/quant_quality.py --modes int8 int4 --prompts 8 --new-tokens 32
    PYTHONPATH=src python bench/quant_quality.py --dtype bf16 --modes --cpu-kernels --against-fp32

For each mode: the greedy continuations of a fixed prompt set (bench/prompts.json) through the engine, compared
with the unquantized ones on PyTorch's operators (``cpu_kernels=False``; identical continuations, tokens matching
before the first difference), and the perplexity of a fixed text when every token is predicted by the quantized
decode path (teacher-forced: row ``i`` of one batch holds the first ``i + 1`` tokens). ``--cpu-kernels`` adds the
unquantized model on the kernel extension's norms, rotary embedding, MLP gate and attention (``cpu_kernels=True``).
Quantized modes run with the engine's default ``cpu_kernels``. ``--against-fp32`` also compares every row's answers
with the float32 model's (``vs_fp32``). Results go to bench/results/quant_quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from chatstream.config import WEIGHT_QUANTIZATIONS, EngineConfig, SamplingParams  # noqa: E402
from chatstream.engine.base import GenerationRequest  # noqa: E402
from chatstream.engine.kv_cache import BatchKVCache, ForwardGroup  # noqa: E402
from chatstream.engine.llm_engine import LLMEngine  # noqa: E402
from chatstream.models.loader import load_model  # noqa: E402


def continuations(llm: LLMEngine, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of every prompt, batched."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        llm.add_request(GenerationRequest(f"q{i}", prompt, params))
    tokens: dict[str, list[int]] = {f"q{i}": [] for i in range(len(prompts))}
    while llm.has_work():
        for request_id, delta in llm.step():
            tokens[request_id] += delta.token_ids
    return [tokens[f"q{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def perplexity(llm: LLMEngine, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids[1:]``, each predicted on the decode path."""
    runner = llm.model_runner
    rows = len(ids) - 1
    input_ids = torch.zeros((rows, rows), dtype=torch.long)
    mask = torch.zeros((rows, rows), dtype=torch.bool)
    for row in range(rows):
        input_ids[row, rows - row - 1 :] = torch.tensor(ids[: row + 1])
        mask[row, rows - row - 1 :] = True
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    part = ForwardGroup(input_ids, positions, mask, BatchKVCache(runner.num_layers), decode=True)
    (logits,) = runner._forward([part])
    assert logits is not None
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [rows, V]
    targets = torch.tensor(ids[1:])
    return math.exp(-float(log_probs[torch.arange(rows), targets].mean()))


def compare(reference: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    prefixes = []
    for a, b in zip(reference, got, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(same)
    total = sum(len(a) for a in reference)
    return {
        "identical_continuations": sum(a == b for a, b in zip(reference, got, strict=True)) / len(reference),
        "tokens_before_first_difference_mean": sum(prefixes) / len(prefixes),
        "token_agreement": sum(x == y for a, b in zip(reference, got, strict=True) for x, y in zip(a, b, strict=False))
        / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or GGUF (default: the embedded Gemma-3-270M)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--modes", nargs="*", default=["int8", "int4"], choices=WEIGHT_QUANTIZATIONS)
    parser.add_argument("--cpu-kernels", action="store_true", help="add the model on the extension's operations")
    parser.add_argument("--against-fp32", action="store_true", help="also compare every row with float32's answers")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=128, help="tokens of the perplexity text")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant_quality.json")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    data = json.loads((ROOT / "bench" / "prompts.json").read_text(encoding="utf-8"))
    prompts = list(data["single"][: args.prompts])
    text_ids = tokenizer.encode(" ".join(data["single"]))[: args.text_tokens]
    results: dict[str, Any] = {}
    reference: list[list[int]] = []
    configs: list[tuple[str, dict[str, Any]]] = [(args.dtype, {"cpu_kernels": False})]
    configs += [(f"{args.dtype} on the extension's operations", {"cpu_kernels": True})] if args.cpu_kernels else []
    configs += [(mode, {"weight_quantization": mode}) for mode in args.modes]
    answers: dict[str, list[list[int]]] = {}
    for name, options in configs:
        started = time.perf_counter()
        llm = LLMEngine(model, tokenizer, EngineConfig(prefix_cache_bytes=0, **options))
        got = continuations(llm, prompts, args.new_tokens)
        row: dict[str, Any] = {"perplexity": perplexity(llm, text_ids)}
        reference = reference or got
        row.update(compare(reference, got))
        answers[name] = got
        row["seconds"] = time.perf_counter() - started
        results[name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    if args.against_fp32:
        model, tokenizer = load_model(args.model, dtype="fp32")
        llm = LLMEngine(model, tokenizer, EngineConfig(prefix_cache_bytes=0, cpu_kernels=False))
        fp32 = continuations(llm, prompts, args.new_tokens)
        for name, got in answers.items():
            results[name]["vs_fp32"] = compare(fp32, got)
            print(name, "against float32:", {k: round(v, 4) for k, v in results[name]["vs_fp32"].items()})
    meta = {"model": args.model or "embedded Gemma-3-270M", "dtype": args.dtype, "prompts": len(prompts)}
    meta.update(new_tokens=args.new_tokens, text_tokens=len(text_ids), torch=torch.__version__)
    meta.update(time=time.strftime("%Y-%m-%dT%H:%M:%S"), load_average=os.getloadavg()[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
