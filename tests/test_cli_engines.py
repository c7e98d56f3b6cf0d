"""``--engine`` and the options of vLLM and of an upstream: what each builds, and options of the wrong engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatstream.cli import build_chat_stream, build_parser
from chatstream.cli_engines import engine_of
from chatstream.cli_options import ModelOptionError
from chatstream.engine.upstream_engine import OpenAIUpstreamEngine
from chatstream.engine.upstream_protocol import UpstreamAPI
from chatstream.engine.vllm_engine import VLLMEngine
from chatstream.prompts import ChatPromptPlainUserAssistant, ChatTemplatePrompt


def parse(line: str) -> object:
    return build_parser().parse_args(line.split())


def build(line: str) -> object:
    return build_chat_stream(parse(line), max_concurrency=4, max_queue_size=2, reject_as_http_error=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("serve --engine upstream", "needs --upstream URL"),
        ("serve --upstream http://h/v1", "need --engine upstream"),
        ("serve --engine vllm --upstream-model m", "need --engine upstream"),
        ("serve --mock --engine vllm", "--mock contradicts --engine vllm"),
        ("serve --tensor-parallel-size 2", "need --engine vllm"),
        ("chat --engine upstream --enforce-eager --upstream http://h/v1", "need --engine vllm"),
    ],
)
def test_options_of_another_engine_are_refused(line: str, message: str) -> None:
    with pytest.raises(ModelOptionError, match=message):
        engine_of(parse(line))


def test_engine_names() -> None:
    assert engine_of(parse("serve")) == "transformers" and engine_of(parse("serve --mock")) == "mock"
    assert engine_of(parse("serve --engine mock")) == "mock"


def test_upstream_takes_the_tokenizer_of_model_for_its_prompts(tiny_model_dir: Path) -> None:
    cs = build(
        f"serve --engine upstream --upstream http://gpu-box:8000/v1 --upstream-api chat --upstream-timeout 9 "
        f"--upstream-api-key-env KEY --model {tiny_model_dir}"
    )
    engine = cs.engine
    assert isinstance(engine, OpenAIUpstreamEngine)
    assert (engine.config.base_url, engine.config.api, engine.config.read_timeout_sec) == (
        "http://gpu-box:8000/v1",
        UpstreamAPI.CHAT,
        9.0,
    )
    assert engine.config.api_key_env == "KEY" and cs.tokenizer is not None
    assert cs.chat_prompt_clazz is ChatTemplatePrompt and cs.model_name == tiny_model_dir.name
    named = build(f"serve --engine upstream --upstream http://h/v1 --upstream-model big --tokenizer {tiny_model_dir}")
    assert named.model_name == "big" and named.tokenizer is not None
    bare = build("serve --engine upstream --upstream http://h/v1")
    assert bare.tokenizer is None and bare.chat_prompt_clazz is ChatPromptPlainUserAssistant


def test_vllm_maps_the_options_to_its_config(tiny_model_dir: Path) -> None:
    cs = build(
        f"serve --engine vllm --model {tiny_model_dir} --dtype fp32 --context-len 512 --tensor-parallel-size 2 "
        "--gpu-memory-utilization 0.5 --kv-cache-memory-bytes 1000000 --enforce-eager"
    )
    engine = cs.engine
    assert isinstance(engine, VLLMEngine) and engine.model == str(tiny_model_dir) and not engine.is_running
    config = engine.config
    assert (config.dtype, config.max_model_len, config.max_num_seqs, config.tensor_parallel_size) == (
        "float32",
        512,
        4,
        2,
    )
    assert (config.gpu_memory_utilization, config.kv_cache_memory_bytes, config.enforce_eager) == (0.5, 1000000, True)
    assert cs.tokenizer is not None and cs.model_name == tiny_model_dir.name


def test_vllm_refuses_a_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelOptionError, match="does not exist"):
        build(f"serve --engine vllm --model {tmp_path / 'absent' / 'folder' / 'x'}")
