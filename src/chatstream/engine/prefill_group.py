"""The rows being prefilled together, between their first chunk and the step that makes them part of the batch.

A :class:`PrefillGroup` is built once from the scheduler's :class:`~chatstream.engine.scheduler.ScheduledPrefill`
list: its cache starts with each row's cached prefix (copied once, straight from the prefix cache's segments,
right-aligned), and it lays out every row's remaining prompt tokens over the same ``width`` new columns, left-padded,
so that each row's tokens stay contiguous and end at the last column. :meth:`PrefillGroup.chunk` gives the forward of
columns ``[start, end)`` of those; after the last one :meth:`PrefillGroup.to_batch` turns the rows into a
:class:`~chatstream.engine.kv_cache.DecodeBatch` that joins the running batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import torch

from chatstream.engine.kv_cache import HEADROOM_COLUMNS, BatchKVCache, DecodeBatch, ForwardGroup, RowKV
from chatstream.engine.scheduler import ScheduledPrefill


@dataclass
class PrefillGroup:
    """The group's cache and its planned inputs; ``cached`` columns of prefix precede the ``width`` new ones."""

    prefills: tuple[ScheduledPrefill, ...]
    cache: BatchKVCache
    input_ids: torch.Tensor  # [B, width] int64, left-padded with the pad id
    positions: torch.Tensor  # [B, width] int64 (0 on padding)
    mask: torch.Tensor  # [B, cached + width] bool, False on padding
    cached: int

    @property
    def seq_ids(self) -> list[int]:
        return [p.seq.seq_id for p in self.prefills]

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @classmethod
    def build(
        cls,
        prefills: SequenceABC[ScheduledPrefill],
        kept: Mapping[int, RowKV],
        num_layers: int,
        pad_token_id: int,
        device: torch.device,
    ) -> PrefillGroup:
        """The group of ``prefills``, each on the first ``num_cached_tokens`` of its prefix's segments in ``kept``."""
        used = [p.num_cached_tokens for p in prefills]
        prompts = [p.seq.prompt_ids for p in prefills]
        width = max(len(prompt) - n for prompt, n in zip(prompts, used, strict=True))
        cached = max(used)
        pieces = [[(kept[node_id], n) for node_id, n in p.prefix.segments] for p in prefills]
        cache = BatchKVCache.from_segments(pieces, num_layers)
        cache.reserve(cached + width + HEADROOM_COLUMNS)  # the chunks and the first decode steps append in place
        input_ids = torch.full((len(prefills), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prefills), cached + width), dtype=torch.bool)
        positions = torch.zeros((len(prefills), width), dtype=torch.long)
        for row, (prompt, n) in enumerate(zip(prompts, used, strict=True)):
            fed = len(prompt) - n
            input_ids[row, width - fed :] = torch.tensor(list(prompt[n:]), dtype=torch.long)
            mask[row, cached - n :] = True
            mask[row, cached : cached + width - fed] = False
            positions[row, width - fed :] = torch.arange(n, len(prompt))
        return cls(tuple(prefills), cache, input_ids.to(device), positions.to(device), mask.to(device), cached)

    def chunk(self, start: int, end: int) -> ForwardGroup:
        """The forward of new columns ``[start, end)``; the last chunk asks for logits."""
        return ForwardGroup(
            input_ids=self.input_ids[:, start:end],
            positions=self.positions[:, start:end],
            mask=self.mask[:, : self.cached + end],
            cache=self.cache,
            logits=end >= self.width,
        )

    def to_batch(self, next_tokens: torch.Tensor) -> DecodeBatch:
        """The prefilled rows as a decode batch whose next inputs are ``next_tokens`` ``[B]``."""
        lengths = torch.tensor([len(p.seq.prompt_ids) for p in self.prefills], dtype=torch.long)
        positions = lengths.to(self.mask.device)
        return DecodeBatch(self.cache, self.mask, positions, next_tokens, self.seq_ids)
