"""A faster CPU path for the engine's own model calls: oneDNN-prepacked linear weights and one-kernel RMSNorms.

**Linear layers.** ``torch.nn.functional.linear`` on the CPU reorders its weight into oneDNN's blocked layout on every
call (bf16) or runs MKL's generic sgemm (fp32). Reordering every weight once, up front, and calling
``torch.ops.mkldnn._linear_pointwise`` with the packed weight halves the time of the 262k × 640 LM head of
Gemma-3-270M at one sequence on this project's benchmark CPU (bf16: 38 → 19 ms) and speeds up the small per-layer
matrices by a third or more. In bf16 the results are bitwise identical to ``F.linear``; in fp32 they differ in the
last bits (oneDNN accumulates in a different order than MKL). The packed copies cost memory: one more copy of every
linear weight (the LM head of a model with tied embeddings cannot share the embedding's storage).

**RMSNorm.** The Gemma and Llama families' RMSNorm modules run about ten small operators each (casts, pow, mean,
rsqrt, the ``1 + weight`` of Gemma on every call); a decode step of Gemma-3 calls 109 of them. ``torch.rms_norm`` with
the scale computed once does the same arithmetic in the same order; each replacement is checked bitwise against the
module's own forward when it is installed and skipped if it differs.

The model itself is not changed for other callers: the fast path is taken only inside :meth:`CpuFastPath.active`, on
the thread that entered it; everywhere else each module runs its own ``forward``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)

ONE_PLUS_WEIGHT_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})
"""RMSNorm classes computing ``(x.float() * rsqrt(mean(x²) + eps) * (1 + weight.float())).type_as(x)``."""

WEIGHT_AFTER_CAST_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""RMSNorm classes computing ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

_installed: weakref.WeakKeyDictionary[nn.Module, CpuFastPath] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()

Forward = Callable[[torch.Tensor], torch.Tensor]


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
    """The packed linear weights and fused norms of one model, and the switch that routes calls to them.

    Use :meth:`for_model` (one instance per model, shared by every engine on it) and run the model inside
    ``with fast_path.active():``.
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self._packed: dict[nn.Module, Forward] = {}
        self.num_linears = 0
        self.num_norms = 0
        self.num_bytes = 0
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.weight.dtype in PACKABLE_DTYPES:
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
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        bias = None if module.bias is None else module.bias.detach()

        def fast(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

        module.forward = self._switch(module.forward, fast, weight.dtype)  # type: ignore[method-assign,assignment]
        self._packed[module] = fast
        self.num_linears += 1
        self.num_bytes += weight.numel() * weight.element_size()

    def _install_norm(self, module: nn.Module) -> None:
        fast = _fused_norm(module)
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


def norm_eps(module: Any) -> Any:
    """An RMSNorm module's epsilon (Gemma names it ``eps``, Llama ``variance_epsilon``); None if it has neither."""
    return getattr(module, "eps", getattr(module, "variance_epsilon", None))


def _fused_norm(module: Any) -> Forward | None:
    eps = norm_eps(module)
    weight = getattr(module, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    shape = (weight.shape[0],)
    if type(module).__name__ in ONE_PLUS_WEIGHT_NORMS:
        scale = 1.0 + weight.detach().float()

        def one_plus_weight(x: torch.Tensor) -> torch.Tensor:
            return torch.rms_norm(x.float(), shape, scale, eps).to(x.dtype)

        return one_plus_weight
    plain = weight.detach()

    def weight_after_cast(x: torch.Tensor) -> torch.Tensor:
        return plain * torch.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    return weight_after_cast
