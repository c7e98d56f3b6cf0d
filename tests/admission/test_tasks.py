"""Waiting on a request's work: a wait the client may abandon, several streams merged; both cancel what is left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatstream.admission import tasks
from chatstream.admission.tasks import await_unless_disconnected, merge_streams, run_unless_disconnected


async def disconnected() -> bool:
    return True


async def test_a_result_that_arrives_as_the_client_leaves_is_handed_back() -> None:
    handed_back: list[str] = []
    work: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def gone_as_the_work_finishes() -> bool:
        work.set_result("slot")  # e.g. a slot granted in the very instant the client is found gone
        return True

    assert await run_unless_disconnected(work, gone_as_the_work_finishes, handed_back.append) is None
    assert handed_back == ["slot"]

    async def ready() -> str:
        return "done"

    assert await run_unless_disconnected(ready(), disconnected, handed_back.append) == "done"
    assert handed_back == ["slot"]


async def test_await_unless_disconnected_awaits_in_the_calling_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "DISCONNECT_POLL_SEC", 0.01)
    here: list[asyncio.Task[object] | None] = []

    async def work() -> str:
        here.append(asyncio.current_task())
        await asyncio.sleep(0.03)  # a few polls of a client that stays
        return "first delta"

    async def present() -> bool:
        return False

    assert await await_unless_disconnected(work(), present) == "first delta"
    assert here == [asyncio.current_task()]
    await asyncio.sleep(0.03)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_await_unless_disconnected_cancels_the_work_when_the_client_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "DISCONNECT_POLL_SEC", 0.01)
    cancelled = asyncio.Event()

    async def endless() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    assert await asyncio.wait_for(await_unless_disconnected(endless(), disconnected), 2) is None
    assert cancelled.is_set() and asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    async def failing() -> str:
        raise ValueError("engine refused")

    with pytest.raises(ValueError, match="engine refused"):
        await await_unless_disconnected(failing(), disconnected)


async def test_await_unless_disconnected_passes_a_cancellation_from_elsewhere_on() -> None:
    started = asyncio.Event()

    async def endless() -> None:
        started.set()
        await asyncio.sleep(10)

    async def present() -> bool:
        return False

    waiting = asyncio.ensure_future(await_unless_disconnected(endless(), present))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_merge_streams_interleaves_closes_and_raises() -> None:
    closed: list[int] = []

    async def numbers(index: int, count: int, fail: bool = False) -> AsyncIterator[int]:
        try:
            for value in range(count):
                await asyncio.sleep(0)
                yield value
            if fail:
                raise RuntimeError(f"stream {index} failed")
        finally:
            closed.append(index)

    items = [item async for item in merge_streams([numbers(0, 3), numbers(1, 2)])]  # type: ignore[list-item]
    assert sorted(items) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and sorted(closed) == [0, 1]
    closed.clear()
    with pytest.raises(RuntimeError, match="stream 1 failed"):
        async for _ in merge_streams([numbers(0, 1000), numbers(1, 1, fail=True)]):  # type: ignore[list-item]
            pass
    assert sorted(closed) == [0, 1]  # the other stream was closed too (its request aborted)
