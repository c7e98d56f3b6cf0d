"""How much a decode step would gain from running as one compiled graph: Gemma-3's decode step written as one
function over prepacked weights and fixed KV buffers, compiled with ``torch.compile`` (inductor), against the
engine's fused decoder (eager), side by side in one run.

    PYTHONPATH=src python bench/compiled_step.py --batch 8 --contexts 64 256 1024 --rounds 5

This measures headroom; the engine does not compile anything. The function here is the fused decoder's decode
arithmetic for Gemma-3 only (sandwich norms, q/k norms, sliding windows, no soft-capping), with the oneDNN-packed
matrix products and the KV-append-and-attend of each layer as opaque operators (inductor lowers neither as the
engine calls them), so inductor fuses everything between them: norms, rotary, residuals, the GELU gate. Before
timing, its eager result is checked to equal the fused decoder's bitwise (the same arithmetic); the compiled one
differs by rounding (reported).

Per context length: ``--batch`` rows are prefilled with random ids by the fused decoder, then each round times
``--steps`` decode steps of each variant, the order alternating between rounds; the table shows the medians over
rounds of each round's median step, their ratio, and the median of the rounds' own ratios (compiled / fused in
the same round). The first compile is timed separately (``first_compile_s``; inductor caches its kernels on disk,
so a second run compiles faster). Before them, the floor of the step's largest read: the memory bandwidth (GB/s
summing a buffer of the LM head's size) and the rate at which the packed LM head reads its weights at 1 and
``--batch`` rows. Results go to bench/results/compiled_step_gemma_<dtype>.json.
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
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.engine_throughput import load  # noqa: E402
from bench.report import print_markdown, write_json  # noqa: E402
from bench.stats import median_call_s  # noqa: E402
from chatstream.engine.cpu.support import rope_tables  # noqa: E402
from chatstream.engine.kv_cache import BatchKVCache  # noqa: E402
from chatstream.engine.model_runner import ModelRunner  # noqa: E402


@torch.library.custom_op("chatstream_bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` on a weight packed by ``mkldnn._reorder_linear_weight`` (as the engine runs it)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("chatstream_bench::append_attend", mutates_args=("key_buffer", "value_buffer"))
def append_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_buffer: torch.Tensor,
    value_buffer: torch.Tensor,
    mask: torch.Tensor,
    length: int,
    start: int,
    scale: float,
) -> torch.Tensor:
    """Write column ``length`` of the buffers, then attend ``q`` ``[B, Hkv, G, D]`` to columns ``[start, length]``."""
    key_buffer[:, :, length : length + 1].copy_(k)
    value_buffer[:, :, length : length + 1].copy_(v)
    keys, values = key_buffer[:, :, start : length + 1], value_buffer[:, :, start : length + 1]
    allowed = mask[:, None, None, start : length + 1]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)


@append_attend.register_fake
def _(q, k, v, key_buffer, value_buffer, mask, length, start, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


class GemmaDecodeStep:
    """Gemma-3's decode step as one function of (ids, positions, mask, KV buffers, cache length) → logits."""

    def __init__(self, model: Any) -> None:
        config, base = model.config, model.model
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.head_dim = int(config.head_dim)
        self.q_kv = (self.heads + self.kv_heads) * self.head_dim
        self.eps = float(config.rms_norm_eps)
        self.embed = base.embed_tokens.weight.detach()
        self.embed_scale = base.embed_tokens.embed_scale.to(self.embed.dtype)
        self.rope = rope_tables(base.rotary_emb)
        self.final_scale = self._scale(base.norm)
        self.lm_head = _pack(model.get_output_embeddings().weight)
        kinds, window = list(config.layer_types), config.sliding_window
        self.layers = [self._layer(layer, kind, window) for layer, kind in zip(base.layers, kinds, strict=True)]

    @staticmethod
    def _scale(norm: Any) -> torch.Tensor:
        return 1.0 + norm.weight.detach().float()

    def _layer(self, layer: Any, kind: str, window: int) -> dict[str, Any]:
        attn, mlp = layer.self_attn, layer.mlp
        qk_scale = torch.cat(
            [self._scale(attn.q_norm).expand(self.heads, -1), self._scale(attn.k_norm).expand(self.kv_heads, -1)]
        )
        return {
            "input": self._scale(layer.input_layernorm),
            "qkv": _pack(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
            "qk": qk_scale,
            "o": _pack(attn.o_proj.weight),
            "post_attention": self._scale(layer.post_attention_layernorm),
            "pre_mlp": self._scale(layer.pre_feedforward_layernorm),
            "gate_up": _pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
            "down": _pack(mlp.down_proj.weight),
            "post_mlp": self._scale(layer.post_feedforward_layernorm),
            "rope": kind if kind in self.rope else "default",
            "window": window if kind == "sliding_attention" else None,
            "scaling": float(attn.scaling),
        }

    def _norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * scale).to(x.dtype)

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        key_buffers: list[torch.Tensor],
        value_buffers: list[torch.Tensor],
        length: int,
    ) -> torch.Tensor:
        rows, heads = ids.shape[0], self.heads + self.kv_heads
        x = F.embedding(ids, self.embed) * self.embed_scale
        tables = {}
        for kind, (inv_freq, scaling) in self.rope.items():
            freqs = positions[:, None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * scaling, emb.sin() * scaling
            sin = torch.cat((-sin[:, : inv_freq.shape[0]], sin[:, inv_freq.shape[0] :]), dim=-1)
            tables[kind] = (cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1))
        for index, layer in enumerate(self.layers):
            qkv = packed_linear(self._norm(x, layer["input"]), layer["qkv"])
            qk = self._norm(qkv[:, : self.q_kv].view(rows, heads, self.head_dim), layer["qk"])
            cos, sin = tables[layer["rope"]]
            qk = qk * cos + qk.view(rows, heads, 2, -1).flip(2).view(rows, heads, -1) * sin
            k = qk[:, self.heads :].view(rows, self.kv_heads, 1, self.head_dim)
            v = qkv[:, self.q_kv :].view(rows, self.kv_heads, 1, self.head_dim)
            q = qk[:, : self.heads].reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            start = 0 if layer["window"] is None else max(0, length + 1 - layer["window"])
            attended = append_attend(
                q, k, v, key_buffers[index], value_buffers[index], mask, length, start, layer["scaling"]
            )
            h = packed_linear(attended.reshape(rows, self.heads * self.head_dim), layer["o"])
            x = x + self._norm(h, layer["post_attention"])
            gate, up = packed_linear(self._norm(x, layer["pre_mlp"]), layer["gate_up"]).chunk(2, dim=-1)
            h = packed_linear(F.gelu(gate, approximate="tanh") * up, layer["down"])
            x = x + self._norm(h, layer["post_mlp"])
        return packed_linear(self._norm(x, self.final_scale), self.lm_head)


