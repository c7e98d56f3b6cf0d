"""RayEngine against a hand-made deployment handle: relaying, backpressure, replica failures, aborts (no cluster)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from chatstream.engine.base import (
    Delta,
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
)
from chatstream.ray.client import RayEngine
from chatstream.ray.engine_replica import ReplicaTag

pytestmark = pytest.mark.ray

Script = Callable[[GenerationRequest], AsyncIterator[Any]]


class FakeResponse:
    """What ``handle.options(stream=True).generate.remote(...)`` returns: an async iterator with ``cancel``."""

    def __init__(self, items: AsyncIterator[Any]) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.items

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A deployment handle whose calls play the scripts in turn."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.calls: list[dict[str, Any]] = []
        self.responses: list[FakeResponse] = []
        self.generate = self

    def options(self, **_: Any) -> FakeHandle:
        return self

    def remote(self, request: GenerationRequest, **kwargs: Any) -> FakeResponse:
        self.calls.append(kwargs)
        response = FakeResponse(self.scripts.pop(0)(request))
        self.responses.append(response)
        return response


def answer(*texts: str, replica: str = "r1") -> Script:
    async def play(request: GenerationRequest) -> AsyncIterator[Any]:
        yield ReplicaTag(replica, f"actor-{replica}")
        for i, text in enumerate(texts, start=1):
            yield Delta(text, (i,), FinishReason.STOP if i == len(texts) else None, 3, i, 2 if i == len(texts) else 0)

    return play


def failing(error: BaseException, after: int = 0) -> Script:
    async def play(request: GenerationRequest) -> AsyncIterator[Any]:
        yield ReplicaTag("r1", "actor-r1")
        for i in range(after):
            yield Delta(f"t{i}", (i,), None, 3, i + 1)
        raise error

    return play


def endless() -> Script:
    async def play(request: GenerationRequest) -> AsyncIterator[Any]:
        yield ReplicaTag("r1", "actor-r1")
        while True:
            await asyncio.sleep(0.01)
            yield Delta("x", (1,))

    return play


async def run(engine: RayEngine, conversation_id: str | None = "conv") -> list[Delta]:
    engine.start()
    stream = engine.add_request(GenerationRequest(f"req-{uuid.uuid4().hex}", "hi", conversation_id=conversation_id))
    deltas = [delta async for delta in stream]
    await asyncio.sleep(0)  # the relay task ends right after its last delta
    return deltas


async def test_deltas_are_relayed_and_the_routing_key_travels_as_a_keyword() -> None:
    handle = FakeHandle(answer("Hel", "lo"))
    engine = RayEngine(handle)
    deltas = await run(engine)
    assert [d.text for d in deltas] == ["Hel", "lo"] and deltas[-1].finish_reason is FinishReason.STOP
    assert handle.calls == [{"conversation_id": "conv"}]
    assert engine.routing_report()["turns_by_replica"] == {"r1": 1}
    assert engine.stats().num_cached_tokens_total == 2 and engine.stats().num_running == 0


async def test_turns_on_another_replica_count_as_moves() -> None:
    engine = RayEngine(FakeHandle(answer("a", replica="r1"), answer("b", replica="r2"), answer("c", replica="r2")))
    for _ in range(3):
        await run(engine)
    assert engine.moves == 1 and engine.last_replica_of("conv") == "r2"


async def test_backpressure_becomes_engine_overloaded_with_ray_s_retry_after() -> None:
    error = BackPressureError(num_queued_requests=4, max_queued_requests=4, status_code=429, retry_after_s=2.5)
    with pytest.raises(EngineOverloaded) as info:
        await run(RayEngine(FakeHandle(failing(error))))
    assert info.value.retry_after == 3


async def test_a_replica_that_dies_before_answering_is_retried_on_another() -> None:
    handle = FakeHandle(failing(ActorDiedError()), answer("ok", replica="r2"))
    deltas = await run(RayEngine(handle))
    assert [d.text for d in deltas] == ["ok"] and len(handle.calls) == 2


async def test_a_replica_that_dies_mid_stream_ends_the_answer_with_an_error() -> None:
    deltas = await run(RayEngine(FakeHandle(failing(ActorDiedError(), after=2))))
    assert [d.text for d in deltas[:2]] == ["t0", "t1"]
    assert deltas[-1].finish_reason is FinishReason.ERROR and "ActorDiedError" in (deltas[-1].error or "")


async def test_no_first_delta_in_time_is_a_503_not_a_hang() -> None:
    async def silent(request: GenerationRequest) -> AsyncIterator[Any]:
        await asyncio.sleep(10)
        yield None

    with pytest.raises(EngineError, match=r"within 0\.1 s"):
        await run(RayEngine(FakeHandle(silent), first_delta_timeout_s=0.1))


async def test_abort_cancels_the_ray_call_and_ends_the_stream() -> None:
    handle = FakeHandle(endless())
    engine = RayEngine(handle)
    engine.start()
    stream = engine.add_request(GenerationRequest("req-1", "hi"))
    seen: list[Delta] = []
    async for delta in stream:
        seen.append(delta)
        if len(seen) == 3:
            engine.abort("req-1")
    assert seen[-1].finish_reason is FinishReason.ABORT
    assert handle.responses[0].cancelled
    await asyncio.sleep(0)
    assert engine.stats().num_running == 0


async def test_a_stopped_client_refuses_requests() -> None:
    engine = RayEngine(FakeHandle())
    with pytest.raises(EngineError, match="not running"):
        engine.add_request(GenerationRequest("req-1", "hi"))


async def test_workers_are_the_live_replicas_with_their_turns_and_conversations() -> None:
    handle = FakeHandle(answer("a", replica="r1"), answer("b", replica="r2"), failing(ActorDiedError(), after=1))
    engine = RayEngine(handle, max_running_per_replica=4)
    await run(engine, "c1")
    await run(engine, "c2")
    workers = {w.name: w for w in engine.workers()}
    assert set(workers) == {"r1", "r2"} and workers["r1"].max_running == 4
    assert workers["r1"].turns_total == 1 and workers["r1"].conversations == 1
    assert workers["r2"].stats.num_cached_tokens_total == 2
    await run(engine, "c1")  # "r1" of the script dies mid-stream: it leaves the report
    assert {w.name for w in engine.workers()} == {"r2"}
    assert engine.routing_report()["dead_replicas"] == ["r1"]


def test_the_front_builds_mock_requests_when_the_replicas_run_the_mock() -> None:
    from chatstream import ChatStream
    from chatstream.engine.mock_engine import MockRequest

    for mock, expected in ((True, MockRequest), (False, GenerationRequest)):
        engine = RayEngine(FakeHandle(), wants_chat_context=mock)
        chat_stream = ChatStream(engine=engine)
        chat_prompt = chat_stream.service.new_chat_prompt()
        chat_prompt.add_requester_msg("echo me")
        chat_prompt.add_responder_msg(None)
        request = chat_stream.service.requests.build_request(chat_prompt)
        assert type(request) is expected
        if isinstance(request, MockRequest):
            assert request.user_input == "echo me" and request.turn == 1
