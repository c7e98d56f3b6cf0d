"""The summary of bench/store_http.py: per store and number of chats, and what each adds to the memory store."""

from __future__ import annotations

import argparse

from bench.store_http import _summarise


def test_added_latency_is_measured_against_the_memory_store() -> None:
    samples = {
        ("memory", 8): [10.0, 20.0, 30.0],
        ("sqlite", 8): [12.0, 22.0, 32.0],
        ("redis", 8): [15.0, 25.0, 35.0],
    }
    results = {r["store"]: r for r in _summarise(samples, argparse.Namespace())}
    assert results["memory"]["added_p50_ms"] == 0.0
    assert (results["sqlite"]["p50_ms"], results["sqlite"]["added_p50_ms"]) == (22.0, 2.0)
    assert results["redis"]["added_p50_ms"] == 5.0 and results["redis"]["turns"] == 3
