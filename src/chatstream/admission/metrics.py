"""Prometheus metrics of one ChatStream instance (its own registry, so several instances can live in a process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chatstream.engine.base import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ChatStreamMetrics:
    """Counters and histograms recorded by the streaming code; exposed by GET /metrics."""

    def __init__(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        engine_stats: Callable[[], EngineStats] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if engine_stats is not None:
            _engine_gauges(r, engine_stats)
        self.num_running = Gauge("chatstream_requests_running", "Generations running now", registry=r)
        self.num_running.set_function(running)
        self.num_waiting = Gauge("chatstream_requests_waiting", "Requests waiting in the admission queue", registry=r)
        self.num_waiting.set_function(waiting)
        self.admitted = Counter("chatstream_requests_admitted", "Requests admitted to generation", registry=r)
        self.rejected = Counter("chatstream_requests_rejected", "Requests rejected (queue full)", registry=r)
        self.finished = Counter(
            "chatstream_requests_finished", "Generations finished, by reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("chatstream_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_prompt_tokens = Counter(
            "chatstream_cached_prompt_tokens", "Prompt tokens served from the per-conversation KV cache", registry=r
        )
        self.generation_tokens = Counter("chatstream_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = _histogram(
            r, "chatstream_time_to_first_token_seconds", "Time from admission to the first token", _LATENCY_BUCKETS
        )
        self.inter_token_latency = _histogram(
            r, "chatstream_inter_token_latency_seconds", "Time between two streamed deltas", _TOKEN_LATENCY_BUCKETS
        )
        self.e2e_latency = _histogram(
            r, "chatstream_e2e_request_latency_seconds", "Time from arrival to the end of the stream", _LATENCY_BUCKETS
        )
        self.queue_time = _histogram(
            r, "chatstream_queue_time_seconds", "Time spent waiting for an admission slot", _LATENCY_BUCKETS
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


def _engine_gauges(registry: CollectorRegistry, stats: Callable[[], EngineStats]) -> None:
    """What the engine itself reports (for vLLM its own queue; for an upstream the requests forwarded now)."""
    for name, documentation, field in (
        ("chatstream_engine_requests_running", "Requests the engine is generating now", "num_running"),
        ("chatstream_engine_requests_waiting", "Requests queued inside the engine", "num_waiting"),
        ("chatstream_engine_prefix_cache_bytes", "Memory of the kept per-conversation KV caches", "prefix_cache_bytes"),
    ):
        Gauge(name, documentation, registry=registry).set_function(_stats_field(stats, field))


def _stats_field(stats: Callable[[], EngineStats], field: str) -> Callable[[], float]:
    return lambda: float(getattr(stats(), field))


def _histogram(registry: CollectorRegistry, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, documentation, buckets=buckets, registry=registry)
