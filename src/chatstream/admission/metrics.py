"""Prometheus metrics of one ChatStream instance (its own registry, so several instances can live in a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chatstream.engine.base import EngineStats, WorkerStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ChatStreamMetrics:
    """Counters and histograms recorded by the streaming code; exposed by GET /metrics.

    ``engine_stats`` (the engine's own ``stats()``) adds what the engine reports itself, unlabelled: its running and
    waiting requests (for vLLM its own queue; for an upstream the requests forwarded now) and its prefix-cache bytes.
    ``workers`` (an engine's optional ``workers()``) adds one series per engine of a pool or Ray replica, labelled
    ``engine``: load, health, turns, moves and token counters (they replace the unlabelled running and waiting).
    """

    def __init__(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        engine_stats: Callable[[], EngineStats] | None = None,
        workers: Callable[[], Sequence[WorkerStats]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if engine_stats is not None:
            r.register(EngineCollector(engine_stats, workers))
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

        if workers is not None:
            r.register(WorkerCollector(workers))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """What the engine itself reports, read at each scrape; running and waiting only while it has no workers (a pool
    reports them per engine, labelled)."""

    def __init__(
        self, stats: Callable[[], EngineStats], workers: Callable[[], Sequence[WorkerStats]] | None
    ) -> None:
        self.stats = stats
        self.workers = workers

    def describe(self) -> list[Metric]:
        return []  # read at scrape time; the names do not clash with the registry's own series

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        cache = GaugeMetricFamily(
            "chatstream_engine_prefix_cache_bytes", "Memory of the kept per-conversation KV caches"
        )
        cache.add_metric([], float(stats.prefix_cache_bytes))
        yield cache
        if self.workers is not None and self.workers():
            return
        for name, documentation, value in (
            ("chatstream_engine_requests_running", "Requests the engine is generating now", stats.num_running),
            ("chatstream_engine_requests_waiting", "Requests queued inside the engine", stats.num_waiting),
        ):
            family = GaugeMetricFamily(name, documentation)
            family.add_metric([], float(value))
            yield family


def _histogram(registry: CollectorRegistry, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, documentation, buckets=buckets, registry=registry)


class WorkerCollector(Collector):
    """Per-engine series, read from the engine's ``workers()`` at each scrape (none for a single engine)."""

    def __init__(self, workers: Callable[[], Sequence[WorkerStats]]) -> None:
        self.workers = workers

    def describe(self) -> list[Metric]:
        return []  # the series exist only while the engine has workers; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        workers = self.workers()
        if not workers:
            return
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "running": _gauge("requests_running", "Generations running on each engine"),
            "waiting": _gauge("requests_waiting", "Requests queued inside each engine"),
            "max_running": _gauge("max_running", "Generations each engine runs at once"),
            "healthy": _gauge("healthy", "1 while the engine is in rotation, 0 once it failed"),
            "conversations": _gauge("conversations", "Conversations whose next turn goes to the engine"),
            "turns": _counter("turns", "Requests routed to each engine"),
            "moved_in": _counter("moved_in", "Turns whose conversation's KV was on another engine"),
            "prompt": _counter("prompt_tokens", "Prompt tokens processed by each engine"),
            "cached": _counter("cached_prompt_tokens", "Prompt tokens each engine took from its KV cache"),
            "generated": _counter("generation_tokens", "Tokens generated by each engine"),
        }
        for worker in workers:
            for key, value in _worker_values(worker).items():
                families[key].add_metric([worker.name], value)
        yield from families.values()


def _worker_values(worker: WorkerStats) -> dict[str, float]:
    stats = worker.stats
    return {
        "running": stats.num_running,
        "waiting": stats.num_waiting,
        "max_running": worker.max_running or 0,
        "healthy": 1.0 if worker.healthy else 0.0,
        "conversations": worker.conversations,
        "turns": worker.turns_total,
        "moved_in": worker.moved_in_total,
        "prompt": stats.num_prompt_tokens_total,
        "cached": stats.num_cached_tokens_total,
        "generated": stats.num_generated_tokens_total,
    }


def _gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"chatstream_engine_{name}", documentation, labels=["engine"])


def _counter(name: str, documentation: str) -> CounterMetricFamily:
    return CounterMetricFamily(f"chatstream_engine_{name}", documentation, labels=["engine"])
