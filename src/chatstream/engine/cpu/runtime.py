"""Process settings that decide CPU decode speed: the number of compute threads, the allocator's reuse of memory
and the OpenMP worker pools.

* **Threads.** Decoding a small model is bound by memory bandwidth and by per-operator overhead; one compute thread
  per physical core is the most that helps, and more threads than free cores hurt badly (an OpenMP parallel region
  waits for its slowest thread, so one descheduled thread stalls every operator). :func:`default_num_threads` counts
  the physical cores this process may run on; ``CHATSTREAM_NUM_THREADS`` or the engine's ``num_threads`` overrides it.
* **Allocator.** glibc serves large blocks (the logits of a batch) with ``mmap`` and returns them on free, so every
  decode step page-faults them in afresh. :func:`keep_freed_memory` raises glibc's mmap and trim thresholds so that
  freed blocks are reused. ``CHATSTREAM_MALLOC_TUNING=0`` turns it off.
* **Reserved memory.** A page the process touches for the first time costs far more than one it reuses (about 7 µs
  on a VM that backs its guest's memory lazily, ≈ 1.7 ms per MB): two 1,500-token rows' KV merged into one buffer
  took 75–90 ms there, 6 ms in memory the process had touched before. :func:`reserve_memory` touches the KV memory
  the engine will grow into once, at startup, on the engine thread, and frees it to the allocator, which keeps it
  (``CHATSTREAM_RESERVE_MEMORY_MB`` sets the amount; 0 turns it off).
* **OpenMP thread pools.** Every thread that runs a parallel torch operator gets its own OpenMP worker pool, and
  GNU OpenMP shortens its spin-waits drastically as soon as it manages more threads than there are CPUs. The thread
  that loaded the model (usually the one that runs the event loop) has such a pool; left alone, it makes the engine
  thread's workers sleep and wake between the operators of a decode step. :func:`release_thread_pool` frees the
  calling thread's pool; the engine calls it where it starts.

What each setting is worth is measured in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NUM_THREADS_ENV = "CHATSTREAM_NUM_THREADS"
MALLOC_TUNING_ENV = "CHATSTREAM_MALLOC_TUNING"
RESERVE_MEMORY_ENV = "CHATSTREAM_RESERVE_MEMORY_MB"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_MMAP_THRESHOLD_FALLBACK = 32 << 20  # glibc builds that cap the threshold at half their heap size
_TRIM_THRESHOLD = 1 << 30
_RESERVE_PIECE = 8 << 20  # below every mmap threshold above: the pieces come from the thread's heap and go back to it

_tuned = False
_mallopt: Any = None


def physical_cores(cpus: set[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on); SMT siblings count once."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))  # no topology (containers, other systems): count logical CPUs
        cores.add((package, core))
    return max(1, len(cores))


def default_num_threads() -> int:
    """``$CHATSTREAM_NUM_THREADS`` when set, else the physical cores this process may use."""
    threads = _env_int(NUM_THREADS_ENV, 1, "a positive integer")
    return physical_cores() if threads is None else threads


def _env_int(name: str, minimum: int, meaning: str) -> int | None:
    """``$name`` as a whole number of at least ``minimum`` (None when unset or blank); a ValueError saying it must be
    ``meaning`` otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"{name}={value!r} must be {meaning}")
    return number


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (None: :func:`default_num_threads`); returns the number set."""
    threads = default_num_threads() if num_threads is None else num_threads
    if threads < 1:
        raise ValueError(f"num_threads={threads!r} must be >= 1")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed large blocks (once per process); False where not applicable or disabled."""
    global _tuned, _mallopt
    if _tuned:
        return True
    if os.environ.get(MALLOC_TUNING_ENV, "1").strip() == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None or "libc" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    if not mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD):
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_FALLBACK)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    _mallopt, _tuned = mallopt, True
    logger.debug("glibc malloc: large freed blocks are kept for reuse")
    return True


def reserve_memory(default_bytes: int) -> int:
    """Touch ``default_bytes`` of memory (at most a quarter of the memory free now) on the calling thread and free it
    again, so that the allocator hands the same pages, already mapped, to this thread's later allocations; returns
    the bytes reserved.

    ``$CHATSTREAM_RESERVE_MEMORY_MB`` replaces ``default_bytes`` and its bound (0: nothing). Only after
    :func:`keep_freed_memory` (otherwise freed memory may go back to the system, and touching it is wasted): 0
    elsewhere.
    """
    mib = _env_int(RESERVE_MEMORY_ENV, 0, "a whole number of MiB")
    default_bytes = min(default_bytes, _free_memory_bytes() // 4) if mib is None else mib << 20
    if default_bytes <= 0 or not _tuned:
        return 0
    _mallopt(_M_TRIM_THRESHOLD, max(_TRIM_THRESHOLD, default_bytes + _RESERVE_PIECE))  # the freed pages stay
    logger.info("reserving %d MiB of memory for the KV (%s=0 skips this)", default_bytes >> 20, RESERVE_MEMORY_ENV)
    started = time.perf_counter()
    pieces = [torch.empty(min(_RESERVE_PIECE, default_bytes - start), dtype=torch.uint8)
              for start in range(0, default_bytes, _RESERVE_PIECE)]  # fmt: skip
    for piece in pieces:
        piece.fill_(0)
    del pieces
    logger.info("reserved %d MiB of memory for the KV in %.2f s", default_bytes >> 20, time.perf_counter() - started)
    return default_bytes


def _free_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not reported here
        return 0


_OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")
_OMP_PAUSE_SOFT = 1


def _openmp_runtime(maps: Path = Path("/proc/self/maps")) -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's), found in the memory map; None elsewhere."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        path = fields[-1] if fields else ""
        if any(Path(path).name.startswith(name) for name in _OPENMP_LIBRARIES):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's idle OpenMP workers (``omp_pause_resource_all``); True if the runtime did.

    The next parallel operator on this thread builds a new pool, so this is always safe; it only helps when the
    calling thread then leaves the compute to another thread (the engine's).
    """
    runtime = _openmp_runtime()
    pause = getattr(runtime, "omp_pause_resource_all", None)
    if pause is None:
        return False
    released = pause(_OMP_PAUSE_SOFT) == 0
    logger.debug("OpenMP pool of the calling thread %s", "released" if released else "kept (runtime refused)")
    return released
