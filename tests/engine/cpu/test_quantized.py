"""Weight-only int8/int4 linear layers: the kernels against the dequantized weights, and the engine end to end."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.tiny_model import PROMPTS, collect, greedy
from torch.nn import functional as F

from chatstream.engine.base import FinishReason, GenerationRequest
from chatstream.engine.cpu.quantized import (
    DecodeQuantized,
    dequantize_int4,
    int4_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
    quantized_linear,
)
from chatstream.engine.model_runner import ModelRunner


def _weight(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # bfloat16 activations and outputs: a few units in the last of bf16's 8 significant bits
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 0.02 * scale


def test_int8_rounds_each_weight_to_its_channels_grid() -> None:
    w = _weight(48, 64)
    q, scale = quantize_int8(w)
    assert q.dtype is torch.int8 and scale.shape == (48,)
    assert float((q.float() * scale[:, None] - w).abs().max()) <= float(scale.max()) / 2 + 1e-6


def test_int4_rounds_each_weight_to_its_groups_grid() -> None:
    w = _weight(48, 64)
    q, scale, low = quantize_int4(w, 32)
    assert int(q.min()) >= 0 and int(q.max()) <= 15 and scale.shape == (48, 2)
    error = (dequantize_int4(q, scale, low) - w).abs().view(48, 2, 32).amax(dim=2)
    assert bool((error <= scale / 2 + 1e-5).all())


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_kernel_matches_the_dequantized_weight(rows: int) -> None:
    w, bias = _weight(64, 96), torch.randn(64)
    x = torch.randn(rows, 96)
    q, scale = quantize_int8(w)
    expected = F.linear(x.bfloat16().float(), q.float() * scale[:, None], bias)
    _close(int8_linear(w, bias)(x), expected)


@pytest.mark.parametrize(("rows", "group"), [(1, 32), (7, 64)])
def test_int4_kernel_matches_the_dequantized_weight(rows: int, group: int) -> None:
    w = _weight(128, 128)
    x = torch.randn(rows, 128)
    q, scale, low = quantize_int4(w, group)
    expected = F.linear(x.bfloat16().float(), dequantize_int4(q, scale, low))
    got = int4_linear(w, None, group)(x)
    assert got.dtype is torch.float32 and got.shape == (rows, 128)
    _close(got, expected)
    _close(int4_linear(w, None, group)(x.view(rows, 1, 128)).view(rows, 128), expected)  # [B, S, K] inputs


def test_shapes_a_kernel_cannot_take_stay_unquantized() -> None:
    assert quantized_linear("int4", _weight(64, 40), None, 32) is None
    assert quantized_linear("int8", _weight(64, 40), None, 32) is not None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_keeps_the_weights_and_decode_uses_the_quantized_ones(
    mode: str, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    plain = ModelRunner(tiny_model)
    quantized = ModelRunner(tiny_model, quantization=mode)
    assert quantized.fused is not None and plain.fused is not None
    assert isinstance(quantized.fused.lm_head, DecodeQuantized) and not isinstance(plain.fused.lm_head, DecodeQuantized)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        plain_batch, expected = plain.prefill(prompts)
        batch, got = quantized.prefill(prompts)
        assert torch.equal(got, expected)  # prefill tokens run on the model's own weights
        plain_batch.next_tokens = batch.next_tokens = expected.argmax(-1)
        expected, got = plain.decode(plain_batch), quantized.decode(batch)
    assert not torch.equal(got, expected)
    # the tiny model's random weights (wide init) are a hard case for 16 levels; the real model's quality is
    # measured by bench/quant_quality.py
    similarity = F.cosine_similarity(got.float(), expected.float(), dim=-1)
    assert float(similarity.min()) > (0.99 if mode == "int8" else 0.6), similarity
    if mode == "int8":
        assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.75


@pytest.mark.parametrize("mode", ["int8", "int4"])
async def test_engine_serves_with_quantized_weights(mode: str, make_tiny_engine: Any) -> None:
    engine = make_tiny_engine(weight_quantization=mode, max_batch_size=4)
    assert engine.llm.model_runner.fused is not None
    requests = [GenerationRequest(f"r{i}", PROMPTS[i], greedy(12, ignore_eos=True)) for i in range(4)]
    streams = [engine.add_request(request) for request in requests]
    outs = [await collect(s) for s in streams]
    assert all(out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 12 for out in outs)
    again = await collect(engine.add_request(GenerationRequest("again", PROMPTS[2], greedy(12, ignore_eos=True))))
    assert again.token_ids == outs[2].token_ids  # batched or alone, the same tokens
