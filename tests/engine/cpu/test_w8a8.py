"""The w8a8 kernel (int8 weights times int8 activations, compiled on first use) against its arithmetic in PyTorch,
and the engine decoding with it."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.tiny_model import PROMPTS, collect, greedy
from torch.nn import functional as F

from chatstream.engine.base import FinishReason, GenerationRequest
from chatstream.engine.cpu import fast_path, w8a8
from chatstream.engine.cpu.quantized import DecodeQuantized, quantize_int8, quantized_linear
from chatstream.engine.model_runner import ModelRunner

needs_kernel = pytest.mark.skipif(w8a8.unavailable_reason() is not None, reason=f"w8a8: {w8a8.unavailable_reason()}")


def _weight(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in float64: each row quantized to [-127, 127] per block of 32 inputs, times the
    weights' int8 grid."""
    rows, k = x.shape
    blocks = x.double().view(rows, k // 32, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    values = torch.where(amax > 0, torch.round(blocks * 127 / amax), torch.zeros_like(blocks))
    activations = (values * amax / 127).view(rows, k)
    q, scale = quantize_int8(weight)
    return F.linear(activations, q.double() * scale.double()[:, None], None if bias is None else bias.double())


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k", "with_bias"), [(1, 64, 96, True), (5, 40, 64, False), (8, 48, 2048, True),
                                                           (13, 512, 640, True), (32, 16, 32, False)])  # fmt: skip
def test_the_kernel_computes_its_arithmetic(rows: int, n: int, k: int, with_bias: bool) -> None:
    weight = _weight(n, k)
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0.0  # a block of zeros has no scale
    got = quantized_linear("w8a8", weight, bias, 32)
    assert got is not None
    expected = _reference(x, weight, bias)
    out = got(x)
    assert out.dtype is torch.float32 and out.shape == (rows, n)
    # the same products summed in float32 in another order
    assert float((out.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max()) + 1e-6
    three_d = got(x.view(rows, 1, k))
    assert three_d.shape == (rows, 1, n) and torch.equal(three_d.view(rows, n), out)
    halves = x.bfloat16()
    assert torch.equal(got(halves), got(halves.float()).bfloat16())  # read and written as bfloat16 by the kernel


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    linear = quantized_linear("w8a8", _weight(272, 640), torch.randn(272), 32)
    assert linear is not None
    x = torch.randn(13, 640)
    together = linear(x)
    for row in range(13):
        assert torch.equal(linear(x[row : row + 1])[0], together[row])
    assert torch.equal(linear(x[3:11]), together[3:11])  # a full tile of 8 at another offset


@needs_kernel
def test_the_error_is_that_of_8_bit_weights_and_activations() -> None:
    weight, x = _weight(256, 640), torch.randn(8, 640)
    linear = quantized_linear("w8a8", weight, None, 32)
    assert linear is not None
    exact = F.linear(x, weight)
    relative = float((linear(x) - exact).norm() / exact.norm())
    assert 1e-4 < relative < 0.02, relative


@needs_kernel
def test_the_kernel_runs_on_pytorchs_threads() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert w8a8.kernel().parallel_threads() == 2  # 1 when built without OpenMP: at::parallel_for is inline
    finally:
        torch.set_num_threads(threads)
    gomp = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(gomp) == 1, gomp  # one OpenMP runtime in the process: PyTorch's


@needs_kernel
def test_inputs_that_are_not_whole_blocks_stay_unquantized() -> None:
    assert w8a8.unsupported_shape(64, 40) is not None and w8a8.unsupported_shape(50, 64) is None
    assert quantized_linear("w8a8", _weight(64, 40), None, 32) is None


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """8-bit activations on the tiny model's random (wide) weights: cosine 0.97-0.9997 per row; a wrong kernel is near
    0. The real model's quality is measured by bench/quant_quality.py."""
    assert not torch.equal(got, expected)
    similarity = F.cosine_similarity(got.float(), expected.float(), dim=-1)
    assert float(similarity.min()) > 0.95, similarity
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.75


@needs_kernel
def test_prefill_and_decode_both_run_on_the_kernel(tiny_model: Any, tiny_tokenizer: Any) -> None:
    plain = ModelRunner(tiny_model)
    quantized = ModelRunner(tiny_model, quantization="w8a8")
    assert quantized.fused is not None and not isinstance(quantized.fused.lm_head, DecodeQuantized)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        plain_batch, expected = plain.prefill(prompts)
        batch, got = quantized.prefill(prompts)
        _close(got, expected)
        for row, prompt in enumerate(prompts):
            # alone or left-padded beside longer prompts, a prompt's logits differ only by float32 rounding in the
            # attention (as on the model's own weights), not by its activations' quantization (~0.1)
            assert float((quantized.prefill([prompt])[1][0] - got[row]).abs().max()) < 1e-4
        plain_batch.next_tokens = batch.next_tokens = expected.argmax(-1)
        expected, got = plain.decode(plain_batch), quantized.decode(batch)
    _close(got, expected)


@needs_kernel
@pytest.mark.parametrize("one_plus_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("shape", "weight_shape"), [((7, 640), (640,)), ((2048, 640), (640,)), ((5, 100), (100,)),
                                                     ((3, 5, 256), (5, 256)), ((4, 3, 48), (48,))])  # fmt: skip
