"""Which models the fused decoder runs (:func:`unsupported_reason`) and the rotary tables it reads from them."""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})
"""``config.model_type`` values whose decoder layers :class:`FusedDecoder` reproduces."""

SANDWICH_NORM_TYPES = frozenset({"gemma3_text"})
"""Families that normalise the attention and MLP outputs before the residual add (four norms per layer)."""

STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
"""Rotary variants whose inverse frequencies do not change with the sequence length."""


def rope_tables(rotary: Any) -> dict[str, tuple[torch.Tensor, float]]:
    """Per layer type: the inverse frequencies (float32) and the attention scaling of the model's rotary module."""
    tables = {}
    if hasattr(rotary, "inv_freq"):
        tables["default"] = (rotary.inv_freq.detach().float(), float(rotary.attention_scaling))
    for kind in getattr(rotary, "layer_types", ()):
        inv_freq = getattr(rotary, f"{kind}_inv_freq", None)
        if inv_freq is not None:
            tables[kind] = (inv_freq.detach().float(), float(getattr(rotary, f"{kind}_attention_scaling")))
    return tables


def unsupported_reason(model: Any) -> str | None:
    """Why :class:`FusedDecoder` cannot run ``model`` (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    weight = next(model.parameters())
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, not the CPU"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    attention = getattr(config, "_attn_implementation", "sdpa")
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r}"
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return "no rotary embedding module"
    kinds = rotary.rope_type if isinstance(rotary.rope_type, dict) else {"default": rotary.rope_type}
    dynamic = sorted({str(v) for v in kinds.values()} - STATIC_ROPE_TYPES)
    if dynamic:
        return f"rotary type {dynamic[0]!r} changes with the sequence length"
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "sliding_window", None) is not None and not layer_types:
        return "a sliding window without per-layer types"
    if layer_types and set(layer_types) - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(layer_types))}"
    return None
