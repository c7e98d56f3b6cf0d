"""Generation engines: the contract in ``base``, a continuous-batching engine on transformers, a mock engine."""

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
