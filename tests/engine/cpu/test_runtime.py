"""Thread-count choice and allocator tuning of the CPU runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatstream.engine.async_engine import TransformersEngine
from chatstream.engine.cpu import runtime


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
