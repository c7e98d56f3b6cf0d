"""Choosing the engine by name: :class:`EngineSpec` (what ``ChatStream(engine=...)`` and ``chatstream serve --engine``
select) and :func:`create_engine`, the one place that builds each engine.

Each engine's module is imported only when that engine is built: the transformers engine needs torch, vLLM needs
``pip install "chatstream[vllm]"``, and neither is needed in front of an upstream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from chatstream.config import EngineConfig, MockConfig
from chatstream.engine.base import Engine
from chatstream.engine.upstream_protocol import UpstreamConfig
from chatstream.engine.vllm_config import VLLMConfig


class EngineKind(enum.Enum):
    """The engines ChatStream can build (docs/engines.md says which to use when)."""

    TRANSFORMERS = "transformers"
    """Ours: continuous batching on a transformers model, tuned for CPUs (the default)."""
    VLLM = "vllm"
    """vLLM's async engine in this process (GPUs)."""
    UPSTREAM = "upstream"
    """Another server that speaks the OpenAI API generates; ChatStream keeps conversations, admission and roles."""
    MOCK = "mock"
    """Canned answers, no model."""


_OPTIONS: dict[EngineKind, type[Any] | None] = {
    EngineKind.TRANSFORMERS: None,
    EngineKind.VLLM: VLLMConfig,
    EngineKind.UPSTREAM: UpstreamConfig,
    EngineKind.MOCK: MockConfig,
}


@dataclass(frozen=True)
class EngineSpec:
    """Which engine generates, with that engine's own typed settings.

    Attributes:
        kind: an :class:`EngineKind` or its value ("transformers", "vllm", "upstream", "mock").
        options: the engine's settings: a ``VLLMConfig`` for vLLM (default: ``VLLMConfig()`` with ChatStream's
            concurrency as ``max_num_seqs`` and context length as ``max_model_len``), an ``UpstreamConfig`` for an
            upstream (required), a ``MockConfig`` for the mock; None for the transformers engine, whose settings are
            ChatStream's own (``EngineConfig``).
        model: the model folder or Hugging Face id that vLLM loads (required for "vllm"; the transformers engine
            takes a loaded model instead).
    """

    kind: EngineKind = EngineKind.TRANSFORMERS
    options: VLLMConfig | UpstreamConfig | MockConfig | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", engine_kind(self.kind))
        expected = _OPTIONS[self.kind]
        if self.options is not None and (expected is None or not isinstance(self.options, expected)):
            wanted = expected.__name__ if expected is not None else "none"
            given = type(self.options).__name__
            raise ValueError(f"engine_options={given} do not fit engine {self.kind.value!r} (it takes {wanted})")
        if self.kind is EngineKind.UPSTREAM and self.options is None:
            raise ValueError("engine 'upstream' needs its UpstreamConfig (the upstream's base URL)")
        if self.kind is EngineKind.VLLM and not self.model:
            raise ValueError("engine 'vllm' needs model= (a model folder or Hugging Face id)")


def engine_kind(name: EngineKind | str) -> EngineKind:
    """The :class:`EngineKind` of a name; ValueError naming the choices."""
    try:
        return EngineKind(name)
    except ValueError:
        names = ", ".join(repr(k.value) for k in EngineKind)
        raise ValueError(f"engine={name!r} must be one of {names}") from None


def create_engine(spec: EngineSpec, model: Any, tokenizer: Any, config: EngineConfig) -> Engine:
    """The engine ``spec`` names; ``model``, ``tokenizer`` and ``config`` are the transformers engine's."""
    if spec.kind is EngineKind.MOCK:
        from chatstream.engine.mock_engine import MockEngine

        return MockEngine(spec.options if isinstance(spec.options, MockConfig) else None)
    if spec.kind is EngineKind.UPSTREAM:
        from chatstream.engine.upstream_engine import OpenAIUpstreamEngine

        assert isinstance(spec.options, UpstreamConfig)
        return OpenAIUpstreamEngine(spec.options)
    if spec.kind is EngineKind.VLLM:
        from chatstream.engine.vllm_engine import VLLMEngine

        assert spec.model is not None
        options = spec.options if isinstance(spec.options, VLLMConfig) else None
        return VLLMEngine(spec.model, options or VLLMConfig(max_num_seqs=config.max_batch_size), tokenizer=tokenizer)
    if model is None or tokenizer is None:
        raise ValueError("model and tokenizer are required for the transformers engine (or choose another engine)")
    from chatstream.engine.async_engine import TransformersEngine

    return TransformersEngine(model, tokenizer, config)
