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
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from chatstream.cli_engines import (
    engine_of,
    model_id_for,
    plain_preset,
    prompt_class_for,
    upstream_chat_stream,
    vllm_chat_stream,
)
from chatstream.cli_options import (
    API_KEYS_ENV,
    CPU_KERNELS,
    DEFAULT_MAX_BODY_BYTES,
    LOG_LEVELS,
    ModelOptionError,
    add_conversation_options,
    add_engine_options,
    add_generation_options,
    add_model_options,
    add_scale_options,
    add_server_options,
    check_scale_options,
)
from chatstream.cli_server import run_uvicorn

if TYPE_CHECKING:
    from chatstream.chat_stream import ChatStream
    from chatstream.cli_data import ServeData
    from chatstream.ray import EngineSpec, FrontSettings, ReplicaSettings

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``chatstream`` command (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="chatstream", description="Streaming chat service for causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,chat,convert}")
    serve = commands.add_parser("serve", help="run the HTTP server (native API, OpenAI API, web UI)")
    add_model_options(serve, default_log_level="info")
    add_engine_options(serve)
    add_generation_options(serve)
    add_server_options(serve)
    add_conversation_options(serve)
    add_scale_options(serve)
    serve.set_defaults(run=run_serve, subparser=serve)
    chat = commands.add_parser("chat", help="chat with the model in this terminal")
    add_model_options(chat, default_log_level="warning")
    add_engine_options(chat)
    add_generation_options(chat)
    chat.set_defaults(run=run_chat, subparser=chat)
    convert = commands.add_parser("convert", help="convert and cache the model (GGUF/embedded), print its folder")
    convert.add_argument("--model", default=None, help="a .gguf file or model folder (default: the embedded model)")
    convert.add_argument("--cache-dir", type=Path, default=None, help="where converted models are kept")
    convert.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    convert.set_defaults(run=run_convert, subparser=convert)
    return parser


# ----- commands -----


def run_serve(args: argparse.Namespace) -> int:
    """``chatstream serve``: load the model, build the app and run uvicorn until interrupted."""
    import uvicorn

    if args.ray or check_scale_options(args):
        return run_serve_ray(args)
    from chatstream.config import ServerConfig

    server = ServerConfig(
        host=args.host, port=args.port, api_keys=api_keys_from(args), drain_timeout_sec=args.drain_timeout
    )
    data = serve_data(args)
    chat_stream = build_chat_stream(
        args,
        max_concurrency=args.max_concurrency,
        max_queue_size=args.max_queue,
        reject_as_http_error=args.too_many_requests_as_http_error,
        store_url=data.store_url,
    )
    print(
        f"Conversations are kept in {chat_stream.conversations.describe()}; session secret: {data.secret_source}",
        flush=True,
    )
    config = uvicorn.Config(
        _serve_app(args, chat_stream, server, data),
        host=server.host,
        port=server.port,
        log_level=args.log_level,
        lifespan="on",
        # uvicorn waits for open streams before the lifespan shutdown runs; bound that wait by the drain timeout
        timeout_graceful_shutdown=max(1, int(server.drain_timeout_sec)),
    )
    run_uvicorn(config)
    return 0


def run_serve_ray(args: argparse.Namespace) -> int:
    """``chatstream serve --ray``: a front and ``--replicas`` engine replicas on Ray Serve, until interrupted."""
    problem = check_scale_options(args)
    if problem is not None:
        raise ModelOptionError(problem)
    try:
        from chatstream.ray.launch import serve_until_interrupted
    except ImportError as exc:
        raise ModelOptionError(f"--ray needs the ray extra (pip install 'chatstream[ray]'): {exc}") from exc
    spec, replicas, front = ray_settings(args)
    serve_until_interrupted(spec, replicas, front, address=args.ray_address, host=args.host, port=args.port)
    return 0


def ray_settings(args: argparse.Namespace) -> tuple[EngineSpec, ReplicaSettings, FrontSettings]:
    """What ``serve --ray`` deploys (see chatstream.cli_ray): the replicas' engine, placement and scaling; the front
    with ``serve``'s ChatStream options, store and session secret."""
    from chatstream.cli_ray import engine_settings, front_settings

    data = serve_data(args)
    options = _chat_stream_options(args, args.max_concurrency, args.max_queue, True)
    options.update(_conversation_options(args, data.store_url))
    spec, replicas = engine_settings(args, None if args.mock else str(_prepare_model_dir(args)))
    options["chat_prompt_clazz"] = plain_preset() if args.mock else prompt_class_for(args.model, spec.load_tokenizer())
    options["model_name"] = "chatstream-mock" if args.mock else model_id_for(args.model)
    return spec, replicas, front_settings(args, options, api_keys_from(args), data)


def serve_data(args: argparse.Namespace) -> ServeData:
    """The store URL and session secret of ``serve`` (see chatstream.cli_data)."""
    from chatstream.cli_data import default_data_dir, resolve_serve_data

    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    try:
        return resolve_serve_data(args.store, data_dir, args.session_secret)
    except OSError as exc:
        raise ModelOptionError(f"--data-dir {data_dir}: {exc}") from exc


