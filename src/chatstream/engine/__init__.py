"""Generation engines: the contract in ``base``; continuous batching on a transformers model (``llm_engine.LLMEngine``,
run in its own thread behind the event loop by ``async_engine.TransformersEngine``); canned answers (``mock_engine``).

The transformers engine's parts, one role per module: ``sequence`` (a request inside the engine, its stop checks),
``scheduler`` (who runs next, the prefix cache), ``model_runner`` (the batch and every tensor operation), ``sampler``,
``detokenizer``, ``kv_cache``, and ``cpu/`` (packed weights, the fused decoder, thread and allocator settings).
"""

from chatstream.engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
)

__all__ = [
    "Delta",
    "Engine",
    "EngineError",
    "EngineOverloaded",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "RequestStream",
]
