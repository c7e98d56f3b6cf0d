"""Tables of the chat scenarios (shared system prompt, long prompts joining) and the README's generated table.

:func:`render_chat_tables` prints the scenarios of ``bench/chat_scenarios.py`` next to the throughput tables of
``bench/report.py``. :func:`readme_table` is one markdown table with a column per server and a row per issue-14
figure; :func:`update_readme` writes it between the ``<!-- bench:table -->`` markers of README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import _num, _table

README_START = "<!-- bench:table:start -->"
README_END = "<!-- bench:table:end -->"


def _get(server: dict[str, Any], *path: str) -> Any:
    value: Any = server
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def render_chat_tables(report: dict[str, Any]) -> str:
    servers = report["servers"]
    shared = [
        (name, _num(_get(s, "shared_prefix", "median", "cold_ttft_p50_ms"), 0),
         _num(_get(s, "shared_prefix", "median", "cold_ttft_p99_ms"), 0),
         _num(_get(s, "shared_prefix", "median", "warm_ttft_p50_ms"), 0),
         _num(_get(s, "shared_prefix", "median", "warm_ttft_p99_ms"), 0),
         _num(_get(s, "shared_prefix", "median", "warm_cached_tokens_mean"), 0))
        for name, s in servers.items() if s.get("shared_prefix")
    ]  # fmt: skip
    joiners = [
        (name, *(_num(_get(s, "long_joiners", "median", key), digits) for key, digits in (
            ("gap_before_p50_ms", 0), ("gap_during_p99_ms", 0), ("gap_during_max_ms", 0),
            ("gap_ratio", 2), ("joiner_ttft_p50_ms", 0), ("joiner_ttft_max_ms", 0))))
        for name, s in servers.items() if s.get("long_joiners")
    ]  # fmt: skip
    parts = []
    if shared:
        header = ("server", "cold TTFT p50", "cold p99", "warm TTFT p50", "warm p99", "cached tok")
        parts += ["", "Shared system prompt (ms; cold: a system prompt no server has seen yet)", _table(header, shared)]
    if joiners:
        header = ("server", "gap before p50", "gap during p99", "max", "p99/before", "joiner TTFT p50", "max")
        parts += ["", "Long prompts joining running streams (ms)", _table(header, joiners)]
    return "\n".join(parts)


def _throughput(protocol: str, concurrency: str, metric: str) -> Callable[[dict[str, Any]], Any]:
    return lambda s: _get(s, "throughput", protocol, concurrency, "median", metric)


def _turn_ratio(server: dict[str, Any]) -> float | None:
    return _get(server, "multi_turn", "ttft_last_over_first")


ROWS: tuple[tuple[str, Callable[[dict[str, Any]], Any], int], ...] = (
    ("tok/s, 1 chat", _throughput("openai", "1", "tokens_per_s"), 1),
    ("tok/s, 8 chats", _throughput("openai", "8", "tokens_per_s"), 1),
    ("tok/s, 32 chats", _throughput("openai", "32", "tokens_per_s"), 1),
    ("TTFT p50 ms, 8 chats", _throughput("openai", "8", "ttft_p50_ms"), 0),
    ("shared system prompt: TTFT p50 ms, cold", lambda s: _get(s, "shared_prefix", "median", "cold_ttft_p50_ms"), 0),
    ("shared system prompt: TTFT p50 ms, warm", lambda s: _get(s, "shared_prefix", "median", "warm_ttft_p50_ms"), 0),
    ("long prompts joining: running gap p99 ms", lambda s: _get(s, "long_joiners", "median", "gap_during_p99_ms"), 0),
    ("long prompts joining: gap p99 / usual gap", lambda s: _get(s, "long_joiners", "median", "gap_ratio"), 2),
    ("long prompts joining: joiner TTFT p50 ms", lambda s: _get(s, "long_joiners", "median", "joiner_ttft_p50_ms"), 0),
    ("multi-turn TTFT, last turn / turn 1", _turn_ratio, 2),
)


def readme_table(report: dict[str, Any], json_path: Path | None = None) -> str:
    """The run's main figures as markdown: one column per server, one row per figure (- where not measured)."""
    servers = report["servers"]
    names = list(servers)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, read, digits in ROWS:
        cells = [_num(read(servers[name]), digits) for name in names]
        if any(cell != "-" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    meta = report["meta"]
    source = f" ({json_path.name})" if json_path is not None else ""
    load = meta["machine_before"]["loadavg_1m"]
    note = (
        f"Run {meta['started']}, commit {meta['git_commit']}, load average before {load:.2f}"
        f"{' (NOISY)' if meta.get('noisy') else ''}; medians of {meta['config']['rounds']} rounds{source}."
    )
    return "\n".join([note, "", *lines])


def update_readme(readme: Path, report: dict[str, Any], json_path: Path | None = None) -> None:
    """Replace the text between the README's markers with :func:`readme_table` (appended under a heading when the
    README has no markers yet)."""
    text = readme.read_text(encoding="utf-8")
    block = f"{README_START}\n{readme_table(report, json_path)}\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + block + tail
    else:
        text = (
            text.rstrip("\n")
            + "\n\n### Latest side-by-side run (generated by bench/run_all.py --readme)\n\n"
            + block
            + "\n"
        )
    readme.write_text(text, encoding="utf-8")
