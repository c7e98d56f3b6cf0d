"""Tests for chatstream.models (dtype/device choice, placement, conversion cache, loading) and LoadTime."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import chatstream
from chatstream import models
from chatstream.models import (
    CONVERSION_MARKER,
    conversion,
    cpu_supports_bf16,
    default_dtype,
    devices,
    load_model,
    loadtime,
    models_cache_dir,
    parse_device,
    parse_dtype,
    placement_kwargs,
    prepare_model_dir,
    resolve_device,
)
from chatstream.models.loadtime import LoadTime

GIB = 1024**3


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Pretend this machine has CUDA GPUs (count, bf16 support and memory adjustable through the namespace)."""
    state = SimpleNamespace(count=4, bf16=True, total_memory=80 * GIB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state.count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state.bf16)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=state.total_memory)
    )
    return state


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----- dtype -----


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        (" float32 ", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_parse_dtype_accepts_names_and_dtypes(name: str | torch.dtype, expected: torch.dtype) -> None:
    assert parse_dtype(name, "cpu") is expected


@pytest.mark.parametrize("bad", ["int8", "fp8", "", "bf 16", torch.int8, torch.float64, 16])
def test_parse_dtype_rejects_others_naming_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match="dtype") as info:
        parse_dtype(bad, "cpu")  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("auto", ["auto", "AUTO", None])
def test_auto_dtype_follows_the_cpu_flags(auto: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert parse_dtype(auto, "cpu") is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert parse_dtype(auto, "cpu") is torch.float32


def test_default_dtype_on_cuda_depends_on_bf16_support(fake_cuda: SimpleNamespace) -> None:
    assert default_dtype("cuda") is torch.bfloat16
    fake_cuda.bf16 = False
    assert default_dtype("cuda:1") is torch.float16


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu sse2 avx2 amx_tile amx_bf16 amx_int8", True),
        ("fpu sse2 avx2 avx512f avx512_vnni", False),
    ],
)
def test_cpu_supports_bf16_reads_the_flags_line(flags: str, expected: bool, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU avx512_bf16\nflags\t\t: {flags}\n\n")
    assert cpu_supports_bf16(cpuinfo) is expected


def test_cpu_supports_bf16_is_false_without_cpuinfo(tmp_path: Path) -> None:
    assert cpu_supports_bf16(tmp_path / "missing") is False


# ----- device -----


def test_resolve_device_none_prefers_cuda(fake_cuda: SimpleNamespace) -> None:
    assert resolve_device(None) == torch.device("cuda")


def test_resolve_device_none_falls_back_to_cpu(no_cuda: None) -> None:
    assert resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("value", ["cpu", "CPU", torch.device("cpu")])
def test_resolve_device_cpu(value: str | torch.device) -> None:
    assert resolve_device(value) == torch.device("cpu")


def test_resolve_device_cuda_index(fake_cuda: SimpleNamespace) -> None:
    fake_cuda.count = 2
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="'cuda:2'"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", "", "meta"])
def test_resolve_device_rejects_unknown_devices(bad: str) -> None:
    with pytest.raises(ValueError, match="device"):
        resolve_device(bad)


def test_resolve_device_rejects_cuda_without_cuda(no_cuda: None) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_parse_device_checks_the_spelling_only(no_cuda: None) -> None:
    assert parse_device(" CUDA:1 ") == torch.device("cuda", 1)  # no CUDA here: only the spelling counts
    assert parse_device("mps") == torch.device("mps")
    assert parse_device(torch.device("meta")) == torch.device("meta")  # a torch.device is taken as it is
    for bad in ("tpu", "cuda:x", "", "cpu 0"):
        with pytest.raises(ValueError, match="device"):
            parse_device(bad)


def test_importing_chatstream_does_not_import_torch() -> None:
    code = "import sys, chatstream; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"


# ----- placement over GPUs -----


def test_placement_on_cpu_ignores_num_gpus_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="chatstream.models"):
        assert placement_kwargs(torch.device("cpu"), 4) == {}
    assert "num_gpus=4 ignored" in caplog.text


def test_placement_on_one_gpu_maps_everything_there(fake_cuda: SimpleNamespace) -> None:
    assert placement_kwargs(torch.device("cuda", 1), None) == {"device_map": "cuda:1"}
    assert placement_kwargs(torch.device("cuda"), 1) == {"device_map": "cuda"}


def test_placement_over_gpus_uses_auto_map_and_a_budget_per_gpu(fake_cuda: SimpleNamespace) -> None:
    kwargs = placement_kwargs(torch.device("cuda"), 3)
    assert kwargs["device_map"] == "auto"
    budget = int(80 * GIB * models.GPU_MEMORY_FRACTION)
    assert kwargs["max_memory"] == {0: budget, 1: budget, 2: budget}


def test_placement_over_gpus_starts_at_the_given_index(fake_cuda: SimpleNamespace) -> None:
    assert sorted(placement_kwargs(torch.device("cuda", 2), 2)["max_memory"]) == [2, 3]
    with pytest.raises(ValueError, match="num_gpus=3"):
        placement_kwargs(torch.device("cuda", 2), 3)


