"""``EngineConfig.cpu_kernels``: which models run their norms, rotary embedding, MLP gate and attention in the kernel
extension, and the same tokens as PyTorch's operators."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.tiny_model import PROMPTS, tiny_gemma

from chatstream.engine.cpu import w8a8
from chatstream.engine.cpu.fast_path import LayerOps
from chatstream.engine.model_runner import ModelRunner

needs_attention = pytest.mark.skipif(
    w8a8.attention_unavailable_reason() is not None, reason=f"kernel attention: {w8a8.attention_unavailable_reason()}"
)


def _greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill ``prompts`` together, then decode ``steps`` greedy steps; every step's logits and each row's tokens."""
    with torch.inference_mode():
        batch, logits = runner.prefill(prompts)
        steps_logits, tokens = [logits], [[] for _ in prompts]
        for _ in range(steps):
            batch.next_tokens = logits.argmax(-1)
            for row, token in enumerate(batch.next_tokens.tolist()):
                tokens[row].append(token)
            logits = runner.decode(batch)
            steps_logits.append(logits)
    return steps_logits, tokens


@needs_attention
def test_a_bfloat16_model_runs_on_the_extension_and_gives_the_same_tokens(tiny_tokenizer: Any) -> None:
    model = tiny_gemma(len(tiny_tokenizer))
    kernels, plain = ModelRunner(model), ModelRunner(model, cpu_kernels=False)
    assert kernels.fused is not None and plain.fused is not None
    ops = kernels.fused.ops
    attention = w8a8.chunk_attention_into if w8a8.attention_unused_reason() is None else None
    assert (ops.rotate, ops.gated, ops.chunk_attention) == (w8a8.rotate, w8a8.gated, attention)
    assert kernels.fused.final_norm.__name__ == "kernel_rms_norm"
    assert plain.fused.ops == LayerOps()
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS[:3]]
    (got, got_tokens), (expected, expected_tokens) = _greedy(kernels, prompts, 6), _greedy(plain, prompts, 6)
    assert got_tokens == expected_tokens
    for a, b in zip(got, expected, strict=True):  # within bfloat16 rounding of the largest logit
        assert float((a.float() - b.float()).abs().max()) < 0.02 * float(b.float().abs().max())


def test_a_float32_model_keeps_pytorchs_operators_unless_asked(tiny_model: Any) -> None:
    runner = ModelRunner(tiny_model)
    assert runner.fused is not None and runner.fused.ops == LayerOps()
    if w8a8.unavailable_reason() is None:
        asked = ModelRunner(tiny_model, cpu_kernels=True)
        assert asked.fused is not None and asked.fused.ops.rotate is w8a8.rotate
        # where the CPU has it, set, though float32 activations never take it
        assert (asked.fused.ops.chunk_attention is not None) == (w8a8.attention_unused_reason() is None)


def test_asking_for_them_where_they_cannot_run_is_an_error(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w8a8, "_cpu_flags", lambda: frozenset({"avx512f"}))
    with pytest.raises(RuntimeError, match="cpu_kernels=True, but the kernel extension cannot run here: this CPU"):
        ModelRunner(tiny_model, cpu_kernels=True)
    runner = ModelRunner(tiny_gemma(512))  # by default: PyTorch's, quietly
    assert runner.fused is not None and runner.fused.ops == LayerOps()


def test_a_build_that_fails_leaves_pytorchs_operators_unless_they_were_asked_for(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failed_build() -> LayerOps:
        raise OSError("c++: fatal error: Python.h: No such file or directory")

    monkeypatch.setattr(w8a8, "unavailable_reason", lambda: None)
    monkeypatch.setattr(w8a8, "layer_ops", failed_build)
    runner = ModelRunner(tiny_gemma(512))
    assert runner.fused is not None and runner.fused.ops == LayerOps()
    with pytest.raises(RuntimeError, match=r"cpu_kernels=True, but the kernel extension did not build: c\+\+: fatal"):
        ModelRunner(tiny_model, cpu_kernels=True)


@needs_attention
@pytest.mark.parametrize("tiles", [False, True])
def test_the_attention_stays_with_pytorch_on_cpus_with_matrix_tiles(
    tiles: bool, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = w8a8._cpu_flags() - set(w8a8.TILE_CPU_FLAGS)
    monkeypatch.setattr(w8a8, "_cpu_flags", lambda: flags | set(w8a8.TILE_CPU_FLAGS) if tiles else flags)
    runner = ModelRunner(tiny_gemma(len(tiny_tokenizer)))
    assert runner.fused is not None and runner.fused.ops.rotate is w8a8.rotate
    assert runner.fused.ops.chunk_attention is (None if tiles else w8a8.chunk_attention_into)
