"""oneDNN-prepacked linear layers and one-kernel RMSNorms for the engine's model calls on the CPU.

Two factories build the replacements: :func:`linear_forward` (a linear layer on a weight packed once into oneDNN's
blocked layout, instead of ``F.linear`` reordering it on every call) and :func:`rms_norm` (an RMSNorm of the Gemma or
Llama family as one ``torch.rms_norm`` call, with its scale computed once, instead of about ten small operators). The
fused decoder (:mod:`chatstream.engine.cpu.fused_decoder`) calls them directly; :class:`CpuFastPath` installs them on
a transformers model's own modules for the engine's transformers forward. :class:`LayerOps` gathers the fused
decoder's element-wise operations (RMSNorm, rotary embedding, the MLP's gate) in their PyTorch form; the w8a8 mode
swaps in its extension's one-call versions.

Packed bf16 results are bitwise identical to ``F.linear``; packed fp32 results differ in the last bits (oneDNN
accumulates in another order than MKL). Each packed weight is one more copy of that weight in memory. A fused norm
installed on a module is checked bitwise against the module's own forward and skipped if it differs.

Installing the fast path rebinds ``forward`` of the model's linear and norm modules to a switch: the replacement runs
only on a thread inside :meth:`CpuFastPath.active`, with grad disabled and the module's dtype; every other call goes
to the module's original forward, so other callers (``model.generate``, training) get the original results. A deep
copy of a model made after the fast path was installed still calls the original model's modules through those
switches: copy a model before an engine runs it. Timings are in docs/performance.md.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)

ONE_PLUS_WEIGHT_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})
"""RMSNorm classes computing ``(x.float() * rsqrt(mean(x²) + eps) * (1 + weight.float())).type_as(x)``."""

WEIGHT_AFTER_CAST_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""RMSNorm classes computing ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

_installed: weakref.WeakKeyDictionary[nn.Module, CpuFastPath] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()

Forward = Callable[[torch.Tensor], torch.Tensor]


class NormBuilder(Protocol):
    """Builds an RMSNorm's forward from its weight (:func:`rms_norm`'s signature; the w8a8 kernel has another)."""

    def __call__(self, weight: torch.Tensor, eps: float, *, one_plus_weight: bool) -> Forward: ...


def dtype_packable(dtype: torch.dtype) -> bool:
    """True when oneDNN can pack linear weights of ``dtype`` on this CPU (bf16 needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT; an AVX2-only CPU packs fp32 only)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packing_supported(model: nn.Module) -> bool:
    """True when ``model`` runs on the CPU in a dtype this CPU and torch build can pack (see :func:`dtype_packable`)."""
    weight = next((p for p in model.parameters()), None)
    return weight is not None and weight.device.type == "cpu" and dtype_packable(weight.dtype)


class CpuFastPath:
    """The packed linear weights and fused norms installed on one model, and the switch that routes calls to them.

    Use :meth:`for_model` (one instance per model, shared by every engine on it) and run the model inside
    ``with fast_path.active():``. Installing it rebinds the modules' ``forward`` (see the module docstring).
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self._packed: dict[nn.Module, Forward] = {}
        self.num_linears = 0
        self.num_norms = 0
        self.num_bytes = 0
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and dtype_packable(module.weight.dtype):
                    self._install_linear(module)
                elif type(module).__name__ in ONE_PLUS_WEIGHT_NORMS | WEIGHT_AFTER_CAST_NORMS:
                    self._install_norm(module)
        logger.info(
            "CPU fast path: %d linear layers packed (%.0f MiB), %d norms fused",
            self.num_linears,
            self.num_bytes / 2**20,
            self.num_norms,
        )

    @classmethod
    def for_model(cls, model: nn.Module) -> CpuFastPath:
        """The model's fast path, built on the first call."""
        with _install_lock:
            fast_path = _installed.get(model)
            if fast_path is None:
                fast_path = _installed[model] = cls(model)
            return fast_path

    @contextmanager
    def active(self) -> Iterator[None]:
        """Route this thread's calls of the prepared modules through the fast path while inside."""
        previous = getattr(self._local, "on", False)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous

    def packed(self, module: nn.Module) -> Forward | None:
        """The packed forward of a linear layer (no thread switch: always the packed weights), None if not packed."""
        return self._packed.get(module)

    def _install_linear(self, module: nn.Linear) -> None:
        weight = module.weight.detach()
        fast = linear_forward(weight, None if module.bias is None else module.bias.detach(), pack=True)
        module.forward = self._switch(module.forward, fast, weight.dtype)  # type: ignore[method-assign,assignment]
        self._packed[module] = fast
        self.num_linears += 1
        self.num_bytes += weight.numel() * weight.element_size()

    def _install_norm(self, module: nn.Module) -> None:
        fast = rms_norm_forward(module)
        weight = getattr(module, "weight", None)
        if fast is None or not isinstance(weight, torch.Tensor):
            return
        probe = torch.randn(3, weight.shape[0], dtype=weight.dtype) * 3
        if not torch.equal(fast(probe), module(probe)):
            logger.info("%s: fused RMSNorm differs from the module's forward; keeping the original", type(module))
            return
        module.forward = self._switch(module.forward, fast, weight.dtype)  # type: ignore[method-assign]
        self.num_norms += 1

    def _switch(self, original: Forward, fast: Forward, dtype: torch.dtype) -> Forward:
        local = self._local

        def forward(x: torch.Tensor) -> torch.Tensor:
            if getattr(local, "on", False) and x.dtype == dtype and not torch.is_grad_enabled():
                return fast(x)
            return original(x)

        return forward


