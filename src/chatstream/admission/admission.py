"""Admission control: a fixed number of concurrent generations and a bounded waiting line, fair across users.

A request takes a :class:`Ticket`. It runs at once (the ticket holds a :class:`Slot`), waits in line, or, when
``max_queue_size`` requests already wait, is rejected at once with :class:`QueueFull`. The line is a
:class:`~chatstream.admission.fair_queue.FairQueue`: a freed slot goes to the waiting user with the fewest generations
running, so one user's burst cannot starve another user's single request. When the line is full, a newcomer whose
user has fewer requests waiting than the user with the most takes the place of that user's newest request (which gets
QueueFull): the longest line gives way. The totals stay exact: at most ``max_concurrency`` running, at most
``max_queue_size`` waiting.

A waiting ticket knows its place in line (:meth:`Ticket.position`) and can follow it (:meth:`Ticket.positions`).
Everything runs on the event loop; no locks are needed.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chatstream.admission.fair_queue import FairQueue
from chatstream.config import AdmissionConfig

DEFAULT_USER = ""
"""The user of requests that name none (all of them share one line, first come, first served)."""


class QueueFull(Exception):
    """The waiting line is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many requests; retry after {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


class Slot:
    """The right to run one generation. Release it exactly once (extra calls are ignored)."""

    def __init__(self, controller: AdmissionController, user: str, queue_time: float) -> None:
        self._controller = controller
        self.user = user
        self.queue_time = queue_time
        self._started = time.monotonic()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._controller._on_release(self.user, time.monotonic() - self._started)


class TicketState(enum.Enum):
    """Where a ticket stands."""

    WAITING = "waiting"
    ADMITTED = "admitted"
    REJECTED = "rejected"
    LEFT = "left"


class Ticket:
    """One request's place in line, then its slot. :meth:`close` it when done, whatever happened."""

    def __init__(self, controller: AdmissionController, user: str, ticket_id: str | None) -> None:
        self._controller = controller
        self.user = user
        self.ticket_id = ticket_id
        self.arrived = time.monotonic()
        self.state = TicketState.WAITING
        self.slot: Slot | None = None
        self.error: QueueFull | Draining | None = None
        self._decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def admitted(self) -> bool:
        return self.slot is not None

    def position(self) -> int | None:
        """The place in line while waiting (1: served next, as far as can be told now), else None."""
        if self.state is not TicketState.WAITING:
            return None
        return self._controller._position_of(self)

    async def wait(self) -> Slot:
        """The slot, once admitted. Raises QueueFull (pushed out of a full line) or Draining; when the caller is
        cancelled while waiting, the ticket leaves the line (or gives back a slot granted in that instant)."""
        try:
            await self._decided
        except asyncio.CancelledError:
            self.close()
            raise
        return self._result()

    async def positions(self) -> AsyncIterator[int]:
        """The place in line now and each time it changes; ends when admitted. Raises as :meth:`wait` does."""
        last: int | None = None
        while self.state is TicketState.WAITING:
            position = self.position()
            if position is not None and position != last:
                last = position
                yield position
            await self._controller.changed()
        self._result()

    def close(self) -> None:
        """Release the slot, or leave the line; idempotent."""
        if self.slot is not None:
            self.slot.release()
        elif self.state is TicketState.WAITING:
            self._controller._leave(self)

    def _result(self) -> Slot:
        if self.slot is not None:
            return self.slot
        raise self.error if self.error is not None else Draining()

    def _decide(self, state: TicketState, slot: Slot | None = None, error: QueueFull | Draining | None = None) -> None:
        self.state, self.slot, self.error = state, slot, error
        if not self._decided.done():
            self._decided.set_result(None)


@dataclass(frozen=True)
class AdmissionStats:
    """A snapshot for /get_load."""

    num_running: int
    num_waiting: int
    max_running: int
    max_waiting: int


class AdmissionController:
    """Hands out at most ``max_concurrency`` slots; up to ``max_queue_size`` tickets wait for one, fairly."""

    _SERVICE_TIME_WINDOW = 32

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._num_running = 0
        self._queue: FairQueue[Ticket] = FairQueue()
        self._by_id: dict[str, Ticket] = {}
        self._order: dict[Ticket, int] | None = None
        self._changed = asyncio.Event()
        self._service_times: collections.deque[float] = collections.deque(maxlen=self._SERVICE_TIME_WINDOW)
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def draining(self) -> bool:
        return self._draining

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            num_running=self._num_running,
            num_waiting=len(self._queue),
            max_running=self.config.max_concurrency,
            max_waiting=self.config.max_queue_size,
        )

    def enqueue(self, user: str = DEFAULT_USER, ticket_id: str | None = None) -> Ticket:
        """A ticket: already admitted when a slot is free for ``user``, else waiting in line. Raises QueueFull at
        once when the line is full (and ``user`` cannot take another user's place), Draining on shutdown.
        ``ticket_id`` lets :meth:`find_ticket` find the ticket while it waits."""
        if self._draining:
            raise Draining()
        user = user if self.config.fair else DEFAULT_USER
        ticket = Ticket(self, user, ticket_id)
        if len(self._queue) >= self.config.max_queue_size and not self._can_start_now(user):
            self._make_room(user)
        self._queue.push(user, ticket)
        if ticket_id:
            self._by_id[ticket_id] = ticket
        self._dispatch()
        return ticket

    async def acquire(self, user: str = DEFAULT_USER, ticket_id: str | None = None) -> Slot:
        """A slot now, or after waiting in line (see :meth:`enqueue` and :meth:`Ticket.wait`)."""
        return await self.enqueue(user, ticket_id).wait()

    def find_ticket(self, ticket_id: str) -> Ticket | None:
        """The waiting ticket with this id, or None (unknown, admitted or gone)."""
        return self._by_id.get(ticket_id)

    async def changed(self) -> None:
        """Return at the next change of the line (a ticket joined, left, was admitted or rejected)."""
        await self._changed.wait()

    def retry_after(self) -> int:
        """Seconds after which a rejected client may reasonably retry: the time for the line ahead to drain,
        estimated from recent service times (median), at least 1."""
        service = self._median_service_time()
        rounds = (len(self._queue) + 1) / self.config.max_concurrency
        return max(1, math.ceil(service * rounds))

    async def drain(self, timeout: float) -> bool:
        """Stop admitting, reject the waiting line, then wait up to ``timeout`` s for running generations.
        True when everything finished in time."""
        self._draining = True
        for ticket in self._queue.drain():
            self._forget(ticket)
            ticket._decide(TicketState.REJECTED, error=Draining())
        self._notify()
        if self._num_running == 0:
            self._idle.set()
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ----- internals -----

    def _cap(self) -> int | None:
        return self.config.max_running_per_user if self.config.fair else None

    def _can_start_now(self, user: str) -> bool:
        cap = self._cap()
        return self._num_running < self.config.max_concurrency and (cap is None or self._queue.num_running(user) < cap)

    def _make_room(self, user: str) -> None:
        """Push out the newest request of the user with the longest line, or raise QueueFull for ``user``."""
        longest = self._queue.longest()
        if longest is None or longest[0] == user or longest[1] <= self._queue.num_waiting(user) + 1:
            raise QueueFull(self.retry_after())
        pushed_out = self._queue.pop_newest(longest[0])
        self._forget(pushed_out)
        pushed_out._decide(TicketState.REJECTED, error=QueueFull(self.retry_after()))

    def _dispatch(self) -> None:
        while self._num_running < self.config.max_concurrency:
            picked = self._queue.pop_next(self._cap())
            if picked is None:
                break
            ticket = picked[1]
            self._forget(ticket)
            if ticket._decided.cancelled():  # its caller was cancelled: it has left already
                self._queue.finished(ticket.user)
                ticket.state = TicketState.LEFT
                continue
            self._num_running += 1
            self._idle.clear()
            ticket._decide(TicketState.ADMITTED, slot=Slot(self, ticket.user, time.monotonic() - ticket.arrived))
        self._notify()

    def _leave(self, ticket: Ticket) -> None:
        self._queue.remove(ticket.user, ticket)
        self._forget(ticket)
        ticket.state = TicketState.LEFT
        self._notify()

    def _forget(self, ticket: Ticket) -> None:
        if ticket.ticket_id and self._by_id.get(ticket.ticket_id) is ticket:
            del self._by_id[ticket.ticket_id]

    def _on_release(self, user: str, service_time: float) -> None:
        self._service_times.append(service_time)
        self._num_running -= 1
        self._queue.finished(user)
        self._dispatch()
        if self._num_running == 0:
            self._idle.set()

    def _notify(self) -> None:
        self._order = None
        self._changed.set()
        self._changed = asyncio.Event()

    def _position_of(self, ticket: Ticket) -> int | None:
        if self._order is None:
            order = self._queue.service_order()
            self._order = {t: index + 1 for index, t in enumerate(order)}
        return self._order.get(ticket)

    def _median_service_time(self) -> float:
        if not self._service_times:
            return 1.0
        ordered = sorted(self._service_times)
        return ordered[len(ordered) // 2]
