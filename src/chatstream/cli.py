"""The ``chatstream`` command: ``serve`` (HTTP server), ``chat`` (console chat) and ``convert`` (cache warm-up).

Every command loads the model the same way (:func:`chatstream.models.load_model`): no ``--model`` means the embedded
Gemma-3-270M, a folder is a Hugging Face model, a ``.gguf`` file is converted once and cached. ``--mock`` answers
with canned text and loads nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from chatstream.chat_stream import ChatStream
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

API_KEYS_ENV = "CHATSTREAM_API_KEYS"
"""Comma-separated API keys for the OpenAI endpoints, added to those given with ``--api-key``."""
EMBEDDED_MODEL_ID = "gemma-3-270m"
DTYPE_CHOICES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
LOG_LEVELS = ("debug", "info", "warning", "error")
_EXIT_WORDS = frozenset({"/exit", "/quit", "/bye"})
_CONSOLE_DRAIN_SEC = 1.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage errors, as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return int(args.run(args))
    except ModelOptionError as exc:
        args.subparser.error(str(exc))  # exits with status 2
        raise  # not reached


class ModelOptionError(Exception):
    """A model option that looked fine to the parser but failed at load time (missing path, absent device)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``chatstream`` command (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="chatstream", description="Streaming chat service for causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,chat,convert}")
    serve = commands.add_parser("serve", help="run the HTTP server (native API, OpenAI API, web UI)")
    _add_model_options(serve, default_log_level="info")
    _add_generation_options(serve)
    _add_server_options(serve)
    serve.set_defaults(run=run_serve, subparser=serve)
    chat = commands.add_parser("chat", help="chat with the model in this terminal")
    _add_model_options(chat, default_log_level="warning")
    _add_generation_options(chat)
    chat.set_defaults(run=run_chat, subparser=chat)
    convert = commands.add_parser("convert", help="convert and cache the model (GGUF/embedded), print its folder")
    convert.add_argument("--model", default=None, help="a .gguf file or model folder (default: the embedded model)")
    convert.add_argument("--cache-dir", type=Path, default=None, help="where converted models are kept")
    convert.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    convert.set_defaults(run=run_convert, subparser=convert)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, default_log_level: str) -> None:
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
    group.add_argument("--mock", action="store_true", help="answer with canned text; no model is loaded")
    group.add_argument("--mock-type", choices=("round", "long", "echo"), default="round")
    group.add_argument("--mock-time-per-token", type=_float_at_least(0.0), default=0.02, metavar="SEC")
    group.add_argument("--mock-initial-wait", type=_float_at_least(0.0), default=0.0, metavar="SEC")
    group.add_argument("--log-level", choices=LOG_LEVELS, default=default_log_level)


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
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


def _add_server_options(parser: argparse.ArgumentParser) -> None:
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
        action="store_true",
        help="mark the session cookie Secure (only when clients reach the server over HTTPS, e.g. behind a proxy)",
    )


# ----- commands -----