def test_the_kernels_rms_norm_computes_pytorchs(
    one_plus_weight: bool, dtype: torch.dtype, shape: tuple[int, ...], weight_shape: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(len(shape) + shape[-1])
    weight = torch.randn(weight_shape, generator=generator).to(dtype)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    x[0] = 0.0  # a row of zeros: eps alone under the root
    expected = fast_path.rms_norm(weight, 1e-6, one_plus_weight=one_plus_weight)(x)
    got = w8a8.rms_norm(weight, 1e-6, one_plus_weight=one_plus_weight)(x)
    assert got.dtype is dtype and got.shape == x.shape and got.is_contiguous()
    difference = (got.double() - expected.double()).abs()
    if dtype is torch.bfloat16:
        # one rounding to bfloat16, where PyTorch rounds: equal but where the float32 sum of squares (added up in
        # another order) moves a value across a rounding boundary, and then by one step of bfloat16
        assert float((got != expected).float().mean()) < 1e-3
        assert bool((difference <= expected.double().abs() * 2**-7).all())
    else:
        assert float(difference.max()) <= 1e-6 * float(expected.abs().max())


@needs_kernel
def test_the_kernels_rms_norm_reads_the_heads_of_a_strided_view() -> None:
    qkv = torch.randn(3, 7 * 64 + 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    heads = qkv[:, : 6 * 64].view(3, 6, 64)  # the q and k heads inside the fused q/k/v projection's output
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    expected = fast_path.rms_norm(weight, 1e-6, one_plus_weight=True)(heads)
    assert torch.equal(w8a8.rms_norm(weight, 1e-6, one_plus_weight=True)(heads), expected)
    half = torch.randn(2, 64).half()  # a dtype the kernel does not take runs PyTorch's norm
    one = torch.randn(64)
    assert torch.equal(w8a8.rms_norm(one, 1e-6, one_plus_weight=True)(half),
                       fast_path.rms_norm(one, 1e-6, one_plus_weight=True)(half))  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [256, 64, 12])  # 12: halves of 6, the scalar loop
def test_the_kernels_rotary_embedding_is_pytorchs_bitwise(dtype: torch.dtype, head_dim: int) -> None:
    generator = torch.Generator().manual_seed(head_dim)
    qkv = (torch.randn(9, 7 * head_dim, generator=generator) * 2).to(dtype)
    heads = qkv[:, : 6 * head_dim].view(9, 6, head_dim)  # a strided view, as the fused decoder passes it
    angles = torch.rand(9, 1, head_dim, generator=generator) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    sin[..., : head_dim // 2].neg_()
    expected = fast_path.rotate(heads, cos, sin)
    got = w8a8.rotate(heads, cos, sin)
    assert got.is_contiguous() and torch.equal(got, expected)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "silu"])
