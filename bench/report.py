"""Ratios ours/peer and the plain-text tables printed at the end of a run; the Markdown table and JSON file of the
single-purpose benchmarks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stats import ratio

# (ours, peer, protocol): each pair is compared on the protocol both speak. The last pair crosses dtypes on purpose:
# ours at its default (bf16) against the original at the only dtype it supports.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("ours-bf16", "vllm-bf16", "openai"),
    ("ours-fp32", "vllm-fp32", "openai"),
    ("ours-fp32", "original-fp32", "native"),
    ("ours-bf16", "original-fp32", "native"),
)
RATIO_METRICS = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def _medians(server: dict[str, Any], protocol: str) -> dict[str, dict[str, float | None]]:
    by_conc = (server.get("throughput") or {}).get(protocol) or {}
    return {conc: entry["median"] for conc, entry in by_conc.items()}


def compute_ratios(servers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """ours/peer for every pair both of whose servers were measured, concurrency by concurrency.

    For tokens/s above 1 means ours is faster; for the latencies below 1 means ours is faster.
    """
    rows: list[dict[str, Any]] = []
    for ours_name, peer_name, protocol in PAIRS:
        ours, peer = servers.get(ours_name), servers.get(peer_name)
        if not ours or not peer:
            continue
        ours_by_conc, peer_by_conc = _medians(ours, protocol), _medians(peer, protocol)
        for conc in ours_by_conc:
            if conc not in peer_by_conc:
                continue
            row: dict[str, Any] = {"ours": ours_name, "peer": peer_name, "protocol": protocol, "concurrency": int(conc)}
            for metric in RATIO_METRICS:
                row[metric] = ratio(ours_by_conc[conc].get(metric), peer_by_conc[conc].get(metric))
            rows.append(row)
        health = ratio(_health_p99(ours), _health_p99(peer))
        turn_last = ratio(_last_turn_ttft(ours), _last_turn_ttft(peer))
        if health is not None or turn_last is not None:
            rows.append(
                {
                    "ours": ours_name,
                    "peer": peer_name,
                    "protocol": protocol,
                    "concurrency": None,
                    "health_p99_ms": health,
                    "multi_turn_last_ttft_ms": turn_last,
                }
            )
    return rows


def _health_p99(server: dict[str, Any]) -> float | None:
    value = (server.get("responsiveness") or {}).get("health_p99_ms")
    return float(value) if value is not None else None


def _last_turn_ttft(server: dict[str, Any]) -> float | None:
    turns = (server.get("multi_turn") or {}).get("turns") or []
    value = turns[-1]["ttft_p50_ms"] if turns else None
    return float(value) if value is not None else None


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def throughput_table(servers: dict[str, dict[str, Any]]) -> str:
    header = (
        "server",
        "proto",
        "conc",
        "tok/s",
        "out/req",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "ok/rej/fail",
        "RSS MB",
    )
    rows = []
    for name, server in servers.items():
        for protocol, by_conc in (server.get("throughput") or {}).items():
            for conc, entry in by_conc.items():
                m = entry["median"]
                counts = f"{_num(m.get('completed'), 0)}/{_num(m.get('rejected'), 0)}/{_num(m.get('failed'), 0)}"
                rows.append(
                    (
                        name,
                        protocol,
                        conc,
                        _num(m.get("tokens_per_s")),
                        _num(m.get("output_tokens_mean"), 0),
                        _num(m.get("ttft_p50_ms"), 0),
                        _num(m.get("ttft_p99_ms"), 0),
                        _num(m.get("itl_p50_ms")),
                        _num(m.get("itl_p99_ms")),
                        counts,
                        _num(m.get("rss_peak_mb"), 0),
                    )
                )
    return _table(header, rows)


def ratio_table(ratios: Sequence[dict[str, Any]]) -> str:
    header = ("ours / peer", "proto", "conc", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99")
    rows = [
        (
            f"{r['ours']} / {r['peer']}",
            r["protocol"],
            str(r["concurrency"]),
            *(_num(r.get(metric), 2) for metric in RATIO_METRICS),
        )
        for r in ratios
        if r["concurrency"] is not None
    ]
    return _table(header, rows)


def health_table(servers: dict[str, dict[str, Any]]) -> str:
    header = ("server", "proto", "chats ok", "probes", "fail", "p50 ms", "p99 ms", "max ms")
    rows = []
    for name, server in servers.items():
        r = server.get("responsiveness")
        if r:
            rows.append(
                (
                    name,
                    r["protocol"],
                    f"{r['chats_completed']}/{r['chats']}",
                    str(r["probes"]),
                    str(r["probe_failures"]),
                    _num(r["health_p50_ms"]),
                    _num(r["health_p99_ms"]),
                    _num(r["health_max_ms"]),
                )
            )
    return _table(header, rows)


def multi_turn_table(servers: dict[str, dict[str, Any]]) -> str:
    with_mt = {name: s["multi_turn"] for name, s in servers.items() if s.get("multi_turn")}
    if not with_mt:
        return ""
    turns = max(len(mt["turns"]) for mt in with_mt.values())
    header = ("server (TTFT p50 ms)", *(f"t{i + 1}" for i in range(turns)), "last/first", "RSS end MB")
    rows = []
    for name, mt in with_mt.items():
        cells = [_num(t["ttft_p50_ms"], 0) for t in mt["turns"]] + ["-"] * (turns - len(mt["turns"]))
        rss = mt["turns"][-1]["rss_mb"] if mt["turns"] else None
        rows.append((f"{name} ({mt['protocol']})", *cells, _num(mt.get("ttft_last_over_first"), 2), _num(rss, 0)))
    return _table(header, rows)


def crosscheck_table(servers: dict[str, dict[str, Any]]) -> str:
    """The harness's figures beside vLLM's own client's on the same OpenAI endpoint."""
    header = ("server", "conc", "tok/s here", "tok/s vllm-client", "TTFT p50 here", "vllm-client", "ITL p50 here",
              "vllm-client")  # fmt: skip
    rows = []
    for name, server in servers.items():
        ours_by_conc = _medians(server, "openai")
        for conc, theirs in (server.get("crosscheck_vllm_client") or {}).items():
            mine = ours_by_conc.get(conc, {})
            rows.append(
                (name, conc, _num(mine.get("tokens_per_s")), _num(theirs.get("output_throughput")),
                 _num(mine.get("ttft_p50_ms"), 0), _num(theirs.get("median_ttft_ms"), 0),
                 _num(mine.get("itl_p50_ms")), _num(theirs.get("median_itl_ms")))
            )  # fmt: skip
    return _table(header, rows) if rows else ""


