"""ChatStream on Ray Serve: sticky routing against Ray's default router, and the latency Ray adds per request.

One run, on a local Ray cluster with Serve's proxy on 127.0.0.1:

1. **multi-turn**: N conversations x T turns (default 8 x 6; the conversations run at once, the turns of each one after
   another) through 2 engine replicas, first with the conversation-sticky router, then with Ray's default
   power-of-two-choices router. Per router: the prefix-cache hit rate (cached prompt tokens / prompt tokens of turns 2+,
   and the share of those turns with any cache hit), TTFT p50/p90, replica moves.
2. **overhead**: small non-streaming requests on the mock engine (no generation time), one after another, through
   Ray (front + 1 engine replica) and through our server alone (uvicorn on 127.0.0.1); p50/p90 latency and the
   difference.

    PYTHONPATH=src:. python -m bench.ray_serve                   # the tiny test model, built offline
    PYTHONPATH=src:. python -m bench.ray_serve --model DIR --max-tokens 32 --gpus-per-replica 1

Prints a table and writes JSON to bench/results/ray_serve.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tests.ray.cluster import deployed, local_cluster, routing

from bench.conversations import run_conversations
from bench.stats import percentile
from chatstream.config import EngineConfig, MockConfig, MockType
from chatstream.ray.app import FrontSettings
from chatstream.ray.spec import EngineSpec, ReplicaSettings

RESULTS = Path(__file__).parent / "results" / "ray_serve.json"


def multi_turn(url: str, args: argparse.Namespace) -> dict[str, Any]:
    summary = run_conversations(url, "bench", args.conversations, args.turns, args.max_tokens)
    with httpx.Client(base_url=url, timeout=30) as client:
        report = routing(client)
    return {**summary, "moves": report["moves"], "turns_by_replica": report["turns_by_replica"]}


def _latencies(url: str, count: int) -> list[float]:
    body = {"model": "chatstream-mock", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4}
    headers = {"X-FastSession-Skip": "skip"}
    out = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(count + 5):
            sent = time.monotonic()
            client.post("/v1/chat/completions", json=body, headers=headers).raise_for_status()
            if i >= 5:  # warm-up
                out.append(time.monotonic() - sent)
    return out


def _summary(latencies: list[float]) -> dict[str, float]:
    return {q: round(1000 * (percentile(latencies, p) or 0), 2) for q, p in (("p50_ms", 50), ("p90_ms", 90))}


def overhead(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from tests.live_server import run_server

    from chatstream import ChatStream
    from chatstream.server.app import create_app

    mock = EngineSpec(mock=MockConfig(type=MockType.ECHO, time_per_token_sec=0.0))
    with deployed(url, mock, ReplicaSettings(num_cpus=0.5), name="bench-mock") as ray_url:
        through_ray = _latencies(ray_url, args.requests)
    alone = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0.0})
    with run_server(create_app(alone, drain_timeout=0.5)) as alone_url:
        direct = _latencies(alone_url, args.requests)
    ray, ours = _summary(through_ray), _summary(direct)
    return {"ray": ray, "alone": ours, "added_p50_ms": round(ray["p50_ms"] - ours["p50_ms"], 2)}


def _model_dir(args: argparse.Namespace, tmp: Path) -> str:
    if args.model:
        return str(args.model)
    from tests.tiny_model import build_tiny

    build_tiny(tmp)
    return str(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the tiny test model, built offline)")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50, help="requests per side in the overhead scenario")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="0: replicas on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of each replica's engine")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as tmp, local_cluster(args.num_cpus) as url:
        spec = EngineSpec(
            model_path=_model_dir(args, Path(tmp)),
            engine_config=EngineConfig(max_batch_size=args.batch_size, context_len=2048),
            num_threads=args.threads,
        )
        front = FrontSettings(chat_stream_options={"model_name": "bench", "ignore_eos": True})
        for sticky in (True, False):
            replicas = ReplicaSettings(num_replicas=2, num_cpus=0.5, num_gpus=args.gpus_per_replica, sticky=sticky)
            with deployed(url, spec, replicas, front, name="bench"):
                results["sticky" if sticky else "ray_default"] = multi_turn(url, args)
        results["overhead"] = overhead(url, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print(results)


def _print(results: dict[str, Any]) -> None:
    print(
        f"{'router':<12} {'cached tok':>10} {'hit turns':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'moves':>5} {'wall':>6}"
    )
    for name in ("sticky", "ray_default"):
        r = results[name]
        print(
            f"{name:<12} {r['cached_token_share']:>10.1%} {r['turns_with_hit']:>9.1%} {r['ttft_p50_ms']:>7.1f}ms "
            f"{r['ttft_p90_ms']:>7.1f}ms {r['moves']:>5} {r['wall_s']:>5.1f}s"
        )
    o = results["overhead"]
    print(f"latency p50: through Ray {o['ray']['p50_ms']} ms, our server alone {o['alone']['p50_ms']} ms")
    print(f"Ray adds {o['added_p50_ms']} ms per request (p50)")


if __name__ == "__main__":
    main()
