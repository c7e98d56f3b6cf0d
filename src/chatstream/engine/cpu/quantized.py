"""Quantized linear layers for the fused decoder, built once at load time from the model's weights: ``int8`` (one
scale per output channel) and ``int4`` (a scale and an offset per group of input channels) with bfloat16 activations,
and ``w8a8`` (int8 weights as ``int8``, activations quantized to int8 when the layer runs).

A decode step at small batches reads every weight once per token, so its time is the weights' size over the memory
bandwidth; int8 weights are a quarter of float32's bytes and int4 an eighth. int8 and int4 serve only the decoding
rows: prefill tokens (compute-bound, where those kernels are slower than oneDNN's) keep the unquantized packed
weights. int8 and int4 run PyTorch's packed CPU kernels (``torch._weight_int8pack_mm`` and
``torch._weight_int4pack_mm_for_cpu``), which take bfloat16 activations (their float32 paths are slow): the input is
rounded to bfloat16 and the output widened back to the model's dtype. w8a8 runs this package's own kernel
(:mod:`chatstream.engine.cpu.w8a8`), which multiplies bytes with bytes and is faster than the bfloat16 weights at
prefill sizes too, so in that mode every row, prefill included, runs on it. Either way a row's result never depends
on which other rows share its step. Which kernel wins on which CPU, and what quantization does to the outputs, is in
docs/performance.md.

:func:`quantize_decoder` swaps the linear layers of a built :class:`~chatstream.engine.cpu.fused_decoder.FusedDecoder`
(after its probe against transformers, which runs on the unquantized weights); a layer whose shape a kernel cannot
take keeps its unquantized forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from chatstream.config import WEIGHT_QUANTIZATIONS
from chatstream.engine.cpu import w8a8
from chatstream.engine.cpu.fast_path import Forward

logger = logging.getLogger(__name__)

MODES = WEIGHT_QUANTIZATIONS
ACTIVATION_DTYPE = torch.bfloat16
INT4_INNER_K_TILES = 1
EVERY_ROW_MODES = frozenset({"w8a8"})
"""Modes whose kernel also serves prefill rows (faster than the unquantized packed weights at every batch size
measured); the others serve the decoding rows only."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``weight`` ``[N, K]`` ≈ ``q [N, K] int8 * scale [N, 1]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group_size`` input channels: ``weight[n, g*G + i]`` ≈
    ``low[n, g] + q[n, g*G + i] * scale[n, g]`` with ``q`` in ``[0, 15]``. Returns ``q`` ``[N, K]`` int32, ``scale``
    and ``low`` ``[N, K / G]``."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)  # [N, K/G]
    scale = ((high - low) / 15.0).clamp(min=1e-6)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, low


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``[N, K]`` that :func:`quantize_int4`'s outputs stand for."""
    n, k = q.shape
    groups = q.view(n, scale.shape[1], -1).float()
    return (low[..., None] + groups * scale[..., None]).view(n, k)


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Forward:
    """``x @ weight.T + bias`` on int8 weights (``torch._weight_int8pack_mm``, bfloat16 activations)."""
    q, scale = quantize_int8(weight)
    scales = scale.to(ACTIVATION_DTYPE)

    def int8_forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(ACTIVATION_DTYPE)  # [T, K]
        y = torch._weight_int8pack_mm(flat, q, scales).to(x.dtype)  # [T, N]
        y = y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    return int8_forward


