"""kv_cache: in-place buffers, row filter/concatenate with left padding, rows named by their sequence ids."""

from __future__ import annotations

import torch

from chatstream.engine.kv_cache import BatchKVCache, BufferedLayer, DecodeBatch, RowKV


def _kv(b: int, n: int, fill: float) -> torch.Tensor:
    return torch.full((b, 2, n, 4), fill)


def test_buffered_layer_writes_in_place_and_grows() -> None:
    layer = BufferedLayer()
    keys, _ = layer.update(_kv(2, 3, 1.0), _kv(2, 3, -1.0))
    assert keys.shape == (2, 2, 3, 4)
    buffer = layer.key_buffer
    keys, values = layer.update(_kv(2, 1, 2.0), _kv(2, 1, -2.0))
    assert layer.key_buffer is buffer  # no reallocation inside the headroom
    assert keys.shape == (2, 2, 4, 4) and float(keys[0, 0, 3, 0]) == 2.0 and float(values[1, 1, 3, 0]) == -2.0
    layer.update(_kv(2, layer.capacity, 3.0), _kv(2, layer.capacity, 3.0))
    assert layer.key_buffer is not buffer and layer.length == 4 + buffer.shape[2]
    assert float(layer.k[0, 0, 2, 0]) == 1.0
    assert layer.get_mask_sizes(1) == (layer.length + 1, 0)


def _cache(b: int, n: int, fill: float) -> BatchKVCache:
    cache = BatchKVCache(2)
    for layer in cache.buffered:
        layer.update(_kv(b, n, fill), _kv(b, n, -fill))
    return cache


def test_concatenate_right_aligns_with_zero_padding() -> None:
    merged = BatchKVCache.concatenate([_cache(1, 5, 1.0), _cache(2, 3, 2.0)])
    assert merged.length == 5
    keys = merged.buffered[1].k
    assert keys.shape[0] == 3
    assert torch.all(keys[0] == 1.0)
    assert torch.all(keys[1:, :, :2] == 0.0) and torch.all(keys[1:, :, 2:] == 2.0)


def test_filter_keeps_rows_and_trims_padding_columns() -> None:
    merged = BatchKVCache.concatenate([_cache(1, 5, 1.0), _cache(2, 3, 2.0)])
    merged.filter(torch.tensor([2, 1]), trim_left=2)
    assert merged.length == 3
    assert merged.buffered[0].k.shape[0] == 2 and torch.all(merged.buffered[0].k == 2.0)


def test_decode_batch_filter_and_concatenate() -> None:
    a = DecodeBatch(_cache(1, 5, 1.0), torch.ones(1, 5, dtype=torch.bool), torch.tensor([5]), torch.tensor([7]), [10])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    b = DecodeBatch(_cache(2, 3, 2.0), mask, torch.tensor([2, 3]), torch.tensor([8, 9]), [11, 12])
    merged = DecodeBatch.concatenate([a, b])
    assert merged.attention_mask.tolist()[1] == [False, False, False, True, True]
    assert [merged.num_padding(r) for r in range(3)] == [0, 3, 2]
    assert merged.seq_ids == [10, 11, 12]
    assert merged.extract_row(1).num_tokens == 2
    merged.filter([2, 1])
    assert merged.seq_ids == [12, 11]
    assert merged.attention_mask.shape == (2, 3)  # two all-padding columns dropped
    assert merged.positions.tolist() == [3, 2] and merged.next_tokens.tolist() == [9, 8]
    assert merged.cache.length == 3


def test_restore_forgets_what_a_failed_forward_appended() -> None:
    cache = _cache(2, 3, 1.0)
    lengths = cache.lengths()
    cache.buffered[0].update(_kv(2, 2, 5.0), _kv(2, 2, 5.0))  # one layer appended, the next never reached
    assert cache.lengths() == [5, 3]
    cache.restore(lengths)
    assert cache.lengths() == [3, 3] and torch.all(cache.buffered[0].k == 1.0)
    fresh = BatchKVCache(2)
    empty = fresh.lengths()
    fresh.buffered[0].update(_kv(1, 4, 1.0), _kv(1, 4, 1.0))
    fresh.restore(empty)
    assert fresh.lengths() == [0, 0]


def _row(n: int, fill: float) -> RowKV:
    columns = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, n, 4) + fill
    return RowKV(((columns.clone(), -columns.clone()), (columns.clone(), -columns.clone())))


def test_from_segments_places_each_rows_pieces_in_order_right_aligned() -> None:
    cache = BatchKVCache.from_segments([[(_row(6, 100.0), 2), (_row(3, 300.0), 2)], [(_row(3, 200.0), 2)], []], 2)
    assert cache.length == 4
    for layer in cache.buffered:
        assert layer.capacity > layer.length  # headroom for the prefill that follows
        assert torch.equal(layer.k[0, 0, :, 0], torch.tensor([100.0, 101.0, 300.0, 301.0]))
        assert torch.equal(layer.k[1, 0, :, 0], torch.tensor([0.0, 0.0, 200.0, 201.0]))
        assert torch.equal(layer.v[1, 1, :, 3], torch.tensor([0.0, 0.0, -200.0, -201.0]))
        assert torch.equal(layer.k[2], torch.zeros(2, 4, 4))
    assert BatchKVCache.from_segments([[], []], 3).length == 0


def test_extract_row_takes_a_span_of_token_positions() -> None:
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    cache = BatchKVCache.from_segments([[(_row(3, 10.0), 3)], [(_row(4, 20.0), 4)]], 2)
    batch = DecodeBatch(cache, mask, torch.tensor([3, 4]), torch.tensor([0, 0]), [1, 2])
    span = batch.extract_row(0, 1, 3)
    assert span.num_tokens == 2 and torch.equal(span.layers[0][0][0, :, 0], torch.tensor([11.0, 12.0]))
    assert batch.extract_row(1, 2).num_tokens == 2


def test_layers_grow_on_consecutive_steps_not_all_in_one() -> None:
    cache = BatchKVCache(4)
    for layer in cache.buffered:
        layer.update(_kv(1, 10, 1.0), _kv(1, 10, 1.0))
    capacity = cache.buffered[0].capacity
    grown_at: dict[int, int] = {}
    for step in range(capacity):
        for index, layer in enumerate(cache.buffered):
            before = layer.key_buffer
            layer.update(_kv(1, 1, 2.0), _kv(1, 1, 2.0))
            if layer.key_buffer is not before:
                grown_at.setdefault(index, step)
    assert len(set(grown_at.values())) == 4  # each layer on a step of its own
    assert all(float(layer.k[0, 0, 9, 0]) == 1.0 and layer.length == 10 + capacity for layer in cache.buffered)


def test_a_long_span_of_a_one_row_cache_is_shared_and_stays_as_it_was() -> None:
    alone = _cache(1, 100, 1.0)
    kept = alone.extract_row(0, 0, 100)
    assert kept.layers[0][0].data_ptr() == alone.buffered[0].key_buffer.data_ptr()  # a view, no copy
    for layer in alone.buffered:
        layer.update(_kv(1, 1, 5.0), _kv(1, 1, 5.0))  # the next step appends after it
    assert kept.num_tokens == 100 and bool((kept.layers[0][0] == 1.0).all())
    short = alone.extract_row(0, 0, 10)  # a short span would keep a large buffer alive: copied
    rows = _cache(2, 100, 1.0).extract_row(1, 0, 100)  # a row of several: copied
    for span in (short, rows):
        assert span.layers[0][0].untyped_storage().nbytes() == span.layers[0][0].numel() * 4
