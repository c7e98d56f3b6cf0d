"""``load_model``: a source (embedded model, model folder or GGUF file) to a ``(model, tokenizer)`` pair."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from chatstream.models.conversion import (
    LOADTIME_DIRNAME,
    convert_embedded_model,
    convert_gguf,
    quiet_transformers_bars,
)
from chatstream.models.devices import dtype_name, parse_dtype, placement_kwargs, resolve_device
from chatstream.models.loadtime import LoadTime

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
    from transformers import AutoTokenizer

    target = resolve_device(device)
    torch_dtype = parse_dtype(dtype, target)
    placement = placement_kwargs(target, num_gpus)
    model_dir = prepare_model_dir(source, cache_dir=cache_dir, progress=progress)
    logger.info("Loading %s as %s on %s", model_dir, dtype_name(torch_dtype), placement.get("device_map", target))
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = _load_weights(model_dir, torch_dtype, placement, progress)
    if "device_map" not in placement:
        model = cast(Any, model).to(target)
    model.eval()
    logger.info("Loaded %s in %.1f s", model_dir.name, time.monotonic() - started)
    return model, tokenizer


def _load_weights(model_dir: Path, dtype: torch.dtype, placement: dict[str, Any], progress: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    def load() -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True, **placement)

    with quiet_transformers_bars():
        return LoadTime(name=str(model_dir), fn=load, dirname=LOADTIME_DIRNAME)() if progress else load()


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
