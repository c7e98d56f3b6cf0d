"""Waiting on a request's work: a wait the client may abandon, several streams merged; both cancel what is left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatstream.admission.tasks import merge_streams, run_unless_disconnected


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
