"""How the harness starts each server and prepares the shared model folder (nothing is started here)."""

from pathlib import Path

import pytest
from bench.run_all import build_config, parse_args
from bench.servers import (
    GEMMA_TEMPLATE,
    LaunchOptions,
    ServerSpec,
    build_command,
    has_chat_template,
    prepare_model_dir,
)


def _options(tmp_path: Path, **changes) -> LaunchOptions:
    cache = tmp_path / "cache"
    for kind in ("vllm", "original"):
        (cache / f"{kind}-venv").mkdir(parents=True, exist_ok=True)
        (cache / f"{kind}-venv" / ".ready").touch()
    base = {
        "model_dir": tmp_path / "model",
        "max_concurrency": 32,
        "max_queue": 1024,
        "max_new_tokens": 128,
        "ignore_eos": True,
        "cache_dir": cache,
    }
    base.update(changes)
    return LaunchOptions(**base)


def test_vllm_command_follows_the_issue(tmp_path):
    argv, env = build_command(ServerSpec("vllm", "bf16", ("openai",)), _options(tmp_path), 8123)
    assert argv[0].endswith("vllm-venv/bin/python")
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--dtype bfloat16" in joined and "--max-model-len 2048" in joined and "--enable-prefix-caching" in joined
    assert "--port 8123" in joined and "--host 127.0.0.1" in joined
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    fp32, _ = build_command(ServerSpec("vllm", "fp32", ("openai",)), _options(tmp_path), 8123)
    assert "float32" in fp32


def test_vllm_command_does_not_depend_on_answer_length(tmp_path):
    spec = ServerSpec("vllm", "bf16", ("openai",))
    short = build_command(spec, _options(tmp_path, max_new_tokens=150, ignore_eos=False), 0)
    assert short == build_command(spec, _options(tmp_path), 0)


def test_original_command_carries_its_server_side_settings(tmp_path):
    spec = ServerSpec("original", "fp32", ("native",))
    argv, env = build_command(spec, _options(tmp_path), 9000)
    assert argv[1].endswith("bench/original_server.py")
    assert "--ignore-eos" in argv and argv[argv.index("--max-new-tokens") + 1] == "128"
    assert argv[argv.index("--concurrency") + 1] == "32"
    natural, _ = build_command(spec, _options(tmp_path, ignore_eos=False, max_new_tokens=150), 9000)
    assert "--ignore-eos" not in natural and natural[natural.index("--max-new-tokens") + 1] == "150"
    assert env == {}


def test_ours_command_is_greedy_and_mock_loads_no_model(tmp_path):
    argv, env = build_command(ServerSpec("ours", "fp32", ("openai", "native")), _options(tmp_path), 9001)
    assert argv[1:4] == ["-m", "chatstream", "serve"]
    assert argv[argv.index("--temperature") + 1] == "0"
    assert argv[argv.index("--dtype") + 1] == "fp32"
    assert env["PYTHONPATH"].endswith("src")
    mock, _ = build_command(ServerSpec("ours", "bf16", ("openai",)), _options(tmp_path, mock=True), 9001)
    assert "--mock" in mock and "--model" not in mock


def test_peer_without_its_venv_is_reported(tmp_path):
    options = _options(tmp_path, cache_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"setup_peers\.sh vllm"):
        build_command(ServerSpec("vllm", "bf16", ("openai",)), options, 1)


def test_server_spec_rejects_unknown_values():
    with pytest.raises(ValueError, match="'tgi'"):
        ServerSpec("tgi", "bf16", ("openai",))
    with pytest.raises(ValueError, match="'fp16'"):
        ServerSpec("ours", "fp16", ("openai",))


def test_prepare_model_dir_links_the_weights_and_adds_the_template(tmp_path):
    source = tmp_path / "converted"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "tokenizer_config.json").write_text('{"bos_token": "<bos>"}')
    assert not has_chat_template(source)
    target = prepare_model_dir(source, tmp_path / "cache")
    assert target != source and has_chat_template(target)
    assert (target / "model.safetensors").is_symlink()
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert (target / "chat_template.jinja").read_text() == GEMMA_TEMPLATE.read_text()
    assert prepare_model_dir(source, tmp_path / "cache") == target  # idempotent
    assert prepare_model_dir(target, tmp_path / "cache") == target.resolve()  # has a template: used as is


def test_quick_preset_is_small():
    config = build_config(parse_args(["--quick"]))
    assert config.concurrencies == (1, 4) and config.rounds == 1 and config.max_tokens == 16
    full = build_config(parse_args([]))
    assert full.concurrencies == (1, 8, 32) and full.max_tokens == 128 and full.rounds == 3
    assert (full.mt_conversations, full.mt_turns, full.mt_max_tokens, full.health_chats) == (8, 10, 150, 32)
