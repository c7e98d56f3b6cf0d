"""The options of the ``chatstream`` command: what each command accepts and how values are checked.

The value types raise ``argparse.ArgumentTypeError`` (or ValueError), which argparse turns into "argument --x: invalid
... value" and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from chatstream.config import WEIGHT_QUANTIZATIONS, EngineConfig

API_KEYS_ENV = "CHATSTREAM_API_KEYS"
"""Comma-separated API keys for the OpenAI endpoints, added to those given with ``--api-key``."""


class ModelOptionError(Exception):
    """An option that looked fine to the parser but failed when used (a missing model path, an absent device,
    options of another engine, a store URL that names no store, a data directory that cannot be written)."""


DTYPE_CHOICES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
LOG_LEVELS = ("debug", "info", "warning", "error")
SECURE_COOKIE_CHOICES = ("auto", "always", "never")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""As ``chatstream.server.http.DEFAULT_MAX_BODY_BYTES`` (not imported: the parser loads no server code)."""


def add_model_options(parser: argparse.ArgumentParser, default_log_level: str) -> None:
    """The model options of a command."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="model folder or .gguf file (default: embedded Gemma-3-270M)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: auto)")
    group.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N or mps (default: cuda if any)")
    group.add_argument("--num-gpus", type=_int_at_least(1), default=None, help="split the model over N GPUs")
    group.add_argument("--cache-dir", type=Path, default=None, help="where converted models are kept")
    group.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="compute threads of the engine (default: $CHATSTREAM_NUM_THREADS, else one per physical core)",
    )
    group.add_argument(
        "--no-fused-decoder",
        dest="fused_decoder",
        action="store_false",
        help="run transformers' own forward pass instead of the fused CPU decoder (for comparison or a model it fails)",
    )
    group.add_argument(
        "--max-prefill-tokens",
        type=_int_at_least(1),
        default=EngineConfig.max_prefill_tokens,
        help="prompt tokens prefilled per step beside the running streams; longer prompts go in chunks "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-decode-slowdown",
        type=_slowdown,
        default=EngineConfig.max_decode_slowdown,
        metavar="X",
        help="while streams decode, shrink the prefill chunk so that a step takes at most X times a step without "
        "one, more when more users wait for a first token than stream (0: always --max-prefill-tokens; default: "
        "%(default)s)",
    )
    group.add_argument(
        "--weight-quantization",
        choices=WEIGHT_QUANTIZATIONS,
        default=None,
        help="decode (w8a8: also prefill) with weights quantized at load time by the fused CPU decoder "
        "(default: the model's own)",
    )
    group.add_argument(
        "--cpu-kernels",
        choices=tuple(CPU_KERNELS),
        default="auto",
        help="the fused CPU decoder's norms, rotary embedding, MLP gate and (without AMX) attention in the compiled "
        "extension: "
        "auto: with w8a8 and for bfloat16 models where the CPU and a C++ compiler allow; on: always (an error where "
        "they cannot run); off: PyTorch's operators (default: %(default)s)",
    )
    group.add_argument("--mock", action="store_true", help="answer with canned text; no model is loaded")
    group.add_argument("--mock-type", choices=("round", "long", "echo"), default="round")
    group.add_argument("--mock-time-per-token", type=_float_at_least(0.0), default=0.02, metavar="SEC")
    group.add_argument("--mock-initial-wait", type=_float_at_least(0.0), default=0.0, metavar="SEC")
    group.add_argument("--log-level", choices=LOG_LEVELS, default=default_log_level)


CPU_KERNELS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""``--cpu-kernels`` → ``EngineConfig.cpu_kernels``."""

