"""Thread-count choice and allocator tuning of the CPU runtime."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatstream.config import EngineConfig
from chatstream.engine.async_engine import TransformersEngine
from chatstream.engine.cpu import runtime
from chatstream.engine.llm_engine import LLMEngine


def _fake_sysfs(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in topology.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_smt_siblings_count_once(tmp_path: Path) -> None:
    sysfs = _fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)})
    assert runtime.physical_cores({0, 1, 2, 3, 4}, sysfs) == 3
    assert runtime.physical_cores({0, 2}, sysfs) == 1


def test_without_topology_logical_cpus_count(tmp_path: Path) -> None:
    assert runtime.physical_cores({0, 1, 2}, tmp_path) == 3


def test_env_overrides_the_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.NUM_THREADS_ENV, "3")
    assert runtime.default_num_threads() == 3
    monkeypatch.setenv(runtime.NUM_THREADS_ENV, "zero")
    with pytest.raises(ValueError, match="CHATSTREAM_NUM_THREADS='zero'"):
        runtime.default_num_threads()
    monkeypatch.delenv(runtime.NUM_THREADS_ENV)
    assert runtime.default_num_threads() == runtime.physical_cores()


def test_configure_threads_sets_torch() -> None:
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads=0"):
            runtime.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_engine_rejects_bad_thread_count(tiny_model: object, tiny_tokenizer: object) -> None:
    with pytest.raises(ValueError, match="num_threads=0"):
        TransformersEngine(tiny_model, tiny_tokenizer, num_threads=0)


def test_malloc_tuning_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_tuned", False)
    monkeypatch.setenv(runtime.MALLOC_TUNING_ENV, "0")
    assert runtime.keep_freed_memory() is False


def test_openmp_runtime_is_found_in_the_memory_map(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 00:00 0 /nonexistent/libgomp.so.1\n7f02-7f03 r-xp 0 00:00 0 [vdso]\n")
    assert runtime._openmp_runtime(maps) is None  # listed but not loadable: no runtime, no crash
    maps.write_text("7f02-7f03 r-xp 00000000 00:00 0 [vdso]\n")
    assert runtime._openmp_runtime(maps) is None


@pytest.mark.skipif(runtime._openmp_runtime() is None, reason="no OpenMP runtime loaded by this torch build")
def test_release_thread_pool_frees_and_torch_still_computes() -> None:
    x = torch.randn(512, 512)
    expected = x @ x  # a parallel operator: this thread now has a pool
    assert runtime.release_thread_pool()
    torch.testing.assert_close(x @ x, expected)  # the next parallel operator builds a new one


def test_reserve_memory_reads_its_env_and_needs_the_malloc_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_tuned", False)
    assert runtime.reserve_memory(8 << 20) == 0  # freed memory may go back to the system: nothing to keep
    monkeypatch.setenv(runtime.RESERVE_MEMORY_ENV, "0")
    assert runtime.reserve_memory(8 << 20) == 0
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(runtime.RESERVE_MEMORY_ENV, bad)
        with pytest.raises(ValueError, match="CHATSTREAM_RESERVE_MEMORY_MB"):
            runtime.reserve_memory(8 << 20)


_FAULTS_SCRIPT = """
import resource, sys, threading, torch
from chatstream.engine.cpu import runtime
assert runtime.keep_freed_memory()
result = {}
def work():
    reserved = runtime.reserve_memory(int(sys.argv[1]) << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pieces = [torch.empty(4 << 20, dtype=torch.uint8) for _ in range(8)]
    for piece in pieces:
        piece.fill_(1)
    result["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    result["reserved"] = reserved
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(result["reserved"], result["faults"])
"""


def _faults_after_reserving(mib: int) -> tuple[int, int]:
    env = {key: value for key, value in os.environ.items() if key != runtime.RESERVE_MEMORY_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(runtime.__file__).parents[3]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, str(mib)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    reserved, faults = out.stdout.split()
    return int(reserved), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux's fault counters")
def test_reserved_memory_is_reused_without_page_faults() -> None:
    """A fresh process allocates and fills 32 MiB on one thread: with 64 MiB reserved on that thread first, the
    pages are the reserve's, already mapped; without, each is faulted in."""
    reserved, faults_reserved = _faults_after_reserving(64)
    none, faults_fresh = _faults_after_reserving(0)
    assert (reserved, none) == (64 << 20, 0)
    if faults_fresh < 2000:  # 8,192 small pages; a kernel that maps fresh memory in huge pages faults far less
        pytest.skip(f"{faults_fresh} faults for 32 MiB of fresh memory: this kernel maps it in large pages")
    assert faults_reserved < faults_fresh / 8


def test_the_engine_reserves_its_prefix_cache_and_a_full_batch(tiny_model: object, tiny_tokenizer: object) -> None:
    config = EngineConfig(max_batch_size=2, context_len=64, prefix_cache_bytes=1000)
    engine = LLMEngine(tiny_model, tiny_tokenizer, config)
    per_token = engine.model_runner.kv_bytes_per_token()
    assert per_token > 0
    assert engine.kv_reserve_bytes == 1000 + 2 * 64 * per_token
    off = LLMEngine(tiny_model, tiny_tokenizer, dataclasses.replace(config, prefix_cache_bytes=0))
    assert off.kv_reserve_bytes == 2 * 64 * per_token