def int4_linear(weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Forward:
    """``x @ weight.T + bias`` on int4 weights (``torch._weight_int4pack_mm_for_cpu``, bfloat16 activations)."""
    q, scale, low = quantize_int4(weight, group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
    # the kernel computes (q - 8) * scale + zero, so zero = low + 8 * scale
    zeros = low + 8.0 * scale
    scales_and_zeros = torch.stack([scale, zeros], dim=2).transpose(0, 1).contiguous().to(ACTIVATION_DTYPE)

    def int4_forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(ACTIVATION_DTYPE)  # [T, K]
        y = torch._weight_int4pack_mm_for_cpu(flat, packed, group_size, scales_and_zeros).to(x.dtype)  # [T, N]
        y = y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    return int4_forward


def unsupported_reason(mode: str, weight: torch.Tensor, group_size: int) -> str | None:
    """Why ``weight`` ``[N, K]`` cannot be quantized in ``mode`` (None when it can)."""
    if mode not in MODES:
        return f"unknown mode {mode!r}"
    if weight.device.type != "cpu":
        return "not on the CPU"
    n, k = weight.shape
    if mode == "int4" and (k % group_size or n % 8):
        return f"shape {n}x{k} does not fit int4 groups of {group_size}"
    if mode == "w8a8":
        return w8a8.unsupported_shape(n, k)
    return None


def quantized_linear(mode: str, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Forward | None:
    """The quantized forward of ``weight`` in ``mode``; None when the shape does not suit the kernel."""
    reason = unsupported_reason(mode, weight, group_size)
    if reason is not None:
        logger.info("linear layer %s kept unquantized: %s", tuple(weight.shape), reason)
        return None
    if mode == "w8a8":
        return w8a8.w8a8_linear(*quantize_int8(weight), bias)
    return int8_linear(weight, bias) if mode == "int8" else int4_linear(weight, bias, group_size)


@dataclass
class DecodeRows:
    """How many leading rows of the next linear layers' inputs are decoding tokens (set by the fused decoder)."""

    count: int = 0


class DecodeQuantized:
    """A linear layer whose first ``rows.count`` input rows (decoding tokens) run on quantized weights and the rest
    (prefill tokens) on the unquantized forward."""

    def __init__(self, quantized: Forward, unquantized: Forward, rows: DecodeRows) -> None:
        self.quantized, self.unquantized, self.rows = quantized, unquantized, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K]; the first rows.count rows decode
        n = self.rows.count
        if n <= 0:
            return self.unquantized(x)
        if n >= x.shape[0]:
            return self.quantized(x)
        return torch.cat([self.quantized(x[:n]), self.unquantized(x[n:])])


class QuantizableDecoder(Protocol):
    """What :func:`quantize_decoder` changes in a fused decoder: each layer's linear forwards and the LM head's."""

    layers: list[Any]
    lm_head: Forward
    decode_rows: DecodeRows


def quantize_decoder(decoder: QuantizableDecoder, model: Any, mode: str, group_size: int) -> int:
    """Give the decoder's linear layers (per layer q/k/v, o, gate/up, down; the LM head) quantized weights built from
    ``model``'s, for its decoding rows (``decoder.decode_rows``) or, in :data:`EVERY_ROW_MODES`, for every row;
    returns how many linear layers got quantized weights. (The RMSNorms, rotary embedding, MLP gate and attention
    move to the kernel extension's separately: ``EngineConfig.cpu_kernels``.)"""
    replaced = 0

    def swap(current: Forward, *linears: torch.nn.Linear) -> Forward:
        nonlocal replaced
        weight = torch.cat([lin.weight.detach() for lin in linears])
        forward = quantized_linear(mode, weight, _cat_bias(linears), group_size)
        if forward is None:
            return current
        replaced += 1
        return forward if mode in EVERY_ROW_MODES else DecodeQuantized(forward, current, decoder.decode_rows)

    with torch.no_grad():
        for layer, module in zip(decoder.layers, model.model.layers, strict=True):
            attn, mlp = module.self_attn, module.mlp
            layer.qkv = swap(layer.qkv, attn.q_proj, attn.k_proj, attn.v_proj)
            layer.o_proj = swap(layer.o_proj, attn.o_proj)
            layer.gate_up = swap(layer.gate_up, mlp.gate_proj, mlp.up_proj)
            layer.down = swap(layer.down, mlp.down_proj)
        decoder.lm_head = swap(decoder.lm_head, model.get_output_embeddings())
    logger.info("fused decoder: %d linear layers quantized to %s", replaced, mode)
    return replaced


def _cat_bias(linears: tuple[torch.nn.Linear, ...]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])  # fmt: skip
