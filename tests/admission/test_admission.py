"""Admission control: slots, the bounded FIFO line, rejection, Retry-After, drain."""

import asyncio

import pytest

from chatstream.admission.admission import AdmissionController, AdmissionStats, Draining, QueueFull
from chatstream.config import AdmissionConfig


def controller(concurrency: int = 2, queue: int = 3) -> AdmissionController:
    return AdmissionController(AdmissionConfig(max_concurrency=concurrency, max_queue_size=queue))


async def test_grants_up_to_concurrency_then_queues_then_rejects() -> None:
    ctl = controller(2, 3)
    running = [await ctl.acquire() for _ in range(2)]
    waiters = [asyncio.ensure_future(ctl.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert (ctl.num_running, ctl.num_waiting) == (2, 3)
    with pytest.raises(QueueFull) as info:
        await ctl.acquire()
    assert info.value.retry_after >= 1
    assert ctl.stats() == AdmissionStats(num_running=2, num_waiting=3, max_running=2, max_waiting=3)  # not queued
    for slot in running:
        slot.release()
    await asyncio.sleep(0)
    assert sum(w.done() for w in waiters) == 2
    assert (ctl.num_running, ctl.num_waiting) == (2, 1)
    for w in waiters:
        if w.done():
            w.result().release()
    (await waiters[2]).release()
    assert (ctl.num_running, ctl.num_waiting) == (0, 0)


async def test_waiters_are_served_in_arrival_order() -> None:
    ctl = controller(1, 5)
    first = await ctl.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        slot = await ctl.acquire()
        order.append(i)
        await asyncio.sleep(0)
        slot.release()

    tasks = [asyncio.ensure_future(wait(i)) for i in range(5)]
    await asyncio.sleep(0)
    first.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_newcomer_cannot_jump_the_line() -> None:
    ctl = controller(1, 2)
    slot = await ctl.acquire()
    waiter = asyncio.ensure_future(ctl.acquire())
    await asyncio.sleep(0)
    slot.release()  # the slot is handed to the waiter, not left free for a newcomer
    newcomer = asyncio.ensure_future(ctl.acquire())
    await asyncio.sleep(0)
    assert waiter.done() and not newcomer.done()
    waiter.result().release()
    (await newcomer).release()


async def test_cancelled_waiter_leaves_the_line_and_release_is_idempotent() -> None:
    ctl = controller(1, 2)
    slot = await ctl.acquire()
    waiter = asyncio.ensure_future(ctl.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ctl.num_waiting == 0
    slot.release()
    slot.release()
    assert ctl.num_running == 0


async def test_retry_after_grows_with_queue_and_service_time() -> None:
    ctl = controller(1, 10)
    for _ in range(3):
        s = await ctl.acquire()
        s._started -= 4.0  # pretend each generation took 4 s
        s.release()
    assert ctl.retry_after() in (4, 5)  # 4 s plus the few microseconds of the test, rounded up
    held = await ctl.acquire()
    waiters = [asyncio.ensure_future(ctl.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert ctl.retry_after() in (16, 17)  # (3 waiting + 1) rounds of 4 s on one slot
    held.release()
    for w in waiters:
        (await w).release()


async def test_drain_rejects_waiters_and_new_arrivals_and_waits_for_running() -> None:
    ctl = controller(1, 2)
    slot = await ctl.acquire()
    waiter = asyncio.ensure_future(ctl.acquire())
    await asyncio.sleep(0)
    drain = asyncio.ensure_future(ctl.drain(timeout=5))
    await asyncio.sleep(0.01)
    with pytest.raises(Draining):
        await waiter
    with pytest.raises(Draining):
        await ctl.acquire()
    assert not drain.done()
    slot.release()
    assert await drain is True


async def test_drain_times_out_when_a_generation_keeps_running() -> None:
    ctl = controller(1, 0)
    await ctl.acquire()
    assert await ctl.drain(timeout=0.05) is False


async def test_drain_of_an_idle_controller_succeeds_even_with_zero_timeout() -> None:
    ctl = controller(1, 0)
    (await ctl.acquire()).release()
    assert await ctl.drain(timeout=0) is True
