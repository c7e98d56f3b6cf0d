"""bench/chunk_attention.py: both ways timed on the same inputs, their errors against float32, a table per shape."""

import argparse

import pytest

from chatstream.engine.cpu import w8a8


@pytest.mark.skipif(w8a8.attention_unavailable_reason() is not None, reason="needs the chunk attention kernel")
def test_a_run_times_both_ways_and_measures_their_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.chunk_attention as bench

    monkeypatch.setattr(bench, "SHAPES", [(1, 300, 0), (20, 200, 64)])
    report = bench.run(argparse.Namespace(groups=2, head_dim=64, rounds=2, calls=2))
    assert list(report["shapes"]) == ["1x300", "20x200/w64"]
    for shape in report["shapes"].values():
        assert set(shape["median_ms"]) == {"sdpa", "kernel"} and all(len(r) == 2 for r in shape["rounds_ms"].values())
        assert shape["kernel_over_sdpa"] == shape["median_ms"]["kernel"] / shape["median_ms"]["sdpa"]
        assert 0 < shape["max_abs_error_vs_float32"]["kernel"] < 0.02  # bfloat16 outputs of values ~ 1
