"""KV cache storage: the running batch (its cache grown in place, joined and filtered by rows) and spans of a row's KV
taken out of it (the prefix cache's segments; which ones are kept is decided by the scheduler's prefix cache).

The batch is left-padded: every row's tokens are contiguous and end at the last column, so one column index is one
step for every row. All layers are kept at full length, also the sliding-window layers of models like Gemma-3; the
model's own sliding-window mask then applies the window (column distance equals token distance because rows are
contiguous). Buffers are preallocated with headroom so that a decode step writes one column in place instead of
concatenating the whole cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM_COLUMNS = 64
"""Free columns allocated past the current length whenever a buffer is (re)built, so decode steps write in place."""


BatchForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "BatchKVCache"], torch.Tensor]
"""A model forward on a left-padded batch: ``(input_ids [B, S], positions [B, S], mask [B, L], cache)`` → the logits
``[B, V]`` of each row's last token; the ``S`` new tokens' keys and values are appended to ``cache``."""


@dataclass
class ForwardGroup:
    """Rows that run together in one forward and attend to one cache: ``input_ids`` ``[B, S]`` at ``positions``
    ``[B, S]``, ``mask`` ``[B, L]`` the padding mask over every column including the ``S`` new ones (the last ``S``);
    the new keys and values are appended to ``cache``. ``logits``: whether the logits of each row's last token are
    wanted (a prefill chunk that is not the last needs none). ``decode``: the rows decode one token each (where the
    engine quantizes weights for decode only, int8 and int4, these rows use the quantized ones; decode groups come
    first in a forward)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    cache: BatchKVCache
    logits: bool = True
    decode: bool = False


