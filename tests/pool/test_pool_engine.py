"""PoolEngine on hand-driven member engines: routing, counters, aborts, and members that fail."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from chatstream.engine.base import Delta, EngineError, EngineOverloaded, FinishReason, GenerationRequest, RequestStream
from chatstream.pool import MemberFailed, PoolConfig, PoolEngine, PoolMember, Routing
from tests.pool.fakes import FakeEngine

_ids = itertools.count()


def request(conversation: str | None = None) -> GenerationRequest:
    return GenerationRequest(f"req-{next(_ids)}", "hi", conversation_id=conversation)


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeEngine]]:
    yield {"a": FakeEngine(), "b": FakeEngine()}


def pool_of(fakes: dict[str, FakeEngine], capacity: int = 2, **config: object) -> PoolEngine:
    pool = PoolEngine([PoolMember(name, engine, capacity) for name, engine in fakes.items()], PoolConfig(**config))  # type: ignore[arg-type]
    pool.start()
    return pool


def member_of(fakes: dict[str, FakeEngine], request_id: str) -> str:
    return next(name for name, engine in fakes.items() if request_id in engine.streams)


async def drain(stream: RequestStream) -> list[Delta]:
    return [delta async for delta in stream]


async def finish(pool: PoolEngine, fakes: dict[str, FakeEngine], req: GenerationRequest) -> list[Delta]:
    """Run ``req`` through the pool, its member answering "ok"."""
    stream = pool.add_request(req)
    name = member_of(fakes, req.request_id)
    fakes[name].say(req.request_id, "ok")
    fakes[name].end(req.request_id)
    return await drain(stream)


async def test_the_turns_of_a_conversation_stay_on_one_engine_and_new_ones_spread(
    fakes: dict[str, FakeEngine],
) -> None:
    pool = pool_of(fakes)
    for _ in range(5):
        deltas = await finish(pool, fakes, request("c1"))
        assert [d.text for d in deltas] == ["ok", ""] and deltas[-1].finish_reason is FinishReason.STOP
    owner = pool.owner_of("c1")
    assert owner is not None and len(fakes[owner].requests) == 5
    for i in range(4):
        await finish(pool, fakes, request(f"new-{i}"))
    workers = {w.name: w for w in pool.workers()}
    assert workers[owner].turns_total == 7 and workers[owner].conversations == 3
    assert sum(w.conversations for w in workers.values()) == 5 and pool.moves == 0
    assert pool.stats().num_generated_tokens_total == 9


async def test_a_full_owner_sends_the_turn_to_the_other_engine_and_the_move_is_counted(
    fakes: dict[str, FakeEngine],
) -> None:
    pool = pool_of(fakes, capacity=1)
    await finish(pool, fakes, request("c1"))
    owner = pool.owner_of("c1")
    busy = pool.add_request(request("c2"))  # the other engine is idle: c2 goes there...
    blocker = request("c3")
    pool.add_request(blocker)  # ...and c3 fills the owner of c1
    assert member_of(fakes, blocker.request_id) == owner
    other_id = next(iter(fakes[next(n for n in fakes if n != owner)].streams))
    fakes[next(n for n in fakes if n != owner)].end(other_id)
    await drain(busy)
    await finish(pool, fakes, request("c1"))
    assert pool.owner_of("c1") != owner and pool.moves == 1
    assert sum(w.moved_in_total for w in pool.workers()) == 1


async def test_round_robin_ignores_the_conversation(fakes: dict[str, FakeEngine]) -> None:
    pool = pool_of(fakes, routing=Routing.ROUND_ROBIN)
    for _ in range(4):
        await finish(pool, fakes, request("c1"))
    assert [len(f.requests) for f in fakes.values()] == [2, 2] and pool.moves == 3


async def test_abort_reaches_the_member_and_ends_the_stream(fakes: dict[str, FakeEngine]) -> None:
    pool = pool_of(fakes)
    req = request("c1")
    stream = pool.add_request(req)
    pool.abort(req.request_id)
    deltas = await drain(stream)
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert req.request_id in fakes[member_of_aborted(fakes, req.request_id)].aborted
    pool.abort("unknown")


def member_of_aborted(fakes: dict[str, FakeEngine], request_id: str) -> str:
    return next(name for name, engine in fakes.items() if request_id in engine.aborted)


async def test_a_member_that_refuses_as_stopped_is_taken_out_and_the_other_serves(
    fakes: dict[str, FakeEngine],
) -> None:
    pool = pool_of(fakes)
    fakes["a"].refuse = EngineError("the engine is not running")
    fakes["b"].refuse = None
    for i in range(3):
        deltas = await finish(pool, fakes, request(f"c{i}"))
        assert deltas[-1].finish_reason is FinishReason.STOP
    workers = {w.name: w for w in pool.workers()}
    assert not workers["a"].healthy and "not running" in (workers["a"].error or "")
    assert workers["b"].healthy and workers["b"].turns_total == 3
    pool.check_health()  # one engine still serves
    fakes["b"].refuse = EngineError("the engine is not running")
    with pytest.raises(EngineError, match="no engine of the pool"):
        pool.add_request(request())
    with pytest.raises(EngineError, match="every engine of the pool failed"):
        pool.check_health()


async def test_an_overloaded_member_passes_the_request_on_and_all_overloaded_is_a_429(
    fakes: dict[str, FakeEngine],
) -> None:
    pool = pool_of(fakes)
    fakes["a"].refuse = EngineOverloaded("full", retry_after=3)
    assert (await finish(pool, fakes, request()))[-1].finish_reason is FinishReason.STOP
    fakes["b"].refuse = EngineOverloaded("full", retry_after=3)
    with pytest.raises(EngineOverloaded):
        pool.add_request(request())
    assert all(w.healthy for w in pool.workers())


async def test_errors_in_a_row_take_a_member_out_its_requests_end_and_unstarted_ones_move(
    fakes: dict[str, FakeEngine],
) -> None:
    pool = pool_of(fakes, capacity=4, max_consecutive_errors=2)
    started, waiting, first, second = (request("c1") for _ in range(4))  # one conversation: all on its owner
    streams = {r.request_id: pool.add_request(r) for r in (started, waiting, first, second)}
    bad = member_of(fakes, started.request_id)
    good = next(name for name in fakes if name != bad)
    assert all(member_of(fakes, r.request_id) == bad for r in (waiting, first, second))
    fakes[bad].say(started.request_id, "partial")
    fakes[bad].end(first.request_id, FinishReason.ERROR, "CUDA error: device lost")
    fakes[bad].end(second.request_id, FinishReason.ERROR, "CUDA error: device lost")
    await asyncio.sleep(0.01)
    assert not {w.name: w for w in pool.workers()}[bad].healthy
    started_deltas = await drain(streams[started.request_id])
    assert started_deltas[0].text == "partial" and started_deltas[-1].finish_reason is FinishReason.ERROR
    assert f"engine {bad} failed and was taken out of rotation" in (started_deltas[-1].error or "")
    fakes[good].end(waiting.request_id)  # nothing had started: it was sent to the other member
    assert (await drain(streams[waiting.request_id]))[-1].finish_reason is FinishReason.STOP


async def test_a_member_whose_health_check_fails_is_found_by_the_watchdog(fakes: dict[str, FakeEngine]) -> None:
    pool = pool_of(fakes, health_check_interval_s=0.05)
    req = request("c1")
    stream = pool.add_request(req)
    name = member_of(fakes, req.request_id)
    fakes[name].say(req.request_id, "partial")
    fakes[name].broken = "the engine thread died"
    deltas = await asyncio.wait_for(drain(stream), 2.0)
    assert deltas[-1].finish_reason is FinishReason.ERROR and "the engine thread died" in (deltas[-1].error or "")
    assert [w.healthy for w in pool.workers()].count(False) == 1


async def test_a_request_whose_member_fails_before_answering_with_no_other_member_is_a_503() -> None:
    fake = FakeEngine()
    pool = PoolEngine([PoolMember("only", fake, 2)], PoolConfig(health_check_interval_s=0.05))
    pool.start()
    stream = pool.add_request(request("c1"))
    fake.broken = "the engine thread died"
    with pytest.raises(MemberFailed, match="engine only failed"):
        await asyncio.wait_for(drain(stream), 2.0)


async def test_the_pool_forwards_what_its_members_want_and_validates_its_members() -> None:
    from chatstream.engine.mock_engine import MockEngine

    assert PoolEngine([PoolMember("m", MockEngine())]).wants_chat_context
    assert not PoolEngine([PoolMember("f", FakeEngine())]).wants_chat_context
    with pytest.raises(ValueError, match="unique"):
        PoolEngine([PoolMember("x", FakeEngine()), PoolMember("x", FakeEngine())])
    with pytest.raises(ValueError, match="at least one"):
        PoolEngine([])
    with pytest.raises(ValueError, match="capacity=0"):
        PoolMember("x", FakeEngine(), 0)
    with pytest.raises(ValueError, match="max_consecutive_errors=0"):
        PoolConfig(max_consecutive_errors=0)


async def test_a_stopped_pool_refuses_and_stops_its_members(fakes: dict[str, FakeEngine]) -> None:
    pool = pool_of(fakes)
    pool.stop()
    assert not any(f.running for f in fakes.values())
    with pytest.raises(EngineError, match="not running"):
        pool.add_request(request())
