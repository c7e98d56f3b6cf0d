"""EngineSpec and create_engine: an engine chosen by name, with that engine's own typed settings."""

from __future__ import annotations

import pytest

from chatstream.config import EngineConfig, MockConfig
from chatstream.engine.factory import EngineKind, EngineSpec, create_engine
from chatstream.engine.mock_engine import MockEngine
from chatstream.engine.upstream_engine import OpenAIUpstreamEngine, UpstreamConfig
from chatstream.engine.vllm_config import VLLMConfig
from chatstream.engine.vllm_engine import VLLMEngine


def test_each_name_builds_its_engine_with_its_options() -> None:
    mock = create_engine(EngineSpec("mock", MockConfig(type="echo")), None, None, EngineConfig())
    assert isinstance(mock, MockEngine) and mock.config.type.value == "echo"
    upstream = create_engine(EngineSpec("upstream", UpstreamConfig("http://h:8000/v1")), None, None, EngineConfig())
    assert isinstance(upstream, OpenAIUpstreamEngine) and upstream.config.base_url == "http://h:8000/v1"
    vllm = create_engine(EngineSpec("vllm", model="/models/m"), None, None, EngineConfig(max_batch_size=12))
    assert isinstance(vllm, VLLMEngine) and vllm.config.max_num_seqs == 12 and not vllm.is_running
    tuned = VLLMConfig(tensor_parallel_size=2)
    assert create_engine(EngineSpec(EngineKind.VLLM, tuned, "/m"), None, None, EngineConfig()).config is tuned


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "tgi"}, "engine='tgi' must be one of 'transformers', 'vllm', 'upstream', 'mock'"),
        ({"kind": "upstream"}, "needs its UpstreamConfig"),
        ({"kind": "vllm"}, "needs model="),
        ({"kind": "vllm", "model": "m", "options": MockConfig()}, "MockConfig do not fit engine 'vllm'"),
        ({"kind": "transformers", "options": VLLMConfig()}, "it takes none"),
    ],
)
def test_a_spec_that_does_not_fit_says_why(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineSpec(**spec)  # type: ignore[arg-type]


def test_the_transformers_engine_needs_a_model() -> None:
    with pytest.raises(ValueError, match="model and tokenizer are required"):
        create_engine(EngineSpec(), None, None, EngineConfig())
