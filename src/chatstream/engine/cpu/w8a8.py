"""The ``w8a8`` quantization's kernel: int8 weights times int8 activations on AVX512-VNNI, built on first use.

A decode step at 8–32 rows is bounded by reading the weights *and* by the arithmetic on them; PyTorch's weight-only
int8 kernel converts every weight to bfloat16 and ends up slower than the unquantized packed weights at 8 rows
(docs/performance.md). This kernel keeps the weights as bytes and multiplies them with bytes: each row of the input is
quantized when the layer runs, one scale per 32 inputs (as llama.cpp's ``Q8_0`` activations), and ``VPDPBUSD`` adds
64 byte products per instruction. A row's result depends on that row alone, whatever else shares the step. The same
arithmetic beats the bfloat16 weights at prefill sizes (32–256 rows) too, so the w8a8 mode runs every row on it.
The fused decoder's RMSNorms, rotary embeddings and MLP gates run in the same extension (:func:`rms_norm`,
:func:`rotate`, :func:`gated`; with w8a8 and, by default, for bfloat16 models: ``EngineConfig.cpu_kernels``): one call
each, where PyTorch runs a dozen to a few small operators whose overhead at one decoding row is more than their
arithmetic; and on CPUs with AVX512-BF16 but no AMX its attention (:func:`chunk_attention_into`). Every call lets
go of the GIL while it computes, as PyTorch's operators do, so the event loop's thread keeps serving while the
engine's thread is in the kernel.

The C++ source (``kernels/w8a8.cpp``) is compiled with PyTorch's extension builder the first time a process asks for
it (about 40 s; the build is kept in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and reused
while the source is unchanged). It needs an x86-64 CPU with AVX-512 (F, BW) and VNNI, a C++ compiler and ``ninja``.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from chatstream.engine.cpu import fast_path
from chatstream.engine.cpu.fast_path import Forward

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "w8a8.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
COMPILER_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-ffp-contract=off",
                  "-fopenmp"]  # fmt: skip
"""``-fopenmp``: ``at::parallel_for`` is inline OpenMP; without it the kernel runs on one thread. The extension then
needs ``libgomp.so.1``, which resolves to the copy PyTorch has already loaded (one thread pool).
``-ffp-contract=off``: a product and a sum stay two roundings (as in PyTorch's separate operators) unless the source
asks for a fused multiply-add."""
ATTENTION_CPU_FLAGS = ("avx512_bf16",)
"""What :func:`chunk_attention` needs beyond the linear kernel's flags (its functions are compiled for it alone)."""
TILE_CPU_FLAGS = ("amx_bf16",)
"""Where the CPU has these, PyTorch's bfloat16 ``scaled_dot_product_attention`` runs on its matrix tiles (oneDNN) and
takes 0.3–0.8× the time of :func:`chunk_attention` for prompt chunks of 16–256 tokens and the same for a decode row
(``bench/chunk_attention.py`` on a Xeon with AMX), so :func:`layer_ops` leaves the attention to PyTorch there."""
NORM_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes the kernel's RMSNorm reads and writes (others run PyTorch's)."""
BLOCK_N, BLOCK_K = 16, 32
"""Output channels per weight block (a layer's are padded up to a multiple) and inputs per activation scale (a layer's
inputs must be a multiple)."""


def unavailable_reason() -> str | None:
    """Why the kernel cannot run on this machine (None when it can)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = [flag for flag in CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) on PATH"
    if _ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def attention_unavailable_reason() -> str | None:
    """Why :func:`chunk_attention` cannot run on this machine (None when it can)."""
    missing = [flag for flag in ATTENTION_CPU_FLAGS if flag not in _cpu_flags()]
    return unavailable_reason() or (f"this CPU lacks {', '.join(missing)}" if missing else None)


def attention_unused_reason() -> str | None:
    """Why :func:`layer_ops` leaves the attention to PyTorch on this machine (None where it takes the extension's):
    the CPU cannot run :func:`chunk_attention`, or has :data:`TILE_CPU_FLAGS`, where PyTorch's is faster."""
    tiles = [flag for flag in TILE_CPU_FLAGS if flag in _cpu_flags()]
    slower = f"this CPU has {', '.join(tiles)}, where PyTorch's attention is faster" if tiles else None
    return attention_unavailable_reason() or slower