def run_serve(args: argparse.Namespace) -> int:
    """``chatstream serve``: load the model, build the app and run uvicorn until interrupted."""
    import uvicorn

    from chatstream.config import ServerConfig
    from chatstream.server.app import create_app

    server = ServerConfig(
        host=args.host, port=args.port, api_keys=api_keys_from(args), drain_timeout_sec=args.drain_timeout
    )
    chat_stream = build_chat_stream(
        args,
        max_concurrency=args.max_concurrency,
        max_queue_size=args.max_queue,
        reject_as_http_error=args.too_many_requests_as_http_error,
    )
    web_ui_params = {"title": args.web_ui_title} if args.web_ui_title else None
    # serve speaks plain HTTP: a Secure cookie would be dropped by browsers that reach it by a LAN address
    middleware_opts = {"session": {"secure": bool(args.secure_cookies)}}
    app = create_app(
        chat_stream,
        web_ui_params=web_ui_params,
        api_keys=server.api_keys,
        drain_timeout=server.drain_timeout_sec,
        middleware_opts=middleware_opts,
    )
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=args.log_level,
        lifespan="on",
        # uvicorn waits for open streams before the lifespan shutdown runs; bound that wait by the drain timeout
        timeout_graceful_shutdown=max(1, int(server.drain_timeout_sec)),
    )
    _run_uvicorn(config)
    return 0


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``chatstream chat``: a console chat; each answer streams as it is generated. EOF, Ctrl+C or /exit quit."""
    chat_stream = build_chat_stream(args, max_concurrency=1, max_queue_size=0, reject_as_http_error=False)
    console = _Console(stdin or sys.stdin, stdout or sys.stdout)
    console.say(f"Chatting with {chat_stream.model_name}. Ctrl+D, Ctrl+C or /exit quits.")
    with asyncio.Runner() as runner:
        runner.run(chat_stream.startup())
        try:
            while (text := console.ask("You: ")) is not None:
                if text.strip() in _EXIT_WORDS:
                    break
                if text.strip():
                    runner.run(stream_answer(chat_stream, text, console))
        except KeyboardInterrupt:
            console.say("")
        finally:
            runner.run(chat_stream.shutdown(_CONSOLE_DRAIN_SEC))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """``chatstream convert``: make sure the model is converted and cached; print the checkpoint folder."""
    from chatstream.models import prepare_model_dir

    try:
        model_dir = prepare_model_dir(args.model, cache_dir=args.cache_dir, progress=True)
    except FileNotFoundError as exc:
        raise ModelOptionError(str(exc)) from exc
    print(model_dir, flush=True)
    return 0


async def stream_answer(chat_stream: ChatStream, text: str, console: _Console) -> None:
    """Print one answer as it streams: the label, then each new piece of text, then a newline."""
    console.write("Assistant: ")
    async for _answer, new_text, pos in chat_stream.handle_console_input(text):
        console.write(new_text)
        if pos == "end":
            console.write("\n")


# ----- building the ChatStream -----


def build_chat_stream(
    args: argparse.Namespace, *, max_concurrency: int, max_queue_size: int, reject_as_http_error: bool
) -> ChatStream:
    """A ChatStream for the parsed options: the mock engine, or the loaded model with its prompt preset."""
    from chatstream.chat_stream import ChatStream

    common: dict[str, Any] = {
        "num_of_concurrent_executions": max_concurrency,
        "max_queue_size": max_queue_size,
        "too_many_request_as_http_error": reject_as_http_error,
        "max_new_tokens": args.max_new_tokens,
        "context_len": args.context_len,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "ignore_eos": args.ignore_eos,
        "locale": args.locale,
    }
    if args.mock:
        mock_params = {
            "type": args.mock_type,
            "initial_wait_sec": args.mock_initial_wait,
            "time_per_token_sec": args.mock_time_per_token,
        }
        return ChatStream(use_mock_response=True, mock_params=mock_params, chat_prompt_clazz=_plain_preset(), **common)
    from chatstream.engine.cpu_runtime import NUM_THREADS_ENV
    from chatstream.models import load_model

    if args.threads is not None:
        os.environ[NUM_THREADS_ENV] = str(args.threads)  # read by the engine thread when it starts
    try:
        model, tokenizer = load_model(
            args.model, dtype=args.dtype, device=args.device, num_gpus=args.num_gpus, cache_dir=args.cache_dir
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ModelOptionError(str(exc)) from exc
    return ChatStream(
        model=model,
        tokenizer=tokenizer,
        device=model.device,
        num_gpus=args.num_gpus,
        chat_prompt_clazz=prompt_class_for(args.model, tokenizer),
        model_name=model_id_for(args.model),
        fused_decoder=args.fused_decoder,
        **common,
    )


def prompt_class_for(model_source: str | None, tokenizer: Any) -> type[AbstractChatPrompt]:
    """The prompt preset for a model: the plain User/Assistant transcript for the embedded (base) model and for
    tokenizers without a chat template; ``ChatTemplatePrompt`` when the tokenizer has one."""
    from chatstream.prompts.chat_template import ChatTemplatePrompt

    if model_source is not None and getattr(tokenizer, "chat_template", None):
        return ChatTemplatePrompt
    return _plain_preset()


def model_id_for(model_source: str | None) -> str:
    """The model id reported by /v1/models: the embedded model's name, else the folder or file name."""
    if model_source is None:
        return EMBEDDED_MODEL_ID
    path = Path(model_source)
    return path.stem if path.suffix.lower() == ".gguf" else path.resolve().name


def api_keys_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """``--api-key`` values plus those in ``$CHATSTREAM_API_KEYS`` (comma-separated), without blanks or repeats."""
    env_value = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    keys = [*args.api_key, *env_value.split(",")]
    return tuple(dict.fromkeys(key.strip() for key in keys if key.strip()))


def _plain_preset() -> type[AbstractChatPrompt]:
    from chatstream.prompts.presets import ChatPromptPlainUserAssistant

    return ChatPromptPlainUserAssistant


# ----- console and server helpers -----


class _Console:
    """Line input and streamed output for the console chat (stdin/stdout, or files in tests)."""

    def __init__(self, stdin: TextIO, stdout: TextIO) -> None:
        self.stdin = stdin
        self.stdout = stdout

    def ask(self, prompt: str) -> str | None:
        """One line from the user (None at end of input)."""
        self.write(prompt)
        line = self.stdin.readline()
        if not line:
            self.write("\n")
            return None
        return line.rstrip("\r\n")

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def say(self, text: str) -> None:
        self.write(text + "\n")


def _run_uvicorn(config: Any) -> None:
    """Run uvicorn until interrupted, printing the URL on stdout once it listens (the real port with --port 0)."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(f"ChatStream is ready: {_listening_url(self)}", flush=True)

    try:
        AnnouncingServer(config).run()
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully; it re-raises the interrupt for the caller to see
        logger.info("Stopped")


def _listening_url(server: Any) -> str:
    host, port = server.config.host, server.config.port
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            port = sock.getsockname()[1]
            break
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ----- argument types (argparse turns their ValueErrors into "argument --x: invalid ... value" and exit 2) -----


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


def _float_at_least(minimum: float) -> Any:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= minimum:  # also rejects nan
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = "number"
    return parse


def _float_in_unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value