def _round_up(n: int, multiple: int = HEADROOM_COLUMNS) -> int:
    return -(-n // multiple) * multiple


class BufferedLayer(DynamicLayer):
    """A full-attention cache layer backed by a ``[B, H, capacity, D]`` buffer; ``keys``/``values`` are views of the
    first ``length`` columns."""

    is_sliding = False

    def __init__(
        self, key_buffer: torch.Tensor | None = None, value_buffer: torch.Tensor | None = None, length: int = 0
    ) -> None:
        super().__init__()
        self.length = 0
        self.reserved = 0
        self.grow_ahead = 0
        """Grow once fewer than this many columns would be left free (see :class:`BatchKVCache`)."""
        if key_buffer is not None and value_buffer is not None:
            self._set_buffers(key_buffer, value_buffer, length)

    def _set_buffers(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self.keys = key_buffer[:, :, :length]
        self.values = value_buffer[:, :, :length]
        self.device = key_buffer.device
        self.is_initialized = True

    @property
    def k(self) -> torch.Tensor:
        """The cached keys ``[B, H, length, D]`` (a view of the buffer)."""
        return self.key_buffer[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor:
        """The cached values ``[B, H, length, D]`` (a view of the buffer)."""
        return self.value_buffer[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[2] if self.is_initialized else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, n, _ = key_states.shape
        cap = _round_up(max(n + HEADROOM_COLUMNS, self.reserved))
        keys = key_states.new_empty((b, h, cap, key_states.shape[3]))
        values = value_states.new_empty((b, h, cap, value_states.shape[3]))
        self._set_buffers(keys, values, 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        end = self.length + n
        if end + self.grow_ahead > self.capacity:
            self._grow(end + self.grow_ahead)
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self._set_buffers(self.key_buffer, self.value_buffer, end)
        return self.keys, self.values

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns at once (now, or when the first keys come), so that appending up to
        there copies nothing."""
        self.reserved = max(self.reserved, columns)
        if self.is_initialized and self.capacity < columns:
            self._grow(columns, exact=True)

    def _grow(self, needed: int, *, exact: bool = False) -> None:
        cap = _round_up(needed if exact else max(needed, 2 * self.capacity))
        keys, values = self.key_buffer, self.value_buffer
        new_keys = keys.new_empty((*keys.shape[:2], cap, keys.shape[3]))
        new_values = values.new_empty((*values.shape[:2], cap, values.shape[3]))
        new_keys[:, :, : self.length].copy_(self.k)
        new_values[:, :, : self.length].copy_(self.v)
        self._set_buffers(new_keys, new_values, self.length)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self._set_buffers(self.key_buffer, self.value_buffer, max(0, self.length + tokens_to_remove))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("use BatchKVCache.filter")


class BatchKVCache(Cache):
    """The running batch's KV cache: one :class:`BufferedLayer` per model layer, all of the same length.

    ``filter`` and ``concatenate`` rebuild the buffers (a copy, only when rows leave or join); a decode step only
    writes one column per layer in place. When the columns run out, a layer's buffer is reallocated at twice the
    size and copied: layer ``i`` does so ``i`` columns early (modulo half the headroom), so that the layers grow on
    consecutive steps, one copy each, instead of all together in one step that would stall every running stream.
    """

    def __init__(self, num_layers: int, layers: list[BufferedLayer] | None = None) -> None:
        if layers is None:
            layers = [BufferedLayer() for _ in range(num_layers)]
        for index, layer in enumerate(layers):
            layer.grow_ahead = index % (HEADROOM_COLUMNS // 2)
        self.buffered: list[BufferedLayer] = layers
        super().__init__(layers=list(self.buffered))

    @property
    def length(self) -> int:
        return self.buffered[0].length if self.buffered else 0

    def lengths(self) -> list[int]:
        """Every layer's length (they differ only while a forward is under way)."""
        return [layer.length for layer in self.buffered]

    def reserve(self, columns: int) -> None:
        """Room for ``columns`` columns in every layer, allocated once (see :meth:`BufferedLayer.reserve`)."""
        for layer in self.buffered:
            layer.reserve(columns)

    def restore(self, lengths: Sequence[int]) -> None:
        """Set every layer back to the length it had (:meth:`lengths`): forgets what a failed forward appended."""
        for layer, length in zip(self.buffered, lengths, strict=True):
            if layer.is_initialized:
                layer._set_buffers(layer.key_buffer, layer.value_buffer, length)

    def filter(self, rows: torch.Tensor, trim_left: int) -> None:
        """Keep only ``rows`` (a 1-D index tensor) and drop the first ``trim_left`` columns (all padding)."""
        new_len = self.length - trim_left
        cap = _round_up(new_len + HEADROOM_COLUMNS)
        for layer in self.buffered:
            layer._set_buffers(_gather(layer.k, rows, trim_left, cap), _gather(layer.v, rows, trim_left, cap), new_len)

    @classmethod
    def concatenate(cls, caches: Sequence[BatchKVCache]) -> BatchKVCache:
        """Stack the rows of ``caches``; shorter ones are left-padded with zeros to the longest length."""
        length = max(c.length for c in caches)
        cap = _round_up(length + HEADROOM_COLUMNS)
        layers = []
        for parts in zip(*(c.buffered for c in caches), strict=True):
            keys = _right_aligned([p.k for p in parts], length, cap)
            values = _right_aligned([p.v for p in parts], length, cap)
            layers.append(BufferedLayer(keys, values, length))
        return cls(len(layers), layers)

    @classmethod
    def from_segments(cls, rows: Sequence[Sequence[tuple[RowKV, int]]], num_layers: int) -> BatchKVCache:
        """A batch of cached prefixes: row ``i`` holds the first ``n`` columns of each ``(kv, n)`` of ``rows[i]`` one
        after the other, right-aligned (left-padded with zeros) to the longest row; each piece is copied once,
        straight into place. Rows without pieces are all padding; no pieces at all gives an empty cache."""
        lengths = [sum(n for _, n in row) for row in rows]
        length = max(lengths, default=0)
        if length == 0:
            return cls(num_layers)
        cap = _round_up(length + HEADROOM_COLUMNS)
        template = next(kv for row in rows for kv, n in row if n > 0).layers
        layers = []
        for index, (key, value) in enumerate(template):
            keys = key.new_empty((len(rows), key.shape[0], cap, key.shape[2]))
            values = value.new_empty((len(rows), value.shape[0], cap, value.shape[2]))
            for row, (pieces, row_length) in enumerate(zip(rows, lengths, strict=True)):
                _place(keys[row], values[row], [(kv.layers[index], n) for kv, n in pieces], length - row_length)
            layers.append(BufferedLayer(keys, values, length))
        return cls(len(layers), layers)

    def extract_row(self, row: int, start: int, end: int | None = None) -> RowKV:
        """One row's columns ``[start, end)`` (``end`` None: to the last column), as a copy; or, where this cache
        has a single row and the span fills at least half of a layer's buffer, as a view of that buffer (written
        columns are never written again: a step appends after them, and filter, concatenate and growth build new
        buffers), which saves copying a long prompt's KV in the step after its prefill, at the price of keeping
        at most twice its size alive."""
        stop = self.length if end is None else end
        return RowKV(tuple(_span(lay, row, start, stop, shared=self.num_rows == 1) for lay in self.buffered))

    @property
    def num_rows(self) -> int:
        layer = self.buffered[0] if self.buffered else None
        return int(layer.key_buffer.shape[0]) if layer is not None and layer.is_initialized else 0


def _span(layer: BufferedLayer, row: int, start: int, stop: int, *, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.k[row, :, start:stop], layer.v[row, :, start:stop]
    if shared and 2 * (stop - start) >= layer.capacity:
        return keys, values
    return keys.clone(), values.clone()


def _place(
    keys: torch.Tensor, values: torch.Tensor, pieces: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]], pad: int
) -> None:
    """Write ``pieces`` (``((keys [H, m, D], values), n)``: their first ``n`` columns) one after the other into
    ``keys``/``values`` ``[H, capacity, D]`` from column ``pad`` on; the ``pad`` columns before are zeroed. One
    ``torch.cat`` into the destination per tensor: a conversation's sixth turn has a dozen pieces in each of 18
    layers, and a copy call per piece cost as much again as the copying."""
    if pad:
        keys[:, :pad].zero_()  # padding columns are masked, but must hold finite values
        values[:, :pad].zero_()
    if not pieces:
        return
    end = pad + sum(n for _, n in pieces)
    torch.cat([key[:, :n] for (key, _), n in pieces], dim=1, out=keys[:, pad:end])
    torch.cat([value[:, :n] for (_, value), n in pieces], dim=1, out=values[:, pad:end])


def _gather(tensor: torch.Tensor, rows: torch.Tensor, trim_left: int, cap: int) -> torch.Tensor:
    _, h, length, d = tensor.shape
    out = tensor.new_empty((rows.numel(), h, cap, d))
    out[:, :, : length - trim_left].copy_(tensor[:, :, trim_left:].index_select(0, rows))
    return out


def _right_aligned(parts: Sequence[torch.Tensor], length: int, cap: int) -> torch.Tensor:
    first = parts[0]
    out = first.new_empty((sum(p.shape[0] for p in parts), first.shape[1], cap, first.shape[3]))
    row = 0
    for part in parts:
        n, pad = part.shape[0], length - part.shape[2]
        if pad:
            out[row : row + n, :, :pad].zero_()  # padding columns are masked, but must hold finite values
        out[row : row + n, :, pad:length].copy_(part)
        row += n
    return out


@dataclass(frozen=True)
class RowKV:
    """One sequence's KV, unpadded: per layer ``(keys, values)`` of shape ``[H, n, D]``."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def num_tokens(self) -> int:
        return self.layers[0][0].shape[1] if self.layers else 0

    @property
    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


@dataclass
class DecodeBatch:
    """The running rows as tensors: their cache, the 2-D padding mask, the next position and input token per row,
    and the id of the sequence in each row. :meth:`filter` and :meth:`concatenate` move the ids with the rows (TGI's
    batch contract), so a row is always found by its sequence's id.
    """

    cache: BatchKVCache
    attention_mask: torch.Tensor  # [B, L] bool, False on left padding
    positions: torch.Tensor  # [B] int64: the position of the next input token
    next_tokens: torch.Tensor  # [B] int64: the next input token (the last sampled one)
    seq_ids: list[int]

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    def filter(self, keep: Sequence[int]) -> None:
        """Keep the rows ``keep`` (in that order) and drop leading columns that are padding in every kept row."""
        rows = torch.tensor(list(keep), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, rows)
        num_real = mask.sum(dim=1)
        trim = int(mask.shape[1] - int(num_real.max())) if len(keep) else 0
        self.cache.filter(rows, trim)
        self.attention_mask = mask[:, trim:].contiguous()
        self.positions = self.positions.index_select(0, rows)
        self.next_tokens = self.next_tokens.index_select(0, rows)
        self.seq_ids = [self.seq_ids[row] for row in keep]

    @classmethod
    def concatenate(cls, batches: Sequence[DecodeBatch]) -> DecodeBatch:
        """Stack the rows of ``batches`` (left-padding the shorter ones)."""
        if len(batches) == 1:
            return batches[0]
        length = max(b.attention_mask.shape[1] for b in batches)
        masks = [torch.nn.functional.pad(b.attention_mask, (length - b.attention_mask.shape[1], 0)) for b in batches]
        return cls(
            cache=BatchKVCache.concatenate([b.cache for b in batches]),
            attention_mask=torch.cat(masks),
            positions=torch.cat([b.positions for b in batches]),
            next_tokens=torch.cat([b.next_tokens for b in batches]),
            seq_ids=[seq_id for b in batches for seq_id in b.seq_ids],
        )

    def num_padding(self, row: int) -> int:
        """Leading padding columns of ``row``."""
        return int(self.attention_mask.shape[1] - int(self.attention_mask[row].sum()))

    def extract_row(self, row: int, start: int = 0, end: int | None = None) -> RowKV:
        """A detached copy of the KV of ``row``'s tokens ``[start, end)`` (token positions: its padding left out;
        ``end`` None: to its last token)."""
        padding = self.num_padding(row)
        return self.cache.extract_row(row, padding + start, None if end is None else padding + end)