def unsupported_shape(n: int, k: int) -> str | None:
    """Why a weight ``[n, k]`` does not fit the kernel's blocks (None when it does)."""
    if k % BLOCK_K:
        return f"{k} inputs are not a multiple of {BLOCK_K}"
    return None


@functools.cache
def kernel() -> Any:
    """The compiled extension module (built, or loaded from the build cache, once per process)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the w8a8 kernel cannot run here: {reason}")
    from torch.utils.cpp_extension import load

    ninja_dir = _ninja_dir()
    if ninja_dir is not None and shutil.which("ninja") is None:  # the pip package's binary, off PATH in a venv
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    logger.info("kernel extension: building or loading it (about 40 s the first time on a machine)")
    started = time.monotonic()
    module = load(name="chatstream_w8a8", sources=[str(SOURCE)], extra_cflags=COMPILER_FLAGS,
                  extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
    logger.info("kernel extension: ready in %.1f s", time.monotonic() - started)
    return module


def w8a8_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Forward:
    """``x @ (q * scale[:, None]).T + bias`` with ``x`` quantized per row and block of 32 inputs; ``q`` is int8
    ``[N, K]`` and ``scale`` ``[N]`` (:func:`chatstream.engine.cpu.quantized.quantize_int8`)."""
    module = kernel()
    n = q.shape[0]
    pad = -n % BLOCK_N  # zero output channels up to the next block, cut off again after each call
    packed = module.pack_weight(torch.nn.functional.pad(q, (0, 0, 0, pad)).contiguous())
    scale32 = torch.nn.functional.pad(scale.float(), (0, pad)).contiguous()
    bias32 = None if bias is None else torch.nn.functional.pad(bias.detach().float(), (0, pad)).contiguous()

    def w8a8_forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, K]
        y = module.linear(flat, packed, scale32, bias32)  # [T, N + pad], bfloat16 for bfloat16 inputs, else float32
        y = (y[:, :n] if pad else y).to(x.dtype).contiguous()  # no copy for a bfloat16 model's unpadded layers
        return y.view(*x.shape[:-1], n)

    return w8a8_forward


def rms_norm(weight: torch.Tensor, eps: float, *, one_plus_weight: bool) -> Forward:
    """:func:`chatstream.engine.cpu.fast_path.rms_norm`'s arithmetic in one call of the kernel: float32 inside, one
    rounding to the model's dtype where PyTorch rounds (results equal PyTorch's but for the last bit where the sum
    of squares adds up in another order). ``weight`` is ``[D]``, or ``[H, D]`` for inputs ``[T, H, D]``. Inputs the
    kernel does not take (other dtypes, other ranks, a strided last dimension) run the PyTorch norm."""
    module = kernel()
    eager = fast_path.rms_norm(weight, eps, one_plus_weight=one_plus_weight)
    scale = (1.0 + weight.detach().float() if one_plus_weight else weight.detach().float()).contiguous()
    rank = 2 if scale.dim() == 1 else 3
    heads = scale.shape[0] if scale.dim() == 2 else None

    def kernel_rms_norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in NORM_DTYPES or x.dim() != rank or x.stride(-1) != 1 or (heads and x.shape[1] != heads):
            return eager(x)
        return module.rms_norm(x, scale, eps, not one_plus_weight)

    return kernel_rms_norm


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`chatstream.engine.cpu.fast_path.rotate` in one call of the kernel (the same roundings, bitwise); other
    dtypes or layouts run PyTorch's."""
    if qk.dtype not in NORM_DTYPES or qk.dim() != 3 or qk.stride(-1) != 1 or cos.dtype != qk.dtype:
        return fast_path.rotate(qk, cos, sin)
    return kernel().rotate(qk, cos, sin)


