"""The retention policy, its pure selection, and the background loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from chatstream.sessions.base import run_retention
from chatstream.sessions.retention import RetentionPolicy, expired_ids
from chatstream.sessions.store import MemoryStore
from tests.sessions.support import START, conversation


def test_expired_ids_by_age_and_by_rank() -> None:
    recent = [("a", 100.0), ("b", 300.0), ("c", 200.0), ("d", 50.0)]
    assert expired_ids(recent, RetentionPolicy(max_age_seconds=120), now=310.0) == ["a", "d"]
    assert expired_ids(recent, RetentionPolicy(max_per_owner=2), now=310.0) == ["a", "d"]
    assert expired_ids(recent, RetentionPolicy(max_age_seconds=1000, max_per_owner=3), now=310.0) == ["d"]
    assert expired_ids(recent, RetentionPolicy(), now=310.0) == []


@pytest.mark.parametrize(("kwargs", "needle"), [({"max_age_seconds": 0}, "max_age"), ({"max_per_owner": 0}, "max_per")])
def test_bad_policies(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


async def test_the_loop_sweeps_until_cancelled_and_survives_a_failed_sweep(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(wall_clock=lambda: START)
    await store.conversations.create(conversation(updated_at=START - 100))
    sweeps: list[int] = []
    real_sweep = store.conversations.sweep

    async def flaky_sweep(policy: RetentionPolicy, *, now: float | None = None) -> int:
        sweeps.append(len(sweeps))
        if len(sweeps) == 1:
            raise OSError("disk unplugged")
        return await real_sweep(policy, now=now)

    store.conversations.sweep = flaky_sweep  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="chatstream.sessions.base"):
        task = asyncio.create_task(run_retention(store, RetentionPolicy(max_age_seconds=10), interval_seconds=0.01))
        while len(sweeps) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "retention sweep of memory" in caplog.text and "disk unplugged" in caplog.text
    assert "deleted 1 conversation(s)" in caplog.text and len(store.conversations) == 0
    with pytest.raises(ValueError, match="interval"):
        await run_retention(store, RetentionPolicy(), interval_seconds=0)
