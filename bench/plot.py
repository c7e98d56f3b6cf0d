"""One PNG per run: tok/s against concurrency, and TTFT per scenario, for every server.

    python -m bench.plot bench/results/RUN.json        # writes bench/results/RUN.png

matplotlib is needed only here (``pip install matplotlib``); run_all skips the plot without it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.summary import _get

SCENARIOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("1 chat", ("throughput", "openai", "1", "median", "ttft_p50_ms")),
    ("8 chats", ("throughput", "openai", "8", "median", "ttft_p50_ms")),
    ("32 chats", ("throughput", "openai", "32", "median", "ttft_p50_ms")),
    ("shared prompt\ncold", ("shared_prefix", "median", "cold_ttft_p50_ms")),
    ("shared prompt\nwarm", ("shared_prefix", "median", "warm_ttft_p50_ms")),
    ("long prompts\njoining", ("long_joiners", "median", "joiner_ttft_p50_ms")),
)


def _throughput_points(server: dict[str, Any]) -> list[tuple[int, float]]:
    by_conc = _get(server, "throughput", "openai") or {}
    points = [(int(c), entry["median"].get("tokens_per_s")) for c, entry in by_conc.items()]
    return sorted((c, v) for c, v in points if v is not None)


def _turns(server: dict[str, Any]) -> list[float | None]:
    return [turn.get("ttft_p50_ms") for turn in _get(server, "multi_turn", "turns") or []]


def plot_report(report: dict[str, Any], out: Path) -> Path | None:
    """Draw the run's figures into ``out``; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    servers = report["servers"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.5))
    for name, server in servers.items():
        points = _throughput_points(server)
        if points:
            left.plot([c for c, _ in points], [v for _, v in points], marker="o", label=name)
    left.set(xscale="log", xlabel="concurrent chats", ylabel="output tok/s", title="Throughput (OpenAI SSE)")
    left.set_xticks(sorted({c for s in servers.values() for c, _ in _throughput_points(s)}) or [1])
    left.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    _ttft_bars(middle, servers)
    for name, server in servers.items():
        turns = _turns(server)
        if any(t is not None for t in turns):
            middle_turns = [t if t is not None else float("nan") for t in turns]
            right.plot(range(1, len(turns) + 1), middle_turns, marker="o", label=name)
    right.set(xlabel="turn", ylabel="TTFT p50 (ms)", title="Multi-turn conversations")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"ChatStream side by side — {meta['started']} (commit {meta['git_commit']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ttft_bars(axis: Any, servers: dict[str, Any]) -> None:
    names = list(servers)
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        values = [_get(servers[name], *path) for _, path in SCENARIOS]
        xs = [i + index * width for i in range(len(SCENARIOS))]
        axis.bar(xs, [v if v is not None else 0.0 for v in values], width=width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(SCENARIOS))])
    axis.set_xticklabels([label for label, _ in SCENARIOS], fontsize=8)
    axis.set(ylabel="TTFT p50 (ms)", yscale="log", title="Time to first token per scenario")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = json.loads(args.report.read_text(encoding="utf-8"))
    out = plot_report(report, args.out or args.report.with_suffix(".png"))
    print(out or "matplotlib is not installed: pip install matplotlib")


if __name__ == "__main__":
    main()
