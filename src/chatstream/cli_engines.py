"""``--engine`` of ``chatstream serve`` and ``chat``: a ChatStream on vLLM, or in front of an upstream server.

The transformers engine and the mock are built in ``cli.py`` as before; this module builds the two engines that
load no model into our own process: vLLM loads it itself (``--model`` is its folder, a ``.gguf`` converted once, or
a Hugging Face id), and an upstream has its own (``--model`` or ``--tokenizer`` only supplies the tokenizer that
renders our prompts).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatstream.cli_options import ModelOptionError

if TYPE_CHECKING:
    from chatstream.chat_stream import ChatStream
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "gemma-3-270m"
_UPSTREAM_ONLY = ("upstream_api_key_env", "upstream_model")
_VLLM_ONLY = ("tensor_parallel_size", "kv_cache_memory_bytes")


def engine_of(args: argparse.Namespace) -> str:
    """The chosen engine: ``--engine``, with ``--mock`` as the older spelling of ``--engine mock``.

    Raises ModelOptionError for options that belong to another engine (so that a typo does not pass unnoticed).
    """
    engine = args.engine or ("mock" if args.mock else "transformers")
    if args.mock and engine != "mock":
        raise ModelOptionError(f"--mock contradicts --engine {engine}")
    if engine == "upstream" and not args.upstream:
        raise ModelOptionError("--engine upstream needs --upstream URL (the base URL, e.g. http://host:8000/v1)")
    if engine != "upstream" and (args.upstream or any(getattr(args, name) for name in _UPSTREAM_ONLY)):
        raise ModelOptionError("--upstream and the other --upstream-* options need --engine upstream")
    if engine != "vllm" and (args.enforce_eager or any(getattr(args, name) for name in _VLLM_ONLY)):
        raise ModelOptionError("--tensor-parallel-size, --kv-cache-memory-bytes and --enforce-eager need --engine vllm")
    return engine


def upstream_chat_stream(args: argparse.Namespace, options: dict[str, Any]) -> ChatStream:
    """A ChatStream whose generations run on the upstream server ``--upstream``."""
    from chatstream.chat_stream import ChatStream
    from chatstream.engine.upstream_protocol import UpstreamConfig

    try:
        config = UpstreamConfig(
            args.upstream,
            model=args.upstream_model,
            api=args.upstream_api,
            api_key_env=args.upstream_api_key_env,
            read_timeout_sec=args.upstream_timeout,
            max_connections=max(256, int(options["num_of_concurrent_executions"])),
        )
    except ValueError as exc:
        raise ModelOptionError(str(exc)) from exc
    source = args.tokenizer or args.model
    tokenizer = _load_tokenizer(source, args.cache_dir) if source is not None else None
    if tokenizer is None and config.api.value == "completions":
        logger.warning(
            "--engine upstream without --model/--tokenizer: prompts use the plain User/Assistant format; give the "
            "upstream model's tokenizer (its chat template), or --upstream-api chat"
        )
    model_name = args.upstream_model or (model_id_for(source) if source is not None else "chatstream-upstream")
    return ChatStream(
        engine="upstream",
        engine_options=config,
        tokenizer=tokenizer,
        chat_prompt_clazz=prompt_class_for(source, tokenizer),
        model_name=model_name,
        **options,
    )


def vllm_chat_stream(args: argparse.Namespace, options: dict[str, Any]) -> ChatStream:
    """A ChatStream on vLLM's engine in this process, loading ``--model``."""
    from chatstream.chat_stream import ChatStream
    from chatstream.engine.vllm_config import VLLMConfig

    model = _vllm_model(args.model, args.cache_dir)
    try:
        config = VLLMConfig(
            dtype=args.dtype,
            max_model_len=args.context_len,
            max_num_seqs=int(options["num_of_concurrent_executions"]),
            tensor_parallel_size=args.tensor_parallel_size or args.num_gpus or 1,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            enforce_eager=args.enforce_eager,
            tokenizer=args.tokenizer,
        )
    except ValueError as exc:
        raise ModelOptionError(str(exc)) from exc
    tokenizer = _load_tokenizer(args.tokenizer or model, args.cache_dir)
    return ChatStream(
        engine="vllm",
        model=model,
        engine_options=config,
        tokenizer=tokenizer,
        chat_prompt_clazz=prompt_class_for(args.model or model, tokenizer),
        model_name=model_id_for(args.model) if args.model is None or Path(args.model).exists() else args.model,
        **options,
    )


def _vllm_model(source: str | None, cache_dir: Path | None) -> str:
    """The folder vLLM loads: ours as for every engine (embedded, folder, converted .gguf), else a Hugging Face id."""
    from chatstream.models import prepare_model_dir

    if source is not None and not Path(source).expanduser().exists() and source.count("/") == 1:
        return source  # "org/name": vLLM fetches it from the Hugging Face Hub
    try:
        return os.fspath(prepare_model_dir(source, cache_dir=cache_dir))
    except FileNotFoundError as exc:
        raise ModelOptionError(str(exc)) from exc


def _load_tokenizer(source: str, cache_dir: Path | None) -> Any:
    """The tokenizer of a model folder, a ``.gguf`` file (converted once) or a Hugging Face id."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.exists():
        from chatstream.models import prepare_model_dir

        try:
            source = os.fspath(prepare_model_dir(source, cache_dir=cache_dir))
        except FileNotFoundError as exc:
            raise ModelOptionError(str(exc)) from exc
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelOptionError(f"cannot load a tokenizer from {source!r}: {exc}") from exc


def prompt_class_for(model_source: str | None, tokenizer: Any) -> type[AbstractChatPrompt]:
    """The prompt preset for a model: the plain User/Assistant transcript for the embedded (base) model and for
    tokenizers without a chat template; ``ChatTemplatePrompt`` when the tokenizer has one."""
    from chatstream.prompts.chat_template import ChatTemplatePrompt

    if model_source is not None and getattr(tokenizer, "chat_template", None):
        return ChatTemplatePrompt
    return plain_preset()


def model_id_for(model_source: str | None) -> str:
    """The model id reported by /v1/models: the embedded model's name, else the folder or file name."""
    if model_source is None:
        return EMBEDDED_MODEL_ID
    path = Path(model_source)
    return path.stem if path.suffix.lower() == ".gguf" else path.resolve().name


def plain_preset() -> type[AbstractChatPrompt]:
    from chatstream.prompts.presets import ChatPromptPlainUserAssistant

    return ChatPromptPlainUserAssistant
