"""Where and in which dtype a model runs: device validation, the default dtype, placement over GPUs."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GPU_MEMORY_FRACTION = 0.85
"""Share of each GPU's memory given to weights when a model is split over GPUs; the rest is left for KV caches."""

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_DEVICE_TYPES = ("cpu", "cuda", "mps")
_DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda)(:\d+)?$")
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def parse_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` a device option names: "cpu", "cuda", "cuda:N" or "mps" (any case, spaces ignored).

    A ``torch.device`` is returned as it is. Only the spelling is checked, not whether this machine has the device
    (see :func:`resolve_device`). Raises ValueError naming the value.
    """
    if isinstance(device, torch.device):
        return device
    spec = device.strip().lower() if isinstance(device, str) else None
    if spec is None or not _DEVICE_PATTERN.match(spec):
        raise ValueError(f"device {device!r} must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return torch.device(spec)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A validated ``torch.device`` this machine has: None picks CUDA when available, else the CPU.

    Accepts what :func:`parse_device` accepts (a ``torch.device`` only of those types); anything else, or a device
    this machine lacks, raises ValueError naming the value.
    """
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    resolved = parse_device(device)
    if resolved.type not in _DEVICE_TYPES:
        raise ValueError(f"device {device!r} must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The fastest safe dtype for ``device``: bfloat16 on CUDA GPUs that support it (float16 on older ones) and on
    CPUs with AVX512-BF16 or AMX; float32 elsewhere."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if resolved.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """Translate a dtype option ("auto", None, a name or a torch dtype) to a torch dtype; ValueError otherwise."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype!r} must be bfloat16, float16 or float32")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPES:
        return _DTYPES[dtype.strip().lower()]
    raise ValueError(f"dtype {dtype!r} must be one of 'auto', 'bf16', 'fp16', 'fp32' (or bfloat16, float16, float32)")


def cpu_supports_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU flags include AVX512-BF16 or AMX-BF16 (fast bfloat16 matrix math); False if unknown."""
    return _cpu_flags_have_bf16(str(cpuinfo))


@functools.lru_cache(maxsize=4)
def _cpu_flags_have_bf16(cpuinfo: str) -> bool:
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_CPU_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


def placement_kwargs(device: torch.device, num_gpus: int | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that place the weights: a device map over several GPUs, the GPU itself, or
    nothing (CPU/MPS: the caller moves the model)."""
    if num_gpus is not None and num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} must be >= 1")
    if device.type != "cuda":
        if num_gpus is not None and num_gpus > 1:
            logger.info("num_gpus=%d ignored: the model runs on %s", num_gpus, device)
        return {}
    if num_gpus is None or num_gpus == 1:
        return {"device_map": str(device)}
    first = device.index or 0
    available = torch.cuda.device_count()
    if first + num_gpus > available:
        raise ValueError(f"num_gpus={num_gpus} from cuda:{first} needs more GPUs than the {available} available")
    max_memory: dict[int | str, int] = {
        index: int(torch.cuda.get_device_properties(index).total_memory * GPU_MEMORY_FRACTION)
        for index in range(first, first + num_gpus)
    }
    return {"device_map": "auto", "max_memory": max_memory}


def dtype_name(dtype: torch.dtype) -> str:
    """ "torch.bfloat16" -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")