def render_tables(report: dict[str, Any]) -> str:
    meta = report["meta"]
    servers = report["servers"]
    parts = [
        f"ChatStream side-by-side benchmark {meta['started']} (commit {meta['git_commit']}), "
        f"{meta['machine_before']['cpus']} CPUs, load before {meta['machine_before']['loadavg_1m']:.2f}"
        + (" -- NOISY: the machine was busy" if meta.get("noisy") else ""),
        f"max_tokens {meta['config']['max_tokens']}, greedy, ignore_eos {meta['ignore_eos']}, "
        f"rounds {meta['config']['rounds']} (medians), tokens counted by {meta['token_counting']} (native)"
        " / usage (OpenAI)",
        "",
        "Throughput (latencies in ms)",
        throughput_table(servers),
    ]
    if report.get("ratios"):
        parts += [
            "",
            "Ratios ours/peer (tok/s: >1 ours faster; latencies: <1 ours faster)",
            ratio_table(report["ratios"]),
        ]
    health = health_table(servers)
    if health.count("\n") > 1:
        parts += ["", "GET /health while chats stream", health]
    mt = multi_turn_table(servers)
    if mt:
        parts += ["", "Multi-turn TTFT per turn", mt]
    cross = crosscheck_table(servers)
    if cross:
        parts += ["", "Cross-check: this harness vs vLLM's benchmark client, same endpoint", cross]
    errors = [f"{name}: {s['error']}" for name, s in servers.items() if s.get("error")]
    if errors:
        parts += ["", "Errors", *errors]
    return "\n".join(parts)


def print_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table (numbers right-aligned), ready for the docs."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def write_json(directory: Path, name: str, report: dict[str, Any]) -> Path:
    """``report`` as ``directory/name`` (the directory created if needed); prints where."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path
