"""EngineSpec and ReplicaSettings: validation and the deployment options they produce (no cluster)."""

from __future__ import annotations

import pytest

from chatstream.config import EngineConfig, MockConfig
from chatstream.engine.mock_engine import MockEngine
from chatstream.ray.app import FrontSettings
from chatstream.ray.spec import EngineSpec, ReplicaSettings

pytestmark = pytest.mark.ray


def test_an_engine_spec_needs_exactly_one_of_model_path_and_mock() -> None:
    with pytest.raises(ValueError, match="exactly one of model_path and mock"):
        EngineSpec()
    with pytest.raises(ValueError, match="exactly one"):
        EngineSpec(model_path="/m", mock=MockConfig())
    spec = EngineSpec(mock=MockConfig(), engine_config=EngineConfig(max_batch_size=3))
    assert isinstance(spec.build_engine(), MockEngine) and spec.max_batch_size == 3
    assert spec.load_tokenizer() is None


def test_fixed_replicas_get_the_batch_size_as_max_ongoing_requests_and_a_429_on_backpressure() -> None:
    options = ReplicaSettings(num_replicas=2, num_gpus=1, max_queued_requests=5, retry_after_s=3).deployment_options(8)
    assert options == {
        "max_ongoing_requests": 8,
        "max_queued_requests": 5 + 2 * 8,
        "backpressure_config": {"status_code": 429, "retry_after_s": 3},
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1},
        "num_replicas": 2,
    }


def test_autoscaling_settings_pass_through() -> None:
    settings = ReplicaSettings(min_replicas=1, max_replicas=4, max_queued_requests=-1)
    options = settings.deployment_options(16)
    assert "num_replicas" not in options and options["max_queued_requests"] == -1
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    assert (
        ReplicaSettings(max_replicas=2, target_ongoing_requests=3).deployment_options(8)["autoscaling_config"][
            "target_ongoing_requests"
        ]
        == 3
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_replicas": 0}, "num_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"max_queued_requests": -2}, "max_queued_requests"),
        ({"retry_after_s": 0}, "retry_after_s"),
        ({"first_delta_timeout_s": 0}, "first_delta_timeout_s"),
    ],
)
def test_bad_replica_settings_name_the_field(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}="):
        ReplicaSettings(**kwargs)  # type: ignore[arg-type]


def test_front_settings_refuse_what_the_application_provides() -> None:
    with pytest.raises(ValueError, match="model"):
        FrontSettings(chat_stream_options={"model": object()})
