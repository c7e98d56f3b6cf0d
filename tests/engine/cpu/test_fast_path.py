"""The CPU fast path: packed linears and fused RMSNorms give the same results, used only inside ``active()``."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from chatstream.engine.cpu.fast_path import CpuFastPath, dtype_packable, packing_supported
from chatstream.engine.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(
    not packing_supported(nn.Linear(2, 2)), reason="this torch build has no oneDNN packed linear"
)
needs_bf16_packing = pytest.mark.skipif(
    not dtype_packable(torch.bfloat16), reason="this CPU has no oneDNN bf16 support (AVX512-BW/VL/DQ or AVX-NE-CONVERT)"
)


def _model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 300, bias=False)).to(dtype).eval()


@needs_bf16_packing
def test_bf16_packed_output_is_bitwise_equal() -> None:
    model = _model(torch.bfloat16)
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x)
        packed = CpuFastPath.for_model(model)
        with packed.active():
            got = model(x)
    assert packed.num_linears == 2
    assert torch.equal(got, expected)


def test_fp32_packed_output_is_close() -> None:
    model = _model(torch.float32)
    x = torch.randn(7, 64)
    with torch.inference_mode():
        expected = model(x)
        with CpuFastPath.for_model(model).active():
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_bf16_packing
def test_packed_path_only_inside_active_on_that_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(torch.bfloat16)
    packed = CpuFastPath.for_model(model)
    assert CpuFastPath.for_model(model) is packed  # packed once per model
    calls: list[str] = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append("packed") or real(*a))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        model(x)
        assert calls == []
        seen_elsewhere: list[int] = []
        with packed.active():
            worker = threading.Thread(target=lambda: seen_elsewhere.append(_count_packed(model, x, calls)))
            worker.start()
            worker.join()
            model(x)
    assert seen_elsewhere == [0]
    assert calls == ["packed", "packed"]


def _count_packed(model: nn.Module, x: torch.Tensor, calls: list[str]) -> int:
    before = len(calls)
    with torch.inference_mode():
        model(x)
    return len(calls) - before


def test_grad_mode_uses_the_original_layer() -> None:
    model = _model(torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    with CpuFastPath.for_model(model).active():
        model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None


def test_runner_packs_unless_told_not_to(tiny_model: nn.Module) -> None:
    assert ModelRunner(tiny_model).fast_path is not None
    assert ModelRunner(tiny_model, pack_weights=False).fast_path is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm_class", [Gemma3RMSNorm, LlamaRMSNorm])
def test_fused_norms_are_bitwise_equal(norm_class: type[nn.Module], dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    norm = norm_class(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48) * 0.3)
    model = nn.Sequential(norm)
    x = torch.randn(4, 5, 48, dtype=dtype) * 4
    with torch.inference_mode():
        expected = model(x)
        fast_path = CpuFastPath.for_model(model)
        with fast_path.active():
            got = model(x)
    assert fast_path.num_norms == 1
    assert torch.equal(got, expected)


@needs_bf16_packing
def test_gemma_decode_logits_unchanged(tiny_tokenizer: object) -> None:
    from tests.engine.test_engine_gemma import build_gemma

    model = build_gemma(tiny_tokenizer, 8).to(torch.bfloat16)
    ids = torch.tensor([list(range(5, 40))])
    with torch.inference_mode():
        expected = model(ids).logits
        fast_path = CpuFastPath.for_model(model)
        with fast_path.active():
            got = model(ids).logits
    assert fast_path.num_linears == 4 * 7 + 1 and fast_path.num_norms == 4 * 6 + 1
    assert torch.equal(got, expected)
