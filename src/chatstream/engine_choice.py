"""The engine a ChatStream runs, resolved from its constructor's arguments (the seed's and ours).

``engine`` may be None (the seed's way: ``model`` and ``tokenizer``, or ``use_mock_response``), an engine name or
:class:`~chatstream.engine.factory.EngineSpec` to build, an engine instance, or a list of them (a pool); ``devices``
serves one copy of ``model`` per device. From these come the spec, the tokenizer (vLLM's own when none was given),
the device, the engine itself, and what the service reports about it (model name, GPUs, the context prompts are
fitted into).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatstream.config import EngineConfig, MockConfig
from chatstream.engine.base import Engine
from chatstream.engine.factory import EngineKind, EngineSpec, create_engine, engine_kind
from chatstream.engine.vllm_config import VLLMConfig

if TYPE_CHECKING:
    import torch

    from chatstream.engine.upstream_protocol import UpstreamConfig

EngineChoice = Engine | Sequence[Engine] | EngineSpec | str | None
"""What ChatStream's ``engine`` argument takes."""


def engine_spec(
    engine: EngineChoice,
    options: VLLMConfig | UpstreamConfig | MockConfig | None,
    model: Any,
    use_mock_response: bool,
    mock_params: Mapping[Any, Any] | None,
) -> EngineSpec | None:
    """The engine to build (None: engine instances were given); the seed's ``use_mock_response`` is "mock"."""
    if isinstance(engine, Engine) or (isinstance(engine, Sequence) and not isinstance(engine, str)):
        return None
    if isinstance(engine, EngineSpec):
        return engine
    if engine is None:
        kind = EngineKind.MOCK if use_mock_response else EngineKind.TRANSFORMERS
    else:
        kind = engine_kind(engine)
    if kind is EngineKind.MOCK and options is None:
        options = MockConfig.from_seed_params(dict(mock_params or {}))
    return EngineSpec(kind, options, model if isinstance(model, str) else None)


def tokenizer_for(spec: EngineSpec) -> Any:
    """vLLM's model has its tokenizer: load it for the prompt classes when none was given."""
    if spec.kind is not EngineKind.VLLM:
        return None
    from transformers import AutoTokenizer

    options = spec.options if isinstance(spec.options, VLLMConfig) else None
    source = (options.tokenizer if options is not None else None) or spec.model
    trust = options.trust_remote_code if options is not None else False
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust)


def resolve_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None)."""
    if device is None:
        return None
    from chatstream.models.devices import parse_device  # imports torch: only when a device is given

    return parse_device(device)


def num_engines(engine: object, devices: Sequence[Any] | None) -> int:
    """How many engines generate: one per device, one per engine of a list, else one."""
    if devices:
        return len(devices)
    return len(engine) if isinstance(engine, Sequence) and not isinstance(engine, str) else 1


def build_engine(
    engine: EngineChoice,
    devices: Sequence[str | torch.device] | None,
    spec: EngineSpec | None,
    model: Any,
    tokenizer: Any,
    config: EngineConfig,
    use_mock_response: bool,
) -> Engine:
    """The engine that generates: a pool over ``devices``, the given instance, a pool of the given instances, or the
    one ``spec`` describes."""
    if devices:
        if engine is not None or use_mock_response or model is None or tokenizer is None:
            raise ValueError("devices needs model and tokenizer, and neither engine nor use_mock_response")
        from chatstream.pool.devices import device_pool

        return device_pool(model, tokenizer, config, devices)
    if isinstance(engine, Engine):
        return engine
    if isinstance(engine, Sequence) and not isinstance(engine, str):
        from chatstream.pool.devices import engine_pool

        return engine_pool(engine, config.max_batch_size)
    assert spec is not None
    return create_engine(spec, model, tokenizer, config)


def prompt_context_len(
    engine: Engine | None, spec: EngineSpec | None, config: EngineConfig, use_mock_response: bool
) -> int | None:
    """The context prompts are fitted into: our engine built here, or a given engine's own configured context
    (an engine that tells none, e.g. a remote server, keeps its own limits)."""
    if use_mock_response:
        return None
    if spec is not None:  # built here: ours knows its context; vLLM and an upstream keep their own
        return config.context_len if spec.kind is EngineKind.TRANSFORMERS else None
    context_len = getattr(getattr(engine, "config", None), "context_len", None)
    return context_len if isinstance(context_len, int) else None


def num_gpus_in_use(spec: EngineSpec | None, num_gpus: int | None) -> int | None:
    """GPUs this process uses (for /get_resource_usage): vLLM's tensor parallel size; none for an upstream."""
    if spec is not None and spec.kind is EngineKind.VLLM:
        return spec.options.tensor_parallel_size if isinstance(spec.options, VLLMConfig) else 1
    if spec is not None and spec.kind is EngineKind.UPSTREAM:
        return 0
    return num_gpus


def default_model_name(model: Any, mock: bool, spec: EngineSpec | None = None) -> str:
    """The id /v1/models reports when no ``model_name`` was given."""
    if mock:
        return "chatstream-mock"
    if spec is not None and spec.kind is EngineKind.UPSTREAM:
        return getattr(spec.options, "model", None) or "chatstream-upstream"
    if isinstance(model, str):  # vLLM's model folder or id
        return Path(model).name or model
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "chatstream-model")
