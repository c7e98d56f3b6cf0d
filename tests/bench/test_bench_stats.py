"""The benchmark's own arithmetic: percentiles, medians over rounds, ratios."""

import pytest
from bench.report import compute_ratios
from bench.stats import median, median_of_dicts, median_with_ci, percentile, ratio


def test_percentile_matches_linear_interpolation():
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == pytest.approx(25.0)
    # rank = 3 * 0.99 = 2.97 -> 30 + 0.97 * 10
    assert percentile(values, 99) == pytest.approx(39.7)


def test_percentile_ignores_input_order_and_handles_one_value():
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_missing_not_zero():
    assert percentile([], 50) is None


def test_percentile_rejects_out_of_range_q():
    with pytest.raises(ValueError, match="150"):
        percentile([1.0], 150)


def test_median_skips_missing_rounds():
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None, None]) is None


def test_median_of_dicts_is_keywise():
    rounds = [
        {"tokens_per_s": 100.0, "ttft_p50_ms": 50.0},
        {"tokens_per_s": 300.0, "ttft_p50_ms": None},
        {"tokens_per_s": 200.0, "ttft_p50_ms": 70.0},
    ]
    assert median_of_dicts(rounds) == {"tokens_per_s": 200.0, "ttft_p50_ms": 60.0}


def test_ratio_guards_missing_and_zero():
    assert ratio(150.0, 100.0) == 1.5
    assert ratio(None, 100.0) is None
    assert ratio(1.0, 0.0) is None


def _server(tok_s, ttft, health=None, last_turn=None):
    server = {
        "throughput": {
            "openai": {"8": {"median": {"tokens_per_s": tok_s, "ttft_p50_ms": ttft}}},
            "native": {"8": {"median": {"tokens_per_s": tok_s / 2, "ttft_p50_ms": ttft}}},
        }
    }
    if health is not None:
        server["responsiveness"] = {"health_p99_ms": health}
    if last_turn is not None:
        server["multi_turn"] = {"turns": [{"ttft_p50_ms": 1.0}, {"ttft_p50_ms": last_turn}]}
    return server


def test_ratios_pair_servers_on_their_shared_protocol():
    servers = {
        "ours-bf16": _server(360.0, 40.0, health=5.0, last_turn=60.0),
        "vllm-bf16": {
            "throughput": {"openai": {"8": {"median": {"tokens_per_s": 120.0, "ttft_p50_ms": 80.0}}}},
            "responsiveness": {"health_p99_ms": 10.0},
            "multi_turn": {"turns": [{"ttft_p50_ms": 30.0}]},
        },
    }
    rows = compute_ratios(servers)
    per_conc = [r for r in rows if r["concurrency"] is not None]
    assert len(per_conc) == 1
    row = per_conc[0]
    assert (row["ours"], row["peer"], row["protocol"], row["concurrency"]) == ("ours-bf16", "vllm-bf16", "openai", 8)
    assert row["tokens_per_s"] == pytest.approx(3.0)
    assert row["ttft_p50_ms"] == pytest.approx(0.5)
    assert row["itl_p50_ms"] is None
    extra = [r for r in rows if r["concurrency"] is None]
    assert extra[0]["health_p99_ms"] == pytest.approx(0.5)
    assert extra[0]["multi_turn_last_ttft_ms"] == pytest.approx(2.0)


def test_ratios_skip_pairs_with_a_missing_server():
    assert compute_ratios({"ours-fp32": _server(100.0, 10.0)}) == []


def test_median_with_ci_brackets_the_median_and_repeats_itself():
    values = [float(v) for v in (5, -3, 12, 7, 0, 9, -1, 4, 6, 8, 2)]
    mid, low, high = median_with_ci(values)
    assert mid == 5.0
    assert low is not None and high is not None and min(values) <= low <= mid <= high <= max(values)
    assert median_with_ci(values) == (mid, low, high)  # seeded
    narrow = median_with_ci(values, confidence=0.5)
    assert low <= narrow[1] <= narrow[2] <= high
    assert median_with_ci([]) == (None, None, None)
    with pytest.raises(ValueError):
        median_with_ci(values, confidence=1.0)