@pytest.mark.parametrize("bad", [0, -1])
def test_placement_rejects_non_positive_num_gpus(bad: int) -> None:
    with pytest.raises(ValueError, match=f"num_gpus={bad}"):
        placement_kwargs(torch.device("cpu"), bad)


# ----- sources and the conversion cache -----


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        prepare_model_dir(str(missing))
    assert str(missing) in str(info.value)


def test_hub_id_is_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="google/gemma-3-270m"):
        load_model("google/gemma-3-270m", device="cpu", progress=False)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        prepare_model_dir(tmp_path)


def test_other_files_are_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=r"neither a model directory nor a \.gguf file"):
        prepare_model_dir(weights)


def test_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert models_cache_dir() == tmp_path / "env"
    assert models_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(models.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models_cache_dir() == tmp_path / "xdg" / "chatstream" / "models"


class FakeConverter:
    """Stands in for the slow GGUF de-quantization: writes a small file, counts calls, can fail."""

    def __init__(self) -> None:
        self.calls: list[Path] = []
        self.fail = False

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("conversion interrupted")


@pytest.fixture
def fake_converter(monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    converter = FakeConverter()
    monkeypatch.setattr(conversion, "_convert_file", converter)
    return converter


def test_gguf_is_converted_once_then_reused(tmp_path: Path, fake_converter: FakeConverter) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    cache = tmp_path / "cache"
    first = prepare_model_dir(gguf, cache_dir=cache, progress=False)
    second = prepare_model_dir(str(gguf), cache_dir=cache, progress=False)
    assert first == second
    assert first.parent == cache and first.name.startswith("tiny-")
    assert (first / CONVERSION_MARKER).is_file() and (first / "config.json").is_file()
    assert fake_converter.calls == [gguf.resolve()]
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging folder left behind


def test_a_changed_gguf_gets_a_new_cache_entry(tmp_path: Path, fake_converter: FakeConverter) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF-1")
    first = prepare_model_dir(gguf, cache_dir=tmp_path / "cache", progress=False)
    gguf.write_bytes(b"GGUF-22")
    stamp = time.time() + 10
    os.utime(gguf, (stamp, stamp))
    second = prepare_model_dir(gguf, cache_dir=tmp_path / "cache", progress=False)
    assert first != second
    assert len(fake_converter.calls) == 2


def test_an_interrupted_conversion_leaves_no_cache_entry(tmp_path: Path, fake_converter: FakeConverter) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    fake_converter.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_model_dir(gguf, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []
    fake_converter.fail = False
    target = prepare_model_dir(gguf, cache_dir=cache, progress=False)
    assert (target / CONVERSION_MARKER).is_file()
    assert len(fake_converter.calls) == 2


def test_an_unfinished_entry_is_replaced(tmp_path: Path, fake_converter: FakeConverter) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = prepare_model_dir(gguf, cache_dir=cache, progress=False)
    (target / CONVERSION_MARKER).unlink()
    again = prepare_model_dir(gguf, cache_dir=cache, progress=False)
    assert again == target and (target / CONVERSION_MARKER).is_file()
    assert len(fake_converter.calls) == 2


def test_conversion_progress_is_drawn(
    tmp_path: Path, fake_converter: FakeConverter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    prepare_model_dir(gguf, cache_dir=tmp_path / "cache", progress=True)
    assert "Converting tiny-" in capsys.readouterr().err
    assert list((tmp_path / "xdg" / "chatstream" / "loadtime").glob("convert-tiny-*.json"))


# ----- a real GGUF file: the tiny model written with the gguf package, then converted -----


def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The q/k row order llama.cpp writes (transformers undoes it when it reads a llama GGUF)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_gguf_header(writer: gguf.GGUFWriter, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    config = model.config
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)


def write_tiny_gguf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write a float32 llama GGUF of ``model`` (what llama.cpp's converter would write, unquantized)."""
    config = model.config
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_gguf_header(writer, model, tokenizer)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        q = _llama_permute(state[layer + "self_attn.q_proj.weight"], config.num_attention_heads)
        k = _llama_permute(state[layer + "self_attn.k_proj.weight"], config.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[layer + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[layer + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[layer + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[layer + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[layer + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[layer + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[layer + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_real_gguf_file_converts_to_the_same_model(
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gguf_path = write_tiny_gguf(tiny_model, tiny_tokenizer, tmp_path / "tiny-llama.gguf")
    cache = tmp_path / "cache"
    model, tokenizer = load_model(gguf_path, dtype="fp32", device="cpu", cache_dir=cache, progress=False)
    for text in ("Hello, how are you today?", "吾輩は猫である。名前はまだ無い。", "絵文字も使えます 😀🎉"):
        ids = tokenizer(text)["input_ids"]
        assert ids == tiny_tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    ids = torch.tensor([tiny_tokenizer("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)
    (entry,) = cache.iterdir()
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert json.loads((entry / CONVERSION_MARKER).read_text())["gguf_path"] == str(gguf_path.resolve())

    def no_second_conversion(*_args: object) -> None:
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(conversion, "_convert_file", no_second_conversion)
    again, _ = load_model(gguf_path, dtype="bf16", device="cpu", cache_dir=cache, progress=False)
    assert again.dtype is torch.bfloat16


# ----- loading the tiny model -----


def test_load_model_from_a_directory(tiny_model_dir: Path, tiny_model: torch.nn.Module) -> None:
    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32", device="cpu", progress=False)
    assert not model.training
    assert model.dtype is torch.float32 and model.device.type == "cpu"
    ids = tokenizer("Hello, how are you today?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)
    assert tokenizer.decode(tokenizer("吾輩は猫である。")["input_ids"], skip_special_tokens=True) == "吾輩は猫である。"


def test_load_model_casts_to_the_requested_dtype(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16, device="cpu", progress=False)
    assert model.dtype is torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_model_validates_before_loading(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="'int4'"):
        load_model(tiny_model_dir, dtype="int4", device="cpu", progress=False)
    with pytest.raises(ValueError, match="'npu'"):
        load_model(tiny_model_dir, device="npu", progress=False)


def test_load_model_with_progress_records_the_load_time(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    load_model(tiny_model_dir, dtype="fp32", device="cpu", progress=True)
    assert "Loading " in capsys.readouterr().err
    assert len(list((tmp_path / "chatstream" / "loadtime").glob("*.json"))) == 1


# ----- LoadTime -----


def test_loadtime_returns_fn_result_and_records_the_duration(tmp_path: Path) -> None:
    shown: list[str] = []
    timer = LoadTime(name="org/model", fn=lambda: "loaded", fn_print=shown.append, store_dir=tmp_path)
    assert timer() == "loaded"
    assert timer.elapsed_time >= 0
    assert (tmp_path / "org_model.json").is_file()
    assert "recording" in "".join(shown)

    shown.clear()
    again = LoadTime(name="org/model", fn=lambda: time.sleep(0.05), fn_print=shown.append, store_dir=tmp_path)
    assert again.previous_sec == pytest.approx(timer.elapsed_time)
    again()
    assert "100%" in "".join(shown)


def test_loadtime_bar_without_percentage(tmp_path: Path) -> None:
    shown: list[str] = []
    LoadTime(name="m", fn=lambda: None, pbar=False, fn_print=shown.append, store_dir=tmp_path, estimate_sec=30)()
    text = "".join(shown)
    assert "00:30" in text and "%" not in text


def test_loadtime_propagates_errors_and_records_nothing(tmp_path: Path) -> None:
    def broken() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        LoadTime(name="broken", fn=broken, fn_print=lambda _text: None, store_dir=tmp_path)()
    assert not (tmp_path / "broken.json").exists()


def test_loadtime_runs_once_and_needs_fn(tmp_path: Path) -> None:
    timer = LoadTime(name="once", fn=lambda: 1, fn_print=lambda _text: None, store_dir=tmp_path)
    assert timer() == 1
    with pytest.raises(RuntimeError, match="already run"):
        timer()
    with pytest.raises(TypeError, match="fn not set"):
        LoadTime(name="none")


def test_loadtime_is_silent_for_uncached_hub_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    shown: list[str] = []
    LoadTime(name="org/absent", hf=True, fn=lambda: None, fn_print=shown.append, store_dir=tmp_path)()
    assert shown == []
    (tmp_path / "hub" / "models--org--present" / "snapshots").mkdir(parents=True)
    LoadTime(name="org/present", hf=True, fn=lambda: None, fn_print=shown.append, store_dir=tmp_path)()
    assert shown


def test_loadtime_default_store_is_under_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    long_name = "/very/long/" + "x" * 300
    timer = LoadTime(name=long_name, fn=lambda: None, fn_print=lambda _text: None)
    timer()
    assert timer.store_path.parent == tmp_path / "loadtime"
    assert timer.store_path.is_file() and len(timer.store_path.name) <= 110
    with pytest.raises(ValueError, match="dirname"):
        LoadTime(name="x", fn=lambda: None, dirname="../elsewhere")


def test_models_reexports_loadtime() -> None:
    assert chatstream.LoadTime is models.LoadTime is loadtime.LoadTime


def test_seed_style_loadtime_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    from chatstream import LoadTime as PublicLoadTime

    assert PublicLoadTime(name="some/model", fn=lambda: 7)() == 7
    assert list((tmp_path / ".cache" / "loadtime").glob("*.json"))


# ----- the embedded model (slow: converts once, ~1-3 minutes, then cached) -----


@pytest.mark.slow
def test_embedded_model_generates_text() -> None:
    model, tokenizer = load_model(None, device="cpu", progress=False)
    assert tokenizer.eos_token == "<eos>"
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") != tokenizer.unk_token_id
    japanese = "日本の首都は東京です。"
    ids = tokenizer(japanese, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == japanese
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
