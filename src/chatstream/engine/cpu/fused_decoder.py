"""A hand-written forward pass for Llama- and Gemma-style decoders on the CPU: the engine's prefill and decode
steps without transformers' module calls.

Through transformers' modules a decode step dispatches thousands of small operators and runs the Python of every
module, the masking utilities and the cache API; at small batches that overhead is a large share of the step (see
docs/performance.md). :class:`FusedDecoder` runs the same arithmetic in about 55 tensor calls per layer:

- the q/k/v projections and the gate/up projections each run as one matrix product on the concatenated weights
  (oneDNN-packed where the engine packs weights, ``F.linear`` otherwise); the q and k heads share one RMSNorm call
  and one rotary multiply;
- the rotary tables and the masks are built once per step, not once per layer;
- attention is one ``scaled_dot_product_attention`` per layer with the query heads of each key head stacked along
  the query axis (no repeated keys), reading the engine's :class:`~chatstream.engine.kv_cache.BatchKVCache` in
  place; sliding-window layers read only the columns inside their window. A long prompt prefilled whole attends
  in blocks of queries, each over the columns it can see only (:mod:`chatstream.engine.cpu.attention`).

It serves prefill (also on top of cached prefixes, chunk by chunk) and decode alike, several groups of rows in one
forward. It is built only for model families
whose layer structure it knows (:data:`SUPPORTED_MODEL_TYPES`), and only after a probe prefill and decode give the
same next tokens, and logits within rounding, as transformers' own forward; otherwise the engine keeps using
transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from chatstream.engine.cpu.attention import AttentionBlock, attend_in_place, attention_blocks, full_rows
from chatstream.engine.cpu.fast_path import (
    ONE_PLUS_WEIGHT_NORMS,
    Activation,
    CpuFastPath,
    Forward,
    LayerOps,
    NormBuilder,
    activation,
    linear_forward,
    norm_eps,
    rms_norm_forward,
)
from chatstream.engine.cpu.quantized import DecodeRows, quantize_decoder
from chatstream.engine.cpu.support import (
    SANDWICH_NORM_TYPES,
    SUPPORTED_MODEL_TYPES,
    rope_tables,
    unsupported_reason,
)
from chatstream.engine.kv_cache import BatchForward, BatchKVCache, BufferedLayer, ForwardGroup

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "FusedDecoder", "unsupported_reason"]


def _norm(module: nn.Module, build: NormBuilder) -> Forward:
    fused = rms_norm_forward(module, build)
    return fused if fused is not None else module


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat(
        [lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears]
    )


@dataclass
class _Norms:
    """A layer's RMSNorms."""

    input: Forward
    qk: Forward | None  # the query and key heads together
    post_attention: Forward | None  # sandwich families only
    pre_mlp: Forward
    post_mlp: Forward | None  # sandwich families only


@dataclass
class _Layer:
    norms: _Norms
    qkv: Forward
    o_proj: Forward
    gate_up: Forward
    act: Activation
    down: Forward
    rope: str  # the layer type whose rotary table it uses
    sliding_window: int | None
    scaling: float