class Batch:
    """``rows`` prefilled rows of ``context`` random tokens: the fused decoder's cache and a copy in fixed buffers
    with room for ``room`` more columns."""

    def __init__(self, runner: ModelRunner, rows: int, context: int, room: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(context)
        ids = torch.randint(3, vocab, (rows, context), generator=generator)
        self.positions = torch.arange(context).expand(rows, context)
        self.cache = BatchKVCache(runner.num_layers)
        with torch.inference_mode():
            runner.fused(ids, self.positions, torch.ones((rows, context), dtype=torch.bool), self.cache)
        self.keys, self.values = [], []
        for layer in self.cache.buffered:
            size = list(layer.k.shape)
            size[2] = context + room
            self.keys.append(layer.k.new_zeros(size))
            self.values.append(layer.v.new_zeros(size))
            self.keys[-1][:, :, :context].copy_(layer.k)
            self.values[-1][:, :, :context].copy_(layer.v)
        self.length = context  # columns filled in the fixed buffers
        self.next_ids = torch.randint(3, vocab, (rows,), generator=generator)

    def graph_step(self, step: Callable[..., torch.Tensor]) -> torch.Tensor:
        rows = self.next_ids.shape[0]
        mask = torch.ones((rows, self.length + 1), dtype=torch.bool)
        positions = torch.full((rows,), self.length, dtype=torch.long)
        logits = step(self.next_ids, positions, mask, self.keys, self.values, self.length)
        self.length += 1
        return logits

    def fused_step(self, runner: ModelRunner) -> torch.Tensor:
        rows, length = self.next_ids.shape[0], self.cache.buffered[0].length
        mask = torch.ones((rows, length + 1), dtype=torch.bool)
        positions = torch.full((rows, 1), length, dtype=torch.long)
        return runner.fused(self.next_ids[:, None], positions, mask, self.cache)


def _median_step_ms(step: Callable[[], Any], steps: int) -> float:
    return 1000 * median_call_s(step, steps)


def memory_roof(step: GemmaDecodeStep, rows: int) -> dict[str, float]:
    """The floors of a step's largest read: GB/s of summing a buffer of the LM head's size, and of the LM head
    itself at 1 and ``rows`` rows (medians of 15 calls)."""
    head = step.lm_head
    size = head.shape[0] * head.shape[1] * head.element_size()
    buffer = torch.ones(size // 4)  # fp32: the same bytes

    def rate(call: Callable[[], Any]) -> float:
        for _ in range(3):
            call()
        return size / 1e9 / (_median_step_ms(call, 15) / 1000)

    one, many = (torch.ones(n, head.shape[1], dtype=step.embed.dtype) for n in (1, rows))
    return {
        "sum_gb_s": rate(buffer.sum),
        "lm_head_1_row_gb_s": rate(functools.partial(packed_linear, one, head)),
        f"lm_head_{rows}_rows_gb_s": rate(functools.partial(packed_linear, many, head)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load("gemma", args.dtype, None)
    runner = ModelRunner(model)
    if runner.fused is None:
        raise SystemExit("the fused decoder is not in use for this model: nothing to compare")
    eager = GemmaDecodeStep(model)
    compiled = torch.compile(eager, dynamic=True)
    vocab = int(model.config.vocab_size)
    room = 4 + (args.rounds + 1) * args.steps
    rows = []
    with torch.inference_mode():
        roof = memory_roof(eager, args.batch)
        print("memory roof:", ", ".join(f"{name} {value:.1f}" for name, value in roof.items()), flush=True)
        for context in args.contexts:
            batch = Batch(runner, args.batch, context, room, vocab)
            reference, own = batch.fused_step(runner), batch.graph_step(eager)
            if not torch.equal(reference, own):
                raise SystemExit(f"context {context}: the eager graph differs from the fused decoder")
            # each variant appends one column per step to its own cache: they step in pairs to stay the same length
            started = time.perf_counter()
            batch.graph_step(compiled)
            compile_s = time.perf_counter() - started
            batch.fused_step(runner)
            compiled_logits = batch.graph_step(compiled)  # a second cache length: no recompile expected
            fused_logits = batch.fused_step(runner)
            difference = float((compiled_logits.float() - fused_logits.float()).abs().max())
            agree = float((compiled_logits.argmax(-1) == fused_logits.argmax(-1)).float().mean())
            variants = {
                "compiled": functools.partial(batch.graph_step, compiled),
                "fused": functools.partial(batch.fused_step, runner),
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.rounds):
                order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
                for name in order:
                    times[name].append(_median_step_ms(variants[name], args.steps))
            compiled_ms, fused_ms = (statistics.median(times[name]) for name in ("compiled", "fused"))
            rows.append(
                {
                    "context": context,
                    "compiled_ms": compiled_ms,
                    "fused_ms": fused_ms,
                    "ratio": compiled_ms / fused_ms,
                    "paired_ratio": statistics.median(
                        c / f for c, f in zip(times["compiled"], times["fused"], strict=True)
                    ),
                    "first_compile_s": compile_s,
                    "max_logit_difference": difference,
                    "argmax_agreement": agree,
                    "compiled_all_ms": times["compiled"],
                    "fused_all_ms": times["fused"],
                }
            )
            print(f"context {context}: compiled {compiled_ms:.2f} ms, fused {fused_ms:.2f} ms", flush=True)
    meta = {"model": "gemma", "dtype": args.dtype, "batch": args.batch, "rounds": args.rounds, "steps": args.steps}
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    meta.update(load_average_after=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"meta": meta, "memory_roof": roof, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--contexts", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    header = ("context", "compiled step (ms)", "fused decoder (ms)", "compiled / fused", "per round", "compile (s)")
    formats = {"compiled_ms": ".1f", "fused_ms": ".1f", "ratio": ".2f", "paired_ratio": ".2f", "first_compile_s": ".0f"}
    results = report["results"]
    print_markdown(header, [[str(row["context"])] + [format(row[k], f) for k, f in formats.items()] for row in results])
    write_json(args.out, f"compiled_step_gemma_{args.dtype}.json", report)


if __name__ == "__main__":
    main()
