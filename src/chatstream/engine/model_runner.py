"""The only code that calls the model: batched prefill of joining sequences and one decode step for the batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from chatstream.engine.cpu.fast_path import CpuFastPath, packing_supported
from chatstream.engine.cpu.fused_decoder import FusedDecoder
from chatstream.engine.kv_cache import BatchKVCache, DecodeBatch, RowKV

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs a transformers causal LM on a left-padded batch with an explicit 2-D mask and position ids.

    Every call returns the logits of the last position only (``logits_to_keep=1``), so the LM head never runs over a
    whole prompt. On the CPU the linear layers run on oneDNN-prepacked weights and the RMSNorms in one kernel (see
    :mod:`chatstream.engine.cpu.fast_path`) unless ``pack_weights`` is False, and supported families run through
    the hand-written :class:`~chatstream.engine.cpu.fused_decoder.FusedDecoder` (checked against transformers when
    it is built) unless ``fused`` is False.
    """

    def __init__(self, model: Any, *, pack_weights: bool = True, fused_decoder: bool = True) -> None:
        self.model = model
        self.fast_path = CpuFastPath.for_model(model) if pack_weights and packing_supported(model) else None
        self.device = model.device
        self.num_layers = _num_cache_layers(model)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.pad_token_id = 0
        self.fused: FusedDecoder | None = None
        if fused_decoder:
            self.fused = FusedDecoder.for_model(
                model, self.transformers_forward, fast_path=self.fast_path, pack=pack_weights
            )

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[DecodeBatch, torch.Tensor]:
        """Prefill ``prompts`` together (left-padded to the longest); returns their batch and logits ``[n, V]``."""
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = BatchKVCache(self.num_layers)
        logits = self._forward(input_ids, position_ids, mask, cache)
        positions = position_ids[:, -1] + 1
        batch = DecodeBatch(cache, mask, positions, torch.zeros_like(positions))
        return batch, logits

    def prefill_on_prefixes(
        self, rows: Sequence[tuple[RowKV, int, Sequence[int]]]
    ) -> tuple[DecodeBatch, torch.Tensor, list[int]]:
        """Prefill several sequences together on top of their cached KV.

        Each row is ``(prefix, num_reusable, prompt)``: the first ``num_reusable`` prompt tokens have KV in
        ``prefix``. All rows run the same number of new tokens ``S`` (the longest uncached suffix); a row with a
        shorter suffix recomputes the tail of its cached part instead of taking padding in the middle, so every row
        stays contiguous (the sliding-window masks rely on it). Returns the batch, the logits ``[n, V]`` and, per
        row, how many cached tokens were actually used.
        """
        width = max(len(prompt) - reusable for _, reusable, prompt in rows)
        used = [max(len(prompt) - width, 0) for _, _, prompt in rows]
        cached = max(used)
        cache = BatchKVCache.from_rows([(prefix, n) for (prefix, _, _), n in zip(rows, used, strict=True)])
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), cached + width), dtype=torch.bool)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ((_, _, prompt), n) in enumerate(zip(rows, used, strict=True)):
            fed = len(prompt) - n
            input_ids[row, width - fed :] = torch.tensor(list(prompt[n:]), dtype=torch.long)
            mask[row, cached - n :] = True
            mask[row, cached : cached + width - fed] = False
            position_ids[row, width - fed :] = torch.arange(n, len(prompt))
        input_ids, mask, position_ids = input_ids.to(self.device), mask.to(self.device), position_ids.to(self.device)
        logits = self._forward(input_ids, position_ids, mask, cache)
        positions = torch.tensor([len(prompt) for _, _, prompt in rows], dtype=torch.long, device=self.device)
        return DecodeBatch(cache, mask, positions, torch.zeros_like(positions)), logits, used

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One step for every row: feed ``batch.next_tokens``; returns logits ``[B, V]`` and advances the batch."""
        ones = torch.ones((batch.size, 1), dtype=torch.bool, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits = self._forward(
            batch.next_tokens.unsqueeze(1), batch.positions.unsqueeze(1), batch.attention_mask, batch.cache
        )
        batch.positions = batch.positions + 1
        return logits

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchKVCache
    ) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(input_ids, positions, mask, cache)
        return self.transformers_forward(input_ids, positions, mask, cache)

    def transformers_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchKVCache
    ) -> torch.Tensor:
        """The model's own forward (through the fast path where installed): logits ``[B, V]`` of the last tokens."""
        with self._packed_context():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _packed_context(self) -> AbstractContextManager[None]:
        return self.fast_path.active() if self.fast_path is not None else nullcontext()


def _num_cache_layers(model: Any) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)
