"""Small statistics used by the benchmark: percentiles, medians across rounds, ratios between servers."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    None for an empty sequence, so a missing measurement never turns into a fake zero.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q!r}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    weight = rank - low
    return float(ordered[low] * (1.0 - weight) + ordered[high] * weight)


def median_call_s(fn: Callable[[], Any], calls: int) -> float:
    """The median wall time in seconds of ``calls`` calls of ``fn``, each timed on its own."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed(totals: MutableMapping[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding the wall seconds of each call (also one that raises) to ``totals[name]`` (a defaultdict)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - started

    return call


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return percentile(present, 50.0)


def ratio(ours: float | None, peer: float | None) -> float | None:
    """ours / peer, or None where either side is missing or the peer's value is zero."""
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer


def median_of_dicts(rounds: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Key-wise median over per-round summaries (keys missing from a round count as missing)."""
    keys: list[str] = []
    for summary in rounds:
        for key in summary:
            if key not in keys:
                keys.append(key)
    return {key: median([summary.get(key) for summary in rounds]) for key in keys}


def median_with_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float | None, float | None, float | None]:
    """The median of ``values`` and a percentile-bootstrap confidence interval for it (fixed seed, so a result file
    is reproducible from its own figures): ``(median, low, high)``, all None for no values."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence!r}")
    if not values:
        return None, None, None
    rng = random.Random(seed)
    n = len(values)
    medians = [percentile([values[rng.randrange(n)] for _ in range(n)], 50.0) or 0.0 for _ in range(resamples)]
    tail = (1.0 - confidence) * 50.0
    return percentile(values, 50.0), percentile(medians, tail), percentile(medians, 100.0 - tail)