def linear_forward(weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool) -> Forward:
    """``x @ weight.T + bias``: on a oneDNN-packed copy of ``weight`` where ``pack`` is True and this CPU packs its
    dtype (:func:`dtype_packable`), else ``F.linear`` on ``weight`` itself (no copy, any CPU, any dtype)."""
    if not (pack and dtype_packable(weight.dtype)):

        def plain_linear(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight, bias)

        return plain_linear
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)

    def packed_linear(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return packed_linear


def rms_norm(weight: torch.Tensor, eps: float, *, one_plus_weight: bool) -> Forward:
    """An RMSNorm over the last dimension as one ``torch.rms_norm`` call, in the arithmetic of its family.

    ``one_plus_weight``: Gemma's ``(x.float() * rstd * (1 + weight.float())).to(dtype)``; otherwise Llama's
    ``weight * (x.float() * rstd).to(dtype)``. ``weight`` is ``[D]``, or ``[H, D]`` for inputs ``[..., H, D]`` whose
    heads each have their own weight (the query and key heads normalised in one call).
    """
    shape = (int(weight.shape[-1]),)
    weight = weight.detach()
    if not one_plus_weight:

        def weight_after_cast(x: torch.Tensor) -> torch.Tensor:
            return weight * torch.rms_norm(x.float(), shape, None, eps).to(x.dtype)

        return weight_after_cast
    scale = 1.0 + weight.float()
    if weight.dim() == 1:  # torch.rms_norm takes a weight of the normalised shape only

        def one_plus_weight_in_kernel(x: torch.Tensor) -> torch.Tensor:
            return torch.rms_norm(x.float(), shape, scale, eps).to(x.dtype)

        return one_plus_weight_in_kernel

    def one_plus_weight_per_head(x: torch.Tensor) -> torch.Tensor:
        return (torch.rms_norm(x.float(), shape, None, eps) * scale).to(x.dtype)

    return one_plus_weight_per_head


def rms_norm_forward(module: Any, build: NormBuilder = rms_norm) -> Forward | None:
    """:func:`rms_norm` (or another ``build``) in place of an RMSNorm module of a known family; None for any other
    module."""
    kind = type(module).__name__
    eps = norm_eps(module)
    weight = getattr(module, "weight", None)
    if kind not in ONE_PLUS_WEIGHT_NORMS | WEIGHT_AFTER_CAST_NORMS or not isinstance(eps, float):
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return build(weight, eps, one_plus_weight=kind in ONE_PLUS_WEIGHT_NORMS)


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of heads ``qk`` ``[T, H, D]`` at tables ``cos``, ``sin`` ``[T, 1, D]`` whose ``sin`` has
    its first half negated: ``rotate_half(x) * sin`` is then the halves of ``x`` swapped times ``sin``."""
    tokens, heads, _ = qk.shape
    return qk * cos + qk.view(tokens, heads, 2, -1).flip(2).view(tokens, heads, -1) * sin


Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """A gated MLP's activation as a plain function (no module call per layer) and its ``kind`` where this package
    knows it (``"gelu_tanh"``, ``"silu"``; None: any other, run as the model's module)."""

    forward: Forward
    kind: str | None = None


def activation(module: Any) -> Activation:
    """The :class:`Activation` of transformers' ``act_fn`` module (the module itself where not known)."""
    act = getattr(module, "act", None)  # transformers' GELUTanh holds functools.partial(F.gelu, approximate="tanh")
    if isinstance(act, functools.partial) and act.func is F.gelu and not act.args:
        return Activation(act, "gelu_tanh") if act.keywords == {"approximate": "tanh"} else Activation(module)
    if isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation":
        return Activation(F.silu, "silu")
    return Activation(module)


def gated(act: Activation, gate_up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` of a gated MLP whose gate and up projections ran as one (``[..., 2 * I]``, gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act.forward(gate) * up


Gated = Callable[[Activation, torch.Tensor], torch.Tensor]
ChunkAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, float, torch.Tensor], None
]
"""``(queries, keys, values, starts, column0, offset, window, scale, out)``: each row's block of ``S`` new tokens,
``queries`` and ``out`` ``[B, S, G, D]`` (the ``G`` query heads of one key head; strided views), ``keys``/``values``
``[B, L, D]`` the cache columns from ``column0`` on; token ``s`` sits at key column ``offset + s`` and reads the
columns from its row's ``starts`` (cache columns) up to its own and, where ``window`` > 0, the last ``window`` of
them (:func:`chatstream.engine.cpu.w8a8.chunk_attention_into`)."""


@dataclass(frozen=True)
class LayerOps:
    """The element-wise work between the fused decoder's matrix products: PyTorch's operators by default; the w8a8
    mode's kernel extension has one-call versions (:mod:`chatstream.engine.cpu.w8a8`)."""

    rms_norm: NormBuilder = rms_norm
    rotate: Rotate = rotate
    gated: Gated = gated
    chunk_attention: ChunkAttention | None = None
    """Attention for groups whose rows have all of the step's new tokens (decode steps, a prompt's chunks); None:
    ``scaled_dot_product_attention`` for every group."""


def norm_eps(module: Any) -> Any:
    """An RMSNorm module's epsilon (Gemma names it ``eps``, Llama ``variance_epsilon``); None if it has neither."""
    return getattr(module, "eps", getattr(module, "variance_epsilon", None))
