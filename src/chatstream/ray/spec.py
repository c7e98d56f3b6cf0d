"""What the Ray application is made of: the engine each replica loads, and how the replicas are placed and scaled.

Plain, picklable dataclasses: ``build_app`` hands them to the deployments, which rebuild everything inside their own
processes (a model is never pickled; each replica loads its own copy from ``EngineSpec.model_path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatstream.config import EngineConfig, MockConfig

if TYPE_CHECKING:
    from chatstream.engine.base import Engine


@dataclass(frozen=True)
class EngineSpec:
    """The engine one replica runs.

    Attributes:
        model_path: a Hugging Face model directory or a ``.gguf`` file that every node can read (the same path on
            each machine); None with ``mock`` set runs the mock engine.
        engine_config: the engine's settings; ``max_batch_size`` also sets Ray's ``max_ongoing_requests``.
        mock: run the mock engine with these settings instead of a model (tests, latency measurements).
        dtype: the weights' dtype ("auto", "bf16", "fp16", "fp32").
        device: where the replica puts its model copy (None: CUDA when the replica was given a GPU, else CPU).
        num_threads: the engine thread's CPU threads (None: the engine's default).
    """

    model_path: str | None = None
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    mock: MockConfig | None = None
    dtype: str = "auto"
    device: str | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if (self.model_path is None) == (self.mock is None):
            raise ValueError(
                f"EngineSpec needs exactly one of model_path and mock (model_path={self.model_path!r}, "
                f"mock={self.mock!r})"
            )

    @property
    def max_batch_size(self) -> int:
        """Generations one replica runs at once."""
        return self.engine_config.max_batch_size

    def build_engine(self) -> Engine:
        """Load the model (or set up the mock) and return the engine, not yet started. Runs inside the replica."""
        if self.mock is not None:
            from chatstream.engine.mock_engine import MockEngine

            return MockEngine(self.mock)
        from chatstream.engine.async_engine import TransformersEngine
        from chatstream.models.loader import load_model

        model, tokenizer = load_model(self.model_path, dtype=self.dtype, device=self.device, progress=False)
        return TransformersEngine(model, tokenizer, self.engine_config, num_threads=self.num_threads)

    def load_tokenizer(self) -> Any:
        """The tokenizer alone (the front renders prompts with it and needs no weights); None for the mock."""
        if self.model_path is None:
            return None
        from transformers import AutoTokenizer

        from chatstream.models.loader import prepare_model_dir

        return AutoTokenizer.from_pretrained(str(prepare_model_dir(self.model_path, progress=False)))


@dataclass(frozen=True)
class ReplicaSettings:
    """How many engine replicas run, where, and how Ray limits and scales them.

    Attributes:
        num_replicas: fixed replica count (ignored when ``max_replicas`` is set: autoscaling).
        min_replicas, max_replicas: autoscaling bounds; autoscaling is on when ``max_replicas`` is set.
        target_ongoing_requests: autoscaling target per replica (None: the engine's batch size).
        num_cpus, num_gpus: resources each replica reserves (its ``ray_actor_options``).
        max_queued_requests: requests that may wait for a batch slot beyond the replicas' slots; the next one is
            refused (429 + Retry-After). It sizes the front's admission queue; Ray's own queue in each front
            (``max_queued_requests`` of the deployment) gets this plus every batch slot, so that what one front
            admitted never trips Ray's limit while a finished request's slot is still being released; Ray's limit
            refuses what several fronts together send beyond it. -1: no bound in Ray.
        retry_after_s: the Retry-After that a refused request carries.
        sticky: route each conversation to the replica that served its previous turn (False: Ray's default
            power-of-two-choices router; benchmarks compare the two).
        first_delta_timeout_s: a request that has not produced its first delta by then ends with a 503 (no replica
            took it: all dead, or the queue did not move).
    """

    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_queued_requests: int = 64
    retry_after_s: int = 1
    sticky: bool = True
    first_delta_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        _check(self.num_replicas >= 1, "num_replicas", self.num_replicas, "must be >= 1")
        _check(self.min_replicas >= 0, "min_replicas", self.min_replicas, "must be >= 0")
        if self.max_replicas is not None:
            _check(self.max_replicas >= max(1, self.min_replicas), "max_replicas", self.max_replicas, ">= min")
        _check(self.num_cpus >= 0, "num_cpus", self.num_cpus, "must be >= 0")
        _check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        _check(self.max_queued_requests >= -1, "max_queued_requests", self.max_queued_requests, "must be >= -1")
        _check(self.retry_after_s >= 1, "retry_after_s", self.retry_after_s, "must be >= 1")
        _check(self.first_delta_timeout_s > 0, "first_delta_timeout_s", self.first_delta_timeout_s, "must be > 0")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def peak_replicas(self) -> int:
        """The most replicas that can run at once."""
        return self.max_replicas if self.max_replicas is not None else self.num_replicas

    def ray_queue_limit(self, max_batch_size: int) -> int:
        """Ray's ``max_queued_requests`` for the engine deployment (see ``max_queued_requests``)."""
        if self.max_queued_requests == -1:
            return -1
        return self.max_queued_requests + self.peak_replicas * max_batch_size

    def deployment_options(self, max_batch_size: int) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (replica count or autoscaling, limits, resources)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": max_batch_size,
            "max_queued_requests": self.ray_queue_limit(max_batch_size),
            "backpressure_config": {"status_code": 429, "retry_after_s": self.retry_after_s},
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or max_batch_size,
            }
        else:
            options["num_replicas"] = self.num_replicas
        return options


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")