def _serve_app(args: argparse.Namespace, chat_stream: ChatStream, server: Any, data: ServeData) -> Any:
    from chatstream.server.app import create_app

    web_ui_params = {"title": args.web_ui_title} if args.web_ui_title else None
    session: dict[str, Any] = {"secure": {"auto": "auto", "always": True, "never": False}[args.secure_cookies]}
    if data.session_secret is not None:
        session["secret_key"] = data.session_secret
    return create_app(
        chat_stream,
        web_ui_params=web_ui_params,
        api_keys=server.api_keys,
        drain_timeout=server.drain_timeout_sec,
        middleware_opts={"session": session},
    )


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``chatstream chat``: a console chat; each answer streams as it is generated. EOF, Ctrl+C or /exit quit."""
    chat_stream = build_chat_stream(args, max_concurrency=1, max_queue_size=0, reject_as_http_error=False)
    _let_ctrl_c_quit()
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


def _let_ctrl_c_quit() -> None:
    """Ctrl+C quits the chat also where the process started with SIGINT ignored (a parent or a non-interactive shell
    that ignores it passes that on, and Python then installs no KeyboardInterrupt handler)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_convert(args: argparse.Namespace) -> int:
    """``chatstream convert``: make sure the model is converted and cached; print the checkpoint folder."""
    print(_prepare_model_dir(args), flush=True)
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
    args: argparse.Namespace,
    *,
    max_concurrency: int,
    max_queue_size: int,
    reject_as_http_error: bool,
    store_url: str | None = None,
) -> ChatStream:
    """A ChatStream for the parsed options: the mock engine, vLLM, an upstream, or the loaded model with its prompt
    preset; with
    ``store_url``, its conversations there (and the retention options of ``serve``)."""
    from chatstream.chat_stream import ChatStream

    common = _chat_stream_options(args, max_concurrency, max_queue_size, reject_as_http_error)
    if store_url is not None:
        common.update(_conversation_options(args, store_url))
    engine = engine_of(args)
    if engine == "upstream":
        return upstream_chat_stream(args, common)
    if engine == "vllm":
        return vllm_chat_stream(args, common)
    if engine == "mock":
        mock_params = {
            "type": args.mock_type,
            "initial_wait_sec": args.mock_initial_wait,
            "time_per_token_sec": args.mock_time_per_token,
        }
        return ChatStream(use_mock_response=True, mock_params=mock_params, chat_prompt_clazz=plain_preset(), **common)
    model, tokenizer = _load_model(args)
    return ChatStream(
        model=model,
        tokenizer=tokenizer,
        device=model.device,
        num_gpus=args.num_gpus,
        chat_prompt_clazz=prompt_class_for(args.model, tokenizer),
        model_name=model_id_for(args.model),
        fused_decoder=args.fused_decoder,
        max_prefill_tokens=args.max_prefill_tokens,
        max_decode_slowdown=args.max_decode_slowdown or None,
        weight_quantization=args.weight_quantization,
        cpu_kernels=CPU_KERNELS[args.cpu_kernels],
        devices=getattr(args, "devices", None),
        **common,
    )


def _prepare_model_dir(args: argparse.Namespace) -> Path:
    from chatstream.models import prepare_model_dir

    try:
        return Path(prepare_model_dir(args.model, cache_dir=args.cache_dir, progress=True))
    except FileNotFoundError as exc:
        raise ModelOptionError(str(exc)) from exc


def _chat_stream_options(
    args: argparse.Namespace, max_concurrency: int, max_queue_size: int, reject_as_http_error: bool
) -> dict[str, Any]:
    return {
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
        # server options (``serve`` only)
        "fair_queue": getattr(args, "fair_queue", True),
        "max_running_per_user": getattr(args, "max_running_per_user", None),
        "max_body_bytes": getattr(args, "max_body_bytes", DEFAULT_MAX_BODY_BYTES),
    }


def _conversation_options(args: argparse.Namespace, store_url: str) -> dict[str, Any]:
    from chatstream.sessions.urls import open_store

    try:
        open_store(store_url)  # no I/O: only checks the URL, so that a bad one is a usage error (exit 2)
    except ValueError as exc:
        raise ModelOptionError(f"--store: {exc}") from exc
    return {
        "store": store_url,
        "conversation_max_age": args.max_conversation_age,
        "max_conversations_per_user": args.max_conversations_per_user,
    }


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from chatstream.engine.cpu.runtime import NUM_THREADS_ENV
    from chatstream.models import load_model

    if args.threads is not None:
        os.environ[NUM_THREADS_ENV] = str(args.threads)  # read by the engine thread when it starts
    device = args.devices[0] if getattr(args, "devices", None) else args.device  # a pool copies it to the others
    try:
        return load_model(args.model, dtype=args.dtype, device=device, num_gpus=args.num_gpus, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelOptionError(str(exc)) from exc


def api_keys_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """``--api-key`` values plus those in ``$CHATSTREAM_API_KEYS`` (comma-separated), without blanks or repeats."""
    env_value = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    keys = [*args.api_key, *env_value.split(",")]
    return tuple(dict.fromkeys(key.strip() for key in keys if key.strip()))


# ----- console and logging helpers -----


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


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
