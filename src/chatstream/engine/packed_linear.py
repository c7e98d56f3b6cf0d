"""oneDNN-prepacked weights for the linear layers of a CPU model (the LM head included).

``torch.nn.functional.linear`` on the CPU reorders its weight into oneDNN's blocked layout on every call (bf16) or
runs MKL's generic sgemm (fp32). Reordering every weight once, up front, and calling
``torch.ops.mkldnn._linear_pointwise`` with the packed weight halves the time of the 262k × 640 LM head of
Gemma-3-270M at one sequence on this project's benchmark CPU (bf16: 38 → 19 ms) and speeds up the small per-layer
matrices by a third or more. In bf16 the results are bitwise identical to ``F.linear``; in fp32 they differ in the
last bits (oneDNN accumulates in a different order than MKL).

The packed copies cost memory: one more copy of every linear weight (the LM head of a model with tied embeddings
cannot share the embedding's storage). The model itself is not changed for other callers: the packed path is used
only inside :meth:`PackedLinears.active`, on the thread that entered it; everywhere else each layer runs its own
``forward``.
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

_installed: weakref.WeakKeyDictionary[nn.Module, PackedLinears] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()


def packing_supported(model: nn.Module) -> bool:
    """True when ``model`` runs on the CPU in bf16 or fp32 and this torch build has oneDNN's packed linear."""
    weight = next((p for p in model.parameters()), None)
    return (
        weight is not None
        and weight.device.type == "cpu"
        and weight.dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinears:
    """The packed weights of one model's ``nn.Linear`` layers and the switch that routes calls to them.

    Use :meth:`for_model` (one instance per model, shared by every engine on it) and run the model inside
    ``with packed.active():``.
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self.num_layers = 0
        self.num_bytes = 0
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.dtype in PACKABLE_DTYPES:
                self._install(module)
        logger.info("packed %d linear layers for oneDNN (%.0f MiB)", self.num_layers, self.num_bytes / 2**20)

    @classmethod
    def for_model(cls, model: nn.Module) -> PackedLinears:
        """The model's packed linears, packing them on the first call."""
        with _install_lock:
            packed = _installed.get(model)
            if packed is None:
                packed = _installed[model] = cls(model)
            return packed

    @contextmanager
    def active(self) -> Iterator[None]:
        """Route this thread's linear calls through the packed weights while inside."""
        previous = getattr(self._local, "on", False)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous

    def _install(self, module: nn.Linear) -> None:
        weight = module.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        bias = None if module.bias is None else module.bias.detach()
        module.forward = self._forward(module.forward, packed, bias, weight.dtype)  # type: ignore[method-assign,assignment]
        self.num_layers += 1
        self.num_bytes += weight.numel() * weight.element_size()

    def _forward(
        self, original: Callable[[torch.Tensor], torch.Tensor], packed: torch.Tensor, bias: Any, dtype: torch.dtype
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        local = self._local

        def forward(x: torch.Tensor) -> torch.Tensor:
            if getattr(local, "on", False) and x.dtype == dtype and not torch.is_grad_enabled():
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
            return original(x)

        return forward
