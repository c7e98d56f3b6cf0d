"""oneDNN-prepacked linear layers: same results as ``F.linear``, used only inside ``active()`` on that thread."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from chatstream.engine.model_runner import ModelRunner
from chatstream.engine.packed_linear import PackedLinears, packing_supported

pytestmark = pytest.mark.skipif(
    not packing_supported(nn.Linear(2, 2)), reason="this torch build has no oneDNN packed linear"
)


def _model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 300, bias=False)).to(dtype).eval()


def test_bf16_packed_output_is_bitwise_equal() -> None:
    model = _model(torch.bfloat16)
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x)
        packed = PackedLinears.for_model(model)
        with packed.active():
            got = model(x)
    assert packed.num_layers == 2
    assert torch.equal(got, expected)


def test_fp32_packed_output_is_close() -> None:
    model = _model(torch.float32)
    x = torch.randn(7, 64)
    with torch.inference_mode():
        expected = model(x)
        with PackedLinears.for_model(model).active():
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_path_only_inside_active_on_that_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(torch.bfloat16)
    packed = PackedLinears.for_model(model)
    assert PackedLinears.for_model(model) is packed  # packed once per model
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
    with PackedLinears.for_model(model).active():
        model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None


def test_runner_packs_unless_told_not_to(tiny_model: nn.Module) -> None:
    assert ModelRunner(tiny_model).packed is not None
    assert ModelRunner(tiny_model, pack_weights=False).packed is None