ENGINE_CHOICES = ("transformers", "vllm", "upstream", "mock")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Which engine generates, and the options of vLLM and of an upstream (docs/engines.md)."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default=None,
        help="transformers (default: ours, CPU-tuned), vllm (GPUs), upstream (an OpenAI-compatible server), mock",
    )
    group.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder (or HF id for vllm) for the prompt format (default: --model's)",
    )
    group.add_argument("--upstream", default=None, metavar="URL", help="the upstream's base URL, e.g. http://h:8000/v1")
    group.add_argument("--upstream-api", choices=("completions", "chat"), default="completions")
    group.add_argument("--upstream-model", default=None, metavar="NAME", help="the model field sent upstream")
    group.add_argument("--upstream-api-key-env", default=None, metavar="VAR", help="env variable with its API key")
    group.add_argument(
        "--upstream-timeout", type=_float_above(0.0), default=60.0, metavar="SEC", help="longest upstream silence"
    )
    group.add_argument(
        "--gpu-memory-utilization", type=_float_in_unit_interval, default=0.9, help="vllm: share of GPU memory"
    )
    group.add_argument(
        "--tensor-parallel-size", type=_int_at_least(1), default=None, help="vllm: GPUs (default: --num-gpus or 1)"
    )
    group.add_argument(
        "--kv-cache-memory-bytes", type=_int_at_least(1), default=None, help="vllm: KV cache size (CPU builds)"
    )
    group.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs / compilation (fast start)")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The generation options of a command."""
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=_int_at_least(1), default=256)
    group.add_argument("--context-len", type=_int_at_least(2), default=1024, help="tokens per sequence")
    group.add_argument("--temperature", type=_float_at_least(0.0), default=1.0)
    group.add_argument("--top-k", type=_int_at_least(0), default=50)
    group.add_argument("--top-p", type=_float_in_unit_interval, default=1.0)
    group.add_argument("--repetition-penalty", type=_float_at_least(0.0), default=None)
    group.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past EOS up to --max-new-tokens (benchmarks; the OpenAI API also takes ignore_eos)",
    )
    group.add_argument("--locale", choices=("en", "ja"), default=None, help="language of user-facing messages")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The server options of a command."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=_port, default=8000, help="0 picks a free port (printed when ready)")
    group.add_argument("--max-concurrency", type=_int_at_least(1), default=32, help="generations run at once")
    group.add_argument("--max-queue", type=_int_at_least(0), default=64, help="requests that may wait")
    group.add_argument(
        "--too-many-requests-as-http-error", action="store_true", help="reject over-capacity requests with 429"
    )
    group.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"API key for the OpenAI endpoints (repeatable; also ${API_KEYS_ENV})",
    )
    group.add_argument("--web-ui-title", default=None, help="title of the built-in chat page")
    group.add_argument("--drain-timeout", type=_float_at_least(0.0), default=30.0, metavar="SEC")
    group.add_argument(
        "--secure-cookies",
        nargs="?",
        choices=SECURE_COOKIE_CHOICES,
        const="always",
        default="auto",
        help="the session cookie's Secure flag: auto (default: when the request came over HTTPS, also through a "
        "trusted proxy), always (the flag alone means always), never",
    )
    _add_limit_options(group)


def _add_limit_options(group: Any) -> None:
    """Bounds on what requests may ask of the server, and how the waiting line is shared."""
    group.add_argument(
        "--max-body-bytes",
        type=_int_at_least(1),
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help="the largest request body accepted; longer ones get 413 (default: 1048576, 1 MiB)",
    )
    group.add_argument(
        "--no-fair-queue",
        dest="fair_queue",
        action="store_false",
        help="serve waiting requests first come, first served instead of fairly across users",
    )
    group.add_argument(
        "--max-running-per-user",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="a hard cap on one user's running generations (default: none; each user gets a fair share)",
    )