def chunk_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tokens: int,
    offset: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """The attention of one row's block of ``tokens`` new tokens in one call of the kernel: ``queries`` ``[M, D]``
    (the query heads of one key head stacked, row ``m`` token ``m % tokens``, at key column ``offset + m % tokens``),
    ``keys``/``values`` ``[L, D]``; returns ``[M, D]``. Scores and softmax in float32 from bfloat16 pairs
    (AVX512-BF16), the values weighed in float32, the output rounded once: against ``scaled_dot_product_attention``,
    whose CPU kernel rounds the probabilities to bfloat16 before weighing the values, it differs by at most a bfloat16
    rounding, in 0.23-0.45x its time for decode steps and chunks of 16-256 tokens over 256-1,536 columns
    (``bench/chunk_attention.py``). Inputs must be bfloat16 with head size a multiple of 64 (the caller checks)."""
    groups = queries.shape[0] // tokens
    out = queries.new_empty(queries.shape)
    view = out.view(groups, tokens, -1).transpose(0, 1)[None]  # [1, S, G, D]
    query = queries.view(groups, tokens, -1).transpose(0, 1)[None]
    kernel().chunk_attention(query, keys[None], values[None], _NO_PADDING, 0, offset, window, scale, view)
    return out


def chunk_attention_into(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    column0: int,
    offset: int,
    window: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """:data:`fast_path.ChunkAttention` on the kernel: several left-padded rows' blocks of new tokens, read from and
    written into strided views (no copies); see :func:`chunk_attention` for the arithmetic."""
    kernel().chunk_attention(queries, keys, values, starts, column0, offset, window, scale, out)


_NO_PADDING = torch.zeros(1, dtype=torch.long)


def layer_ops() -> fast_path.LayerOps:
    """The fused decoder's element-wise work in the extension (:func:`rms_norm`, :func:`rotate`, :func:`gated`) and,
    where the CPU has AVX512-BF16 but no AMX, its attention (:func:`chunk_attention_into`); builds or loads the
    extension."""
    kernel()
    attention = chunk_attention_into if attention_unused_reason() is None else None
    return fast_path.LayerOps(rms_norm=rms_norm, rotate=rotate, gated=gated, chunk_attention=attention)


def chosen_layer_ops(setting: bool | None, dtype: torch.dtype, quantization: str | None) -> fast_path.LayerOps | None:
    """:func:`layer_ops` where ``setting`` (``EngineConfig.cpu_kernels``) asks for them for a fused decoder computing
    in ``dtype`` with weights quantized to ``quantization``, else None (PyTorch's operations).

    None: with w8a8 and for bfloat16, where the extension can run and builds (else a log line); True: always, and a
    RuntimeError where it cannot; False: never. They are not probed like the fused decoder: each operation is tested
    against PyTorch's (the same roundings, but for the order of the norms' float32 sums and the attention's float32
    probabilities), and in a bfloat16 Gemma-3 one last-bit difference moves the probe's logits by up to 2 % of the
    largest, as much as a bfloat16 forward differs from a float32 one (``bench/quant_quality.py --cpu-kernels``)."""
    if setting is False or (setting is None and quantization != "w8a8" and dtype != torch.bfloat16):
        return None
    reason = unavailable_reason()
    if reason is not None:
        if setting:
            raise RuntimeError(f"cpu_kernels=True, but the kernel extension cannot run here: {reason}")
        logger.info("fused decoder: PyTorch's operators (the kernel extension cannot run here: %s)", reason)
        return None
    try:
        ops = layer_ops()
    except Exception as exc:  # the build failed (headers, a compiler that cannot target AVX-512, ...)
        if setting:
            raise RuntimeError(f"cpu_kernels=True, but the kernel extension did not build: {exc}") from exc
        logger.warning("fused decoder: PyTorch's operators (the kernel extension did not build: %s)", exc)
        return None
    why = attention_unused_reason()
    attention = "with its attention" if why is None else f"without its attention ({why})"
    logger.info("fused decoder: norms, rotary embedding and MLP gate in the kernel extension, %s", attention)
    return ops


def gated(act: fast_path.Activation, gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`chatstream.engine.cpu.fast_path.gated` in one call of the extension for the activations it knows; others
    run the Python version. A bfloat16 ``gelu_tanh`` is computed in one pass over the tensor (0.4× the time of
    PyTorch's operators; the same values except below ``gate`` = -4, where the result is under 1e-4 and PyTorch's
    formula loses it to cancellation); the rest are PyTorch's operators, bit for bit."""
    if act.kind is None:
        return fast_path.gated(act, gate_up)
    return kernel().gated(gate_up, act.kind)


def _ninja_dir() -> str | None:
    found = shutil.which("ninja")
    if found is not None:
        return str(Path(found).parent)
    try:
        import ninja
    except ImportError:
        return None
    return str(ninja.BIN_DIR)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
