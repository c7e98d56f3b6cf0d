"""Fair admission: per-user lines, the fewest-running user first, the longest line gives way, caps, positions."""

import asyncio

import pytest

from chatstream.admission.admission import AdmissionController, Draining, QueueFull, TicketState
from chatstream.admission.fair_queue import FairQueue
from chatstream.config import AdmissionConfig


def controller(concurrency: int = 2, queue: int = 50, **kw: object) -> AdmissionController:
    return AdmissionController(AdmissionConfig(max_concurrency=concurrency, max_queue_size=queue, **kw))  # type: ignore[arg-type]


def test_fair_queue_serves_fewest_running_then_least_recently_served() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.push("a", f"a{i}")
    assert queue.pop_next() == ("a", "a0") and queue.pop_next() == ("a", "a1")
    queue.push("b", "b0")
    queue.push("c", "c0")
    assert queue.service_order() == ["b0", "c0", "a2", "a3", "a4"]
    assert queue.pop_next() == ("b", "b0")
    assert queue.pop_next() == ("c", "c0")
    queue.finished("a")
    assert queue.pop_next(cap=1) is None  # a has one running: at the cap
    assert queue.pop_next(cap=2) == ("a", "a2")
    assert queue.pop_next(cap=2) is None
    assert len(queue) == 2 and queue.num_waiting("a") == 2 and queue.num_running("a") == 2


def test_fair_queue_round_robin_among_equals() -> None:
    queue: FairQueue[str] = FairQueue()
    for user in ("a", "b"):
        for i in range(3):
            queue.push(user, f"{user}{i}")
    assert queue.service_order() == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert [queue.pop_next() for _ in range(2)] == [("a", "a0"), ("b", "b0")]


async def test_burst_of_one_user_does_not_starve_another() -> None:
    ctl = controller(2, 50)
    order: list[str] = []

    async def run(user: str, name: str) -> None:
        slot = await ctl.acquire(user)
        order.append(name)
        await asyncio.sleep(0.01)
        slot.release()

    burst = [asyncio.ensure_future(run("a", f"a{i}")) for i in range(40)]
    await asyncio.sleep(0)
    assert (ctl.num_running, ctl.num_waiting) == (2, 38)
    single = asyncio.ensure_future(run("b", "b"))
    await asyncio.gather(*burst, single)
    assert order.index("b") == 2  # the first slot freed after b arrived
    assert [name for name in order if name != "b"] == [f"a{i}" for i in range(40)]  # a's own order is kept


async def test_fifo_when_fairness_is_off() -> None:
    ctl = controller(1, 10, fair=False)
    first = await ctl.acquire("a")
    a_waiting = ctl.enqueue("a")
    b_waiting = ctl.enqueue("b")
    first.release()
    assert a_waiting.admitted and not b_waiting.admitted
    a_waiting.close()
    assert b_waiting.admitted
    b_waiting.close()


async def test_full_line_the_longest_gives_way() -> None:
    ctl = controller(1, 3)
    running = await ctl.acquire("a")
    a_tickets = [ctl.enqueue("a") for _ in range(3)]
    with pytest.raises(QueueFull):
        ctl.enqueue("a")  # a's own line is the longest: a is refused
    b_ticket = ctl.enqueue("b")
    assert a_tickets[-1].state is TicketState.REJECTED  # a's newest request made room
    with pytest.raises(QueueFull):
        await a_tickets[-1].wait()
    assert ctl.num_waiting == 3
    with pytest.raises(QueueFull):
        ctl.enqueue("b")  # b has 1 waiting, a 2: no longer more than one apart
    running.release()
    assert b_ticket.admitted
    for ticket in (b_ticket, *a_tickets):
        ticket.close()
    assert (ctl.num_running, ctl.num_waiting) == (0, 0)


async def test_hard_cap_per_user() -> None:
    ctl = controller(4, 10, max_running_per_user=2)
    slots = [await ctl.acquire("a") for _ in range(2)]
    third = ctl.enqueue("a")
    assert not third.admitted and ctl.num_running == 2  # a slot stays idle: a is at its cap
    other = ctl.enqueue("b")
    assert other.admitted
    slots[0].release()
    assert third.admitted
    for ticket in (third, other):
        ticket.close()
    slots[1].release()
    assert ctl.num_running == 0


async def test_positions_follow_the_line() -> None:
    ctl = controller(1, 10)
    running = await ctl.acquire("a")
    tickets = [ctl.enqueue("a", ticket_id=f"t{i}") for i in range(3)]
    assert [t.position() for t in tickets] == [1, 2, 3]
    assert ctl.find_ticket("t2") is tickets[2]
    newcomer = ctl.enqueue("b")
    assert newcomer.position() == 1 and tickets[0].position() == 2  # b has nothing running: served first
    seen: list[int] = []

    async def follow() -> None:
        async for position in tickets[2].positions():
            seen.append(position)

    follower = asyncio.ensure_future(follow())
    await asyncio.sleep(0)
    served: list[object] = []
    for _ in range(4):
        running.release()
        await asyncio.sleep(0)
        admitted = next(t for t in (newcomer, *tickets) if t.admitted and t not in served)
        served.append(admitted)
        running = admitted.slot  # type: ignore[assignment]
    await follower
    assert seen == [4, 3, 2, 1]
    assert served == [newcomer, *tickets]
    assert ctl.find_ticket("t2") is None
    running.release()
    assert ctl.num_running == 0


async def test_cancelled_waiter_and_closed_ticket_leave() -> None:
    ctl = controller(1, 5)
    slot = await ctl.acquire("a")
    waiter = asyncio.ensure_future(ctl.acquire("b"))
    ticket = ctl.enqueue("c", ticket_id="x")
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    ticket.close()
    ticket.close()
    assert ctl.num_waiting == 0 and ctl.find_ticket("x") is None
    slot.release()
    assert ctl.num_running == 0


async def test_drain_rejects_waiting_tickets() -> None:
    ctl = controller(1, 5)
    slot = await ctl.acquire("a")
    ticket = ctl.enqueue("b")
    drained = asyncio.ensure_future(ctl.drain(5.0))
    await asyncio.sleep(0)
    with pytest.raises(Draining):
        await ticket.wait()
    with pytest.raises(Draining):
        ctl.enqueue("c")
    slot.release()
    assert await drained