def add_conversation_options(parser: argparse.ArgumentParser) -> None:
    """Where ``serve`` keeps conversations and sessions, and for how long (docs/conversations.md)."""
    group = parser.add_argument_group("conversations")
    group.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="memory://, sqlite:///path.db or redis://host:6379/0 (default: a SQLite file in --data-dir)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the SQLite file and the session secret (default: $XDG_DATA_HOME/chatstream or ~/.local/share/chatstream)",
    )
    group.add_argument(
        "--session-secret",
        default=None,
        metavar="TEXT",
        help="signs session cookies (default: $CHATSTREAM_SESSION_SECRET, else a file in --data-dir made once)",
    )
    group.add_argument(
        "--max-conversation-age",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="delete conversations not updated for this long (e.g. 90d, 12h; never); default: memory 12h, else never",
    )
    group.add_argument(
        "--max-conversations-per-user", type=_int_at_least(1), default=None, metavar="N", help="keep the N newest"
    )


def _duration(text: str) -> str:
    from chatstream.sessions.urls import parse_duration

    try:
        parse_duration(text, "--max-conversation-age")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    """The scale-out options of ``serve``: a pool over local devices, or Ray Serve replicas (docs/scaling.md)."""
    group = parser.add_argument_group("scale out")
    group.add_argument(
        "--devices",
        type=_device_list,
        default=None,
        metavar="DEV,DEV",
        help="one model copy per device behind one endpoint (a pool), e.g. cuda:0,cuda:1; --max-concurrency is per "
        "device",
    )
    group.add_argument("--ray", action="store_true", help="serve on Ray Serve with conversation-sticky engine replicas")
    group.add_argument("--replicas", type=_int_at_least(1), default=1, help="engine replicas with --ray (default: 1)")
    group.add_argument(
        "--ray-address", default=None, help="a running Ray cluster: auto or HEAD:6379 (default: start a local Ray)"
    )
    group.add_argument(
        "--gpus-per-replica",
        type=_float_at_least(0.0),
        default=None,
        help="GPUs each replica reserves (default: 1 where this machine has CUDA, else 0)",
    )
    group.add_argument("--cpus-per-replica", type=_float_at_least(0.0), default=1.0, help="default: 1")
    group.add_argument("--min-replicas", type=_int_at_least(0), default=None, help="autoscaling lower bound")
    group.add_argument("--max-replicas", type=_int_at_least(1), default=None, help="autoscale up to N replicas")
    group.add_argument(
        "--target-ongoing-requests",
        type=_float_at_least(0.0),
        default=None,
        help="autoscaling target per replica (default: --max-concurrency)",
    )


def check_scale_options(args: argparse.Namespace) -> str | None:
    """The error message for scale-out options that do not fit together, else None."""
    if args.ray and args.devices:
        return "--devices and --ray do not combine (with Ray, each replica holds one model copy: use --replicas)"
    ray_only = ("min_replicas", "max_replicas", "target_ongoing_requests", "ray_address", "gpus_per_replica")
    given = [name for name in ray_only if getattr(args, name) is not None]
    if given and not args.ray:
        return f"--{given[0].replace('_', '-')} needs --ray"
    if args.min_replicas is not None and args.max_replicas is None:
        return "--min-replicas needs --max-replicas (autoscaling)"
    return None


def _device_list(text: str) -> list[str]:
    devices = [_device(part) for part in text.split(",") if part.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("--devices needs at least one device")
    return devices


def _device(text: str) -> str:
    from chatstream.models.devices import parse_device

    try:
        return str(parse_device(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (use cpu, cuda, cuda:N or mps)") from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not in 0..65535")
    return value


def _int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = "integer"
    return parse


def _slowdown(text: str) -> float:
    value = float(text)
    if not (value == 0.0 or value > 1.0):  # also rejects nan
        raise argparse.ArgumentTypeError(f"{value} is neither 0 (off) nor more than 1")
    return value


def _float_at_least(minimum: float) -> Any:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= minimum:  # also rejects nan
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = "number"
    return parse


def _float_above(minimum: float) -> Any:
    def parse(text: str) -> float:
        value = float(text)
        if not value > minimum:
            raise argparse.ArgumentTypeError(f"{value} is not more than {minimum}")
        return value

    parse.__name__ = "number"
    return parse


def _float_in_unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value
