"""One stream at a time, the servers interleaved request by request: the single-stream comparison that the VM's drift
cannot tilt.

    PYTHONPATH=src python -m bench.interleaved --servers ours-w8a8bf16,llamacpp-q4km --rounds 15

``bench.run_all`` benches one server after the other, so on a machine whose speed moves within minutes (the shared
VMs this project is measured on) a single-stream comparison depends on which server ran when. Here every listed
server is started at once (each idle while another serves) and warmed up; then each round sends one chat of
``--max-tokens`` tokens (OpenAI protocol, greedy, EOS ignored) to every server in turn, the order rotating between
rounds, so that each round's servers ran within seconds of each other; each request follows ``--pause`` seconds of
quiet, so that nothing a server does after its answer overlaps the next server's request. Reported per server: the
medians over rounds of tok/s (tokens over the request's wall time, TTFT included), TTFT and the request's median
inter-token gap; and per server after the first, the median of the rounds' own tok/s ratios against the first
server. Results go to ``--out`` (default bench/results/interleaved_<timestamp>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench.report import print_markdown, write_json
from bench.run_all import (
    PROMPTS_PATH,
    READY_TIMEOUT_S,
    RESULTS_DIR,
    close_endpoint,
    git_commit,
    launch_options,
    machine_state,
    make_endpoint,
    make_token_counter,
    openai_extra_body,
    resolve_model,
)
from bench.scenarios import BenchConfig, Endpoint, warm_up
from bench.servers import ALL_SERVERS, DEFAULT_CACHE, RunningServer, stop_all

logger = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="transformers checkpoint dir (default: `chatstream convert`)")
    parser.add_argument("--servers", default="ours-w8a8bf16,llamacpp-q4km", help="comma list; the first is the base")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each request")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the peers' venvs live")
    parser.add_argument("--out", type=Path, help="JSON path")
    args = parser.parse_args(argv)
    # what bench.run_all's launch options read, at its defaults
    args.mock, args.no_ignore_eos, args.max_prefill_tokens, args.max_decode_slowdown = False, False, None, None
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    names = [name.strip() for name in args.servers.split(",") if name.strip()]
    by_name = {spec.name: spec for spec in ALL_SERVERS}
    unknown = [name for name in names if name not in by_name]
    if unknown or len(names) < 2:
        raise SystemExit(f"need two or more known servers; unknown: {unknown}")
    specs = [by_name[name] for name in names]
    config = BenchConfig(concurrencies=(1,), rounds=args.rounds, max_tokens=args.max_tokens)
    model_dir = resolve_model(args)
    count, counting = make_token_counter(model_dir)
    prompts = json.loads(PROMPTS_PATH.read_text(encoding="utf-8"))["single"]
    options = launch_options(args, config, model_dir, any(spec.kind == "llamacpp" for spec in specs))
    meta = {"started": time.strftime("%Y%m%d-%H%M%S"), "git_commit": git_commit(), "model_dir": str(model_dir),
            "gguf_path": str(options.gguf_path) if options.gguf_path else None, "token_counting": counting,
            "rounds": args.rounds, "max_tokens": args.max_tokens, "pause_s": args.pause,
            "machine_before": machine_state()}  # fmt: skip
    servers = [RunningServer(spec, options, RESULTS_DIR / "logs") for spec in specs]
    endpoints: list[Endpoint] = []
    try:
        for server in servers:
            server.wait_ready(READY_TIMEOUT_S)
        for spec, server in zip(specs, servers, strict=True):
            extra = openai_extra_body(spec, options.ignore_eos)
            endpoints.append(await make_endpoint(server, "openai", count, args.max_tokens, extra))
        for endpoint in endpoints:
            await warm_up(endpoint, prompts, 1, config.round_timeout_s)
        rounds: list[dict[str, dict[str, float]]] = []
        for index in range(args.rounds):
            prompt = prompts[index % len(prompts)]
            shift = index % len(specs)
            order = list(range(len(specs)))[shift:] + list(range(len(specs)))[:shift]
            row: dict[str, dict[str, float]] = {}
            for i in order:
                await asyncio.sleep(args.pause)  # whatever the last server does after its answer, it does it alone
                result = await endpoints[i].single_turn(prompt)()
                if not result.ok or not result.e2e_s or result.ttft_s is None:
                    raise RuntimeError(f"{specs[i].name}: request failed: {result.error}")
                row[specs[i].name] = {
                    "tok_s": result.output_tokens / result.e2e_s,
                    "ttft_ms": 1000 * result.ttft_s,
                    "itl_ms": 1000 * statistics.median(result.itl_s) if result.itl_s else float("nan"),
                    "tokens": result.output_tokens,
                }
            logger.info("round %d: %s", index, {n: round(v["tok_s"], 1) for n, v in row.items()})
            rounds.append(row)
    finally:
        for endpoint in endpoints:
            await close_endpoint(endpoint)
        for server in servers:
            server.stop()
    meta["machine_after"] = machine_state()
    base = specs[0].name
    summary = {
        spec.name: {key: statistics.median(r[spec.name][key] for r in rounds) for key in ("tok_s", "ttft_ms", "itl_ms")}
        for spec in specs
    }
    for spec in specs[1:]:
        summary[spec.name][f"median_round_ratio_{base}_over_this"] = statistics.median(
            r[base]["tok_s"] / r[spec.name]["tok_s"] for r in rounds
        )
    return {"meta": meta, "summary": summary, "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        report = asyncio.run(main_async(args))
    finally:
        stop_all()
    base = next(iter(report["summary"]))
    rows = []
    for name, values in report["summary"].items():
        ratio = values.get(f"median_round_ratio_{base}_over_this")
        rows.append([name, f"{values['tok_s']:.1f}", f"{values['ttft_ms']:.0f}", f"{values['itl_ms']:.2f}",
                     "" if ratio is None else f"{ratio:.2f}"])  # fmt: skip
    print_markdown(["server", "tok/s", "TTFT ms", "ITL p50 ms", f"{base} ÷ this (median of rounds)"], rows)
    out = args.out or RESULTS_DIR / f"interleaved_{report['meta']['started']}.json"
    write_json(out.parent, out.name, report)


if __name__ == "__main__":
    main()