def test_the_kernels_mlp_gate_is_pytorchs_bitwise(dtype: torch.dtype, name: str) -> None:
    from transformers.activations import ACT2FN

    act = fast_path.activation(ACT2FN[name])
    assert act.kind == {"gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}[name]
    for width in (96, 40):  # the bfloat16 GELU's own loop takes 16 lanes at a time; 40 runs PyTorch's operators
        gate_up = (torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        expected = ACT2FN[name](gate) * up  # the model's own module
        assert torch.equal(fast_path.gated(act, gate_up), expected)
        if dtype is torch.bfloat16 and name == "gelu_pytorch_tanh" and width % 16 == 0:
            continue  # its own GELU: the test below
        assert torch.equal(w8a8.gated(act, gate_up), expected)


@needs_kernel
def test_the_kernels_bfloat16_gelu_gate_is_pytorchs_without_its_cancellation() -> None:
    """The bfloat16 gelu_tanh gate computed in one pass: PyTorch's values where its formula is exact to float32
    rounding, and nearer the exact GELU than PyTorch's where 1 + tanh(u) cancels (gate below -4)."""
    from transformers.activations import ACT2FN

    act = fast_path.activation(ACT2FN["gelu_pytorch_tanh"])
    gate_up = (torch.randn(3, 64, 2 * 256, generator=torch.Generator().manual_seed(7)) * 4).to(torch.bfloat16)
    gate_up = gate_up[:, ::2]  # a strided view: the kernel reads it through a copy
    gate, up = gate_up.chunk(2, dim=-1)
    pytorch = ACT2FN["gelu_pytorch_tanh"](gate) * up
    got = w8a8.gated(act, gate_up)
    assert got.shape == pytorch.shape and got.dtype is torch.bfloat16
    g = gate.double()
    # 0.5 g (1 + tanh(u)) = g sigmoid(2u); in the sigmoid form even float64 keeps the far negative tail
    exact_gelu = (g * torch.sigmoid(2 * 0.7978845608028654 * (g + 0.044715 * g**3))).to(torch.bfloat16)
    exact = (exact_gelu.double() * up.double()).to(torch.bfloat16)  # each rounded once, as the operators round
    plain = gate >= -4
    assert (got[plain] == pytorch[plain]).double().mean() >= 0.995
    ulp = exact.double().abs().clamp_min(1e-30) * 2**-7
    assert ((got.double() - exact.double()).abs() <= ulp).all()  # within one bfloat16 step of the exact value
    assert (got != exact).sum() < (pytorch != exact).sum()
    tail = gate < -4
    assert tail.any() and (pytorch[tail] == 0).any() and (got[tail] != 0).all()


def test_an_activation_the_package_does_not_know_runs_as_the_models_module() -> None:
    from transformers.activations import ACT2FN

    module = ACT2FN["gelu"]  # exact GELU: no kernel kind
    act = fast_path.activation(module)
    assert act.kind is None and act.forward is module


@needs_kernel
def test_the_w8a8_decoder_runs_its_element_wise_operations_on_the_kernel(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    runner = ModelRunner(tiny_model, quantization="w8a8")
    assert runner.fused is not None
    norms = runner.fused.layers[0].norms
    assert [f.__name__ for f in (norms.input, norms.pre_mlp, runner.fused.final_norm)] == ["kernel_rms_norm"] * 3
    assert runner.fused.ops.rotate is w8a8.rotate and runner.fused.ops.gated is w8a8.gated
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        _, got = runner.prefill(prompts)
        runner.fused.use_ops(tiny_model, fast_path.LayerOps())
        _, expected = runner.prefill(prompts)
    # the same arithmetic but for the order of the float32 sums of squares
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@needs_kernel
async def test_engine_serves_with_w8a8(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine(weight_quantization="w8a8", max_batch_size=4)
    requests = [GenerationRequest(f"r{i}", PROMPTS[i], greedy(12, ignore_eos=True)) for i in range(4)]
    outs = [await collect(s) for s in [engine.add_request(request) for request in requests]]
    assert all(out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 12 for out in outs)
    again = await collect(engine.add_request(GenerationRequest("again", PROMPTS[2], greedy(12, ignore_eos=True))))
    assert again.token_ids == outs[2].token_ids  # batched or alone, the same tokens


@needs_kernel
def test_the_kernel_lets_other_python_threads_run_while_it_computes() -> None:
    forward = w8a8.w8a8_linear(*quantize_int8(_weight(65536, 640)), None)
    rows = 64
    while True:  # sized on this machine, so that each call takes well over 10 ms however fast the CPU
        x = torch.randn(rows, 640)
        started = time.perf_counter()
        forward(x)
        if time.perf_counter() - started > 0.03 or rows >= 4096:
            break
        rows *= 2
    calls: list[float] = []
    done = threading.Event()

    def engine_thread() -> None:
        for _ in range(4):
            started = time.perf_counter()
            forward(x)
            calls.append(time.perf_counter() - started)
        done.set()

    worker = threading.Thread(target=engine_thread)
    stamps = [time.perf_counter()]
    worker.start()
    while not done.is_set():  # the event loop's thread: it gets the GIL back only while the kernel has let go
        time.sleep(0.0005)
        stamps.append(time.perf_counter())
    worker.join()
    longest_gap = max(b - a for a, b in itertools.pairwise(stamps))
    assert min(calls) > 0.01  # each call long enough for a held GIL to show
    assert longest_gap < min(calls) / 2, (longest_gap, calls)


def test_a_machine_without_the_kernel_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w8a8, "_cpu_flags", lambda: frozenset({"avx512f"}))
    assert w8a8.unavailable_reason() == "this CPU lacks avx512bw, avx512_vnni"
    with pytest.raises(RuntimeError, match="w8a8 kernel cannot run here: this CPU lacks avx512bw"):
        w8a8.kernel.__wrapped__()