class FusedDecoder:
    """The forward pass of a supported model on the CPU, for the engine's batches; build it with :meth:`for_model`.

    Args:
        model: a causal LM of a supported family (:func:`unsupported_reason` returns None for it).
        fast_path: the model's installed fast path, whose packed LM head, o_proj and down_proj are shared (one copy
            of each in memory) instead of packed again.
        pack: pack the linear weights with oneDNN where this CPU supports their dtype; False (or an unsupported
            dtype, e.g. bf16 on an AVX2-only CPU) runs them with ``F.linear``.
    """

    def __init__(self, model: Any, *, fast_path: CpuFastPath | None = None, pack: bool = True) -> None:
        self.fast_path = fast_path
        self.pack = pack
        config = model.config
        base = model.model
        self.model_type = config.model_type
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.groups = self.num_heads // self.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.embed_weight = base.embed_tokens.weight.detach()
        scale = getattr(base.embed_tokens, "embed_scale", None)
        self.embed_scale = None if scale is None else scale.to(self.embed_weight.dtype)
        self.ops = LayerOps()
        self.final_norm = _norm(base.norm, self.ops.rms_norm)
        self.lm_head = self._shared_linear(model.get_output_embeddings())
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.rope = rope_tables(base.rotary_emb)
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        self.layers = [self._layer(layer, kind, window) for layer, kind in zip(base.layers, layer_types, strict=True)]
        self.windows = sorted({lay.sliding_window for lay in self.layers if lay.sliding_window is not None})
        self.decode_rows = DecodeRows()  # read by weight-quantized linear layers (see quantize)

    def _layer(self, layer: Any, kind: str, window: int | None) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        return _Layer(
            norms=self._norms(layer, self.ops.rms_norm),
            qkv=linear_forward(qkv_weight, _cat_bias(attn.q_proj, attn.k_proj, attn.v_proj), pack=self.pack),
            o_proj=self._shared_linear(attn.o_proj),
            gate_up=linear_forward(gate_up, _cat_bias(mlp.gate_proj, mlp.up_proj), pack=self.pack),
            act=activation(mlp.act_fn),
            down=self._shared_linear(mlp.down_proj),
            rope=kind if kind in self.rope else "default",
            sliding_window=window if kind == "sliding_attention" else None,
            scaling=float(attn.scaling),
        )

    def _norms(self, layer: Any, build: NormBuilder) -> _Norms:
        attn = layer.self_attn
        sandwich = self.model_type in SANDWICH_NORM_TYPES
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Norms(
            input=_norm(layer.input_layernorm, build),
            qk=None if q_norm is None else self._head_norm(q_norm, k_norm, build),
            post_attention=_norm(layer.post_attention_layernorm, build) if sandwich else None,
            pre_mlp=_norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, build),
            post_mlp=_norm(layer.post_feedforward_layernorm, build) if sandwich else None,
        )

    def use_ops(self, model: Any, ops: LayerOps) -> None:
        """Run the element-wise work on ``ops``: every RMSNorm (the layers' and the final one, rebuilt from ``model``'s
        norm modules), the rotary embedding and the MLP's gate (the w8a8 mode's extension: one call each)."""
        self.ops = ops
        self.final_norm = _norm(model.model.norm, ops.rms_norm)
        for layer, module in zip(self.layers, model.model.layers, strict=True):
            layer.norms = self._norms(module, ops.rms_norm)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the decoder computes in (its embedding's)."""
        return self.embed_weight.dtype

    def _shared_linear(self, module: nn.Linear) -> Forward:
        """The fast path's packed copy of ``module`` when it has one (one copy in memory), else a new one."""
        packed = self.fast_path.packed(module) if self.fast_path is not None else None
        return packed if packed is not None else linear_forward(module.weight.detach(), _bias(module), pack=self.pack)

    def _head_norm(self, q_norm: Any, k_norm: Any, build: NormBuilder) -> Forward:
        """The q and k RMSNorms as one call on the ``[T, Hq + Hkv, D]`` heads (per-head weights stacked)."""
        pairs = ((q_norm, self.num_heads), (k_norm, self.num_kv_heads))
        weight = torch.cat([norm.weight.detach().expand(heads, -1) for norm, heads in pairs])
        one_plus_weight = type(q_norm).__name__ in ONE_PLUS_WEIGHT_NORMS
        return build(weight, float(norm_eps(q_norm)), one_plus_weight=one_plus_weight)

    @classmethod
    def for_model(
        cls, model: Any, reference: BatchForward, *, fast_path: CpuFastPath | None = None, pack: bool = True
    ) -> FusedDecoder | None:
        """The model's fused forward, or None when the model is not a supported family or the probe against
        ``reference`` (transformers' forward, as the engine runs it) disagrees."""
        reason = unsupported_reason(model)
        if reason is not None:
            logger.info("fused decoder not used: %s", reason)
            return None
        decoder = cls(model, fast_path=fast_path, pack=pack)
        mismatch = decoder.probe(reference)
        if mismatch is not None:
            logger.warning("fused decoder not used: %s", mismatch)
            return None
        logger.info("fused decoder in use (%s, %d layers)", decoder.model_type, len(decoder.layers))
        return decoder

    def quantize(self, model: Any, mode: str, group_size: int) -> None:
        """Run the linear layers on weights of ``model`` quantized to ``mode`` (see
        :mod:`chatstream.engine.cpu.quantized`); call it after the probe, which checks the unquantized arithmetic."""
        quantize_decoder(self, model, mode, group_size)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchKVCache
    ) -> torch.Tensor:
        """Run ``input_ids`` ``[B, S]`` at ``positions`` ``[B, S]``; returns the logits of each row's last token (one
        :class:`~chatstream.engine.kv_cache.ForwardGroup`; see :meth:`forward`)."""
        (logits,) = self.forward([ForwardGroup(input_ids, positions, mask, cache)])
        assert logits is not None
        return logits

    def forward(self, parts: Sequence[ForwardGroup]) -> list[torch.Tensor | None]:
        """One forward of several groups of rows (e.g. the running batch's decode and a prefill chunk): their tokens
        go through the matrix products together, and each group attends to its own cache. Returns per group the
        logits ``[B, V]`` of each row's last token, or None where the group wants none.

        A group's ``mask`` ``[B, L]`` is its left-padded rows' padding mask over every column including the ``S``
        new ones (the last ``S``); the new keys and values are appended to its cache. Every row's tokens are
        contiguous and end at the last column, so a column distance is a token distance (causal and sliding-window
        masks are built from column indices).
        """
        shapes = [tuple(part.input_ids.shape) for part in parts]  # (B, S) each
        decoding = [part for part in parts if part.decode]
        if not all(part.decode for part in parts[: len(decoding)]):
            raise ValueError("decode groups must come first in a forward")
        self.decode_rows.count = sum(part.input_ids.numel() for part in decoding)
        masks = [
            attention_blocks(part.mask, new, self.windows, self.groups)
            for part, (_, new) in zip(parts, shapes, strict=True)
        ]
        positions = _flat([part.positions for part in parts])
        tables = {kind: self._rotary(kind, positions) for kind in self.rope}
        x = F.embedding(_flat([part.input_ids for part in parts]), self.embed_weight)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        # the ops' own attention (bfloat16, head sizes in 64s): for groups whose rows hold all the new tokens, their
        # rows' first columns (else None: scaled_dot_product_attention)
        own = self.ops.chunk_attention is not None and x.dtype == torch.bfloat16 and self.head_dim % 64 == 0
        starts = [full_rows(part.mask, new) if own else None for part, (_, new) in zip(parts, shapes, strict=True)]
        for index, layer in enumerate(self.layers):
            attention = [
                (part.cache, blocks[layer.sliding_window], first)
                for part, blocks, first in zip(parts, masks, starts, strict=True)
            ]
            x = self._layer_step(layer, x, shapes, index, attention, tables[layer.rope])
        self.decode_rows.count = sum(part.input_ids.shape[0] for part in decoding if part.logits)
        return self._logits(x, shapes, [part.logits for part in parts])

    def _logits(self, x: torch.Tensor, shapes: list[tuple[int, ...]], wanted: list[bool]) -> list[torch.Tensor | None]:
        """The LM head over the last token of each row of the groups that want logits, in one matrix product."""
        lasts, start = [], 0
        for (size, new), want in zip(shapes, wanted, strict=True):
            if want:
                lasts.append(x[start : start + size * new].view(size, new, -1)[:, -1])
            start += size * new
        if not lasts:
            return [None] * len(shapes)
        logits = self.lm_head(self.final_norm(_rows(lasts)))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        pieces = iter(logits.split([size for (size, _), want in zip(shapes, wanted, strict=True) if want]))
        return [next(pieces) if want else None for want in wanted]

    def _layer_step(
        self,
        layer: _Layer,
        x: torch.Tensor,
        shapes: list[tuple[int, ...]],
        index: int,
        attention: list[tuple[BatchKVCache, list[AttentionBlock], torch.Tensor | None]],
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        tokens = x.shape[0]  # all groups' B * S
        norms = layer.norms
        qkv = layer.qkv(norms.input(x))
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, heads, self.head_dim)
        if norms.qk is not None:
            qk = norms.qk(qk)
        qk = self.ops.rotate(qk, *rotary)
        v = qkv[:, self.q_size + self.kv_size :]
        attended, start = [], 0
        for (size, new), (cache, blocks, starts) in zip(shapes, attention, strict=True):
            end = start + size * new
            attended.append(
                self._attend(layer, qk[start:end], v[start:end], size, cache.buffered[index], blocks, starts)
            )
            start = end
        h = layer.o_proj(_rows(attended))
        if norms.post_attention is not None:
            h = norms.post_attention(h)
        x = x + h
        h = layer.down(self.ops.gated(layer.act, layer.gate_up(norms.pre_mlp(x))))
        if norms.post_mlp is not None:
            h = norms.post_mlp(h)
        return x + h

    def _attend(
        self,
        layer: _Layer,
        qk: torch.Tensor,
        v: torch.Tensor,
        size: int,
        cache_layer: BufferedLayer,
        blocks: list[AttentionBlock],
        starts: torch.Tensor | None,
    ) -> torch.Tensor:
        """One group's attention: ``qk`` ``[B*S, Hq + Hkv, D]`` (rotated), ``v`` ``[B*S, Hkv*D]``; the new keys and
        values are appended to ``cache_layer``. Returns ``[B*S, Hq*D]``. With ``starts`` (the rows' first columns)
        the ops' own attention runs, else ``scaled_dot_product_attention`` per block."""
        tokens = qk.shape[0]
        new = tokens // size
        k = qk[:, self.num_heads :].view(size, new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(size, new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        keys, values = cache_layer.update(k, v)
        if starts is not None and self.ops.chunk_attention is not None:
            q_rows = qk[:, : self.num_heads].view(size, new, self.num_heads, self.head_dim)
            window = layer.sliding_window or 0
            out = attend_in_place(self.ops.chunk_attention, q_rows, keys, values, blocks, starts, window, layer.scaling)
            return out.view(tokens, -1)
        # [B, Hkv, G, S, D]: query head h = kv * G + g; a block's queries are stacked per key head as [G * S_block]
        q = (
            qk[:, : self.num_heads]
            .view(size, new, self.num_kv_heads, self.groups, self.head_dim)
            .permute(0, 2, 3, 1, 4)
        )
        outputs = []
        for block in blocks:
            query = q[:, :, :, block.first : block.last].reshape(size, self.num_kv_heads, -1, self.head_dim)
            keys_in, values_in = keys[:, :, block.start : block.end], values[:, :, block.start : block.end]
            attended = F.scaled_dot_product_attention(
                query, keys_in, values_in, attn_mask=block.mask, scale=layer.scaling
            )
            outputs.append(attended.view(size, self.num_kv_heads, self.groups, block.last - block.first, self.head_dim))
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)
        return attended.view(size, self.num_heads, new, self.head_dim).transpose(1, 2).reshape(tokens, -1)

    def _rotary(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.rope[kind]
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed_weight.dtype
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        # rotate_half(x) * sin == flip(halves of x) * (-sin, +sin): negating the product is exact in any dtype
        sin[:, : inv_freq.shape[0]].neg_()
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    def probe(self, reference: BatchForward) -> str | None:
        """Prefill two left-padded rows and decode one step through ``reference`` and through this decoder; None if
        they agree (same next tokens, logits within rounding), else what differs."""
        got, expected = self._probe_logits(self), self._probe_logits(reference)
        if not torch.equal(got.argmax(-1), expected.argmax(-1)):
            return "its next tokens differ from transformers' on a probe"
        difference = float((got.float() - expected.float()).abs().max())
        tolerance = 0.02 if got.dtype == torch.bfloat16 else 1e-4
        bound = tolerance * float(expected.float().abs().max())
        if difference > bound:
            return f"its logits differ from transformers' by {difference:.3g} on a probe (bound {bound:.3g})"
        return None

    def _probe_logits(self, forward: BatchForward) -> torch.Tensor:
        """The logits ``[4, V]`` of a prefill of rows of 7 and 4 tokens (random ids) and of one decode step."""
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(int(self.embed_weight.shape[0]), (2, 7), generator=generator)
        mask = torch.ones((2, 7), dtype=torch.bool)
        mask[1, :3] = False  # the second row is left-padded
        input_ids[1, :3] = 0
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = BatchKVCache(len(self.layers))
        with torch.inference_mode():
            prefill = forward(input_ids, positions, mask, cache)
            mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.bool)], dim=1)
            decode = forward(torch.tensor([[1], [2]]), positions[:, -1:] + 1, mask, cache)
        return torch.cat([prefill, decode])


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[B, S]`` ids or positions of several groups as one ``[sum B*S]`` vector."""
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def _rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[N_i, C]`` tensors stacked along the first dimension (no copy for one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()
