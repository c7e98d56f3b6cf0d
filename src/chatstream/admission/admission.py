"""Admission control: a fixed number of concurrent generations and a bounded FIFO waiting queue.

A request either gets a :class:`Slot` at once, waits in line for one, or (when ``max_queue_size`` requests already
wait) is rejected at once with :class:`QueueFull`. Everything runs on the event loop; no locks are needed.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass

from chatstream.config import AdmissionConfig


class QueueFull(Exception):
    """The waiting queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many requests; retry after {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


class Slot:
    """The right to run one generation. Release it exactly once (extra calls are ignored)."""

    def __init__(self, controller: AdmissionController, queue_time: float) -> None:
        self._controller = controller
        self.queue_time = queue_time
        self._started = time.monotonic()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._controller._on_release(time.monotonic() - self._started)


@dataclass(frozen=True)
class AdmissionStats:
    """A snapshot for /get_load."""

    num_running: int
    num_waiting: int
    max_running: int
    max_waiting: int


class AdmissionController:
    """Hands out at most ``max_concurrency`` slots; up to ``max_queue_size`` callers wait for one, in order."""

    _SERVICE_TIME_WINDOW = 32

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._num_running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._service_times: collections.deque[float] = collections.deque(maxlen=self._SERVICE_TIME_WINDOW)
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    @property
    def draining(self) -> bool:
        return self._draining

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            num_running=self._num_running,
            num_waiting=len(self._waiters),
            max_running=self.config.max_concurrency,
            max_waiting=self.config.max_queue_size,
        )

    async def acquire(self) -> Slot:
        """A slot now, or after waiting in line. Raises QueueFull at once when the line is full, Draining on
        shutdown. Cancelling the caller while it waits removes it from the line."""
        if self._draining:
            raise Draining()
        arrived = time.monotonic()
        if self._num_running < self.config.max_concurrency and not self._waiters:
            return self._grant(arrived)
        if len(self._waiters) >= self.config.max_queue_size:
            raise QueueFull(self.retry_after())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._num_running -= 1  # we were granted a slot in the same instant; give it on
                self._wake_next()
            else:
                self._waiters.remove(waiter)
            raise
        if self._draining:
            self._num_running -= 1
            self._wake_next()
            raise Draining()
        return self._grant(arrived, counted=True)

    def retry_after(self) -> int:
        """Seconds after which a rejected client may reasonably retry: the time for the queue ahead to drain,
        estimated from recent service times (median), at least 1."""
        service = self._median_service_time()
        rounds = (len(self._waiters) + 1) / self.config.max_concurrency
        return max(1, math.ceil(service * rounds))

    async def drain(self, timeout: float) -> bool:
        """Stop admitting, reject the waiting line, then wait up to ``timeout`` s for running generations.
        True when everything finished in time."""
        self._draining = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._num_running += 1  # the woken waiter sees draining and gives this back
                waiter.set_result(None)
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _grant(self, arrived: float, counted: bool = False) -> Slot:
        if not counted:
            self._num_running += 1
        self._idle.clear()
        return Slot(self, queue_time=time.monotonic() - arrived)

    def _on_release(self, service_time: float) -> None:
        self._service_times.append(service_time)
        self._num_running -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters and self._num_running < self.config.max_concurrency:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._num_running += 1  # handed over directly, so no newcomer can jump the line
            waiter.set_result(None)
        if self._num_running == 0 and not self._waiters:
            self._idle.set()

    def _median_service_time(self) -> float:
        if not self._service_times:
            return 1.0
        ordered = sorted(self._service_times)
        return ordered[len(ordered) // 2]
