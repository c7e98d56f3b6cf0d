"""run_generation: metrics from engines that report token counts only (an upstream sends text, no token ids)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from chatstream.admission.generation import GenerationOutcome, run_generation
from chatstream.admission.metrics import ChatStreamMetrics
from chatstream.engine.base import Delta, EngineError, EngineStats, FinishReason, GenerationRequest, RequestStream


class TextOnlyEngine:
    """Streams the given deltas at once (no token ids), or fails the stream with ``error``."""

    def __init__(self, deltas: list[Delta], error: EngineError | None = None) -> None:
        self.deltas = deltas
        self.error = error
        self.aborted: list[str] = []

    is_running = True

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def add_request(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request.request_id)
        for delta in self.deltas:
            stream.put_nowait(delta)
        if self.error is not None:
            stream.fail(self.error)
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats()


def metric(metrics: ChatStreamMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def drain(deltas: AsyncIterator[Delta]) -> None:
    async for _ in deltas:
        pass


async def test_time_to_first_token_and_inter_token_latency_follow_the_token_count() -> None:
    deltas = [
        Delta("", num_generated_tokens=0),  # e.g. a role chunk: no token yet
        Delta("Hel", num_generated_tokens=1),
        Delta("lo", num_generated_tokens=2),
        Delta("", finish_reason=FinishReason.STOP, num_generated_tokens=2),
    ]
    metrics = ChatStreamMetrics(running=lambda: 0, waiting=lambda: 0)
    outcome = GenerationOutcome()
    engine = TextOnlyEngine(deltas)
    async with aclosing(run_generation(engine, GenerationRequest("r", "p"), metrics, outcome)) as stream:
        await drain(stream)
    assert metric(metrics, "chatstream_time_to_first_token_seconds_count") == 1
    assert metric(metrics, "chatstream_inter_token_latency_seconds_count") == 1
    assert outcome.text == "Hello" and outcome.finish_reason is FinishReason.STOP and not engine.aborted


async def test_an_engine_error_is_recorded_as_an_error_and_raised() -> None:
    metrics = ChatStreamMetrics(running=lambda: 0, waiting=lambda: 0)
    outcome = GenerationOutcome()
    engine = TextOnlyEngine([], EngineError("gone"))
    with pytest.raises(EngineError, match="gone"):
        async with aclosing(run_generation(engine, GenerationRequest("r", "p"), metrics, outcome)) as stream:
            await drain(stream)
    assert outcome.finish_reason is FinishReason.ERROR and outcome.error == "gone"
    assert metrics.registry.get_sample_value("chatstream_requests_finished_total", {"reason": "error"}) == 1
