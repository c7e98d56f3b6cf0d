"""FairQueue: the waiting requests of every user, one line per user, served fairly across users.

Which request runs next when a slot frees: among the users with requests waiting (and under their cap, when one is
set), the user with the fewest generations running goes first; users with as many running take turns, the one served
least recently first (round-robin). Within one user's line, requests keep their arrival order. So a user who sent 40
requests at once gets them served one after another, while another user's single request gets the next free slot.

Pure data structure: no asyncio, no clock; the admission controller owns it and tells it when a generation ends.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class FairQueue(Generic[T]):
    """Items waiting per user, and how many each user has running.

    A user is remembered while it has items waiting or running: its running count and when it was last served
    (the round-robin order among users with as many running).
    """

    def __init__(self) -> None:
        self._lines: dict[str, collections.deque[T]] = {}
        self._running: collections.Counter[str] = collections.Counter()
        self._served_at: dict[str, int] = {}
        self._clock = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def num_waiting(self, user: str) -> int:
        """How many items ``user`` has waiting."""
        line = self._lines.get(user)
        return len(line) if line is not None else 0

    def num_running(self, user: str) -> int:
        """How many of ``user``'s items are running (served and not yet finished)."""
        return self._running.get(user, 0)

    def push(self, user: str, item: T) -> None:
        """Put ``item`` at the end of ``user``'s line."""
        self._lines.setdefault(user, collections.deque()).append(item)
        self._size += 1

    def remove(self, user: str, item: T) -> bool:
        """Take ``item`` out of ``user``'s line; False when it was not there."""
        line = self._lines.get(user)
        if line is None or item not in line:
            return False
        line.remove(item)
        self._size -= 1
        self._tidy(user)
        return True

    def pop_next(self, cap: int | None = None) -> tuple[str, T] | None:
        """Serve the next item: it counts as running for its user until :meth:`finished`. None when no user under
        ``cap`` has one waiting. The user with the fewest running goes first, then the one served least recently."""
        candidates = [u for u in self._lines if cap is None or self._running.get(u, 0) < cap]
        if not candidates:
            return None
        user = min(candidates, key=self._priority)
        line = self._lines[user]
        item = line.popleft()
        self._size -= 1
        self._running[user] += 1
        self._clock += 1
        self._served_at[user] = self._clock
        self._tidy(user)
        return user, item

    def finished(self, user: str) -> None:
        """One of ``user``'s running items has ended."""
        self._running[user] -= 1
        if self._running[user] <= 0:
            del self._running[user]
        self._tidy(user)

    def pop_newest(self, user: str) -> T:
        """Take the most recent item out of ``user``'s line (to make room for another user's request)."""
        item = self._lines[user].pop()
        self._size -= 1
        self._tidy(user)
        return item

    def longest(self) -> tuple[str, int] | None:
        """The user with the most items waiting, and how many (None when nothing waits)."""
        if not self._lines:
            return None
        user = max(self._lines, key=lambda u: len(self._lines[u]))
        return user, len(self._lines[user])

    def drain(self) -> list[T]:
        """Remove and return every waiting item."""
        items = [item for line in self._lines.values() for item in line]
        for user in list(self._lines):
            self._lines[user].clear()
            self._tidy(user)
        self._size = 0
        return items

    def service_order(self) -> list[T]:
        """Every waiting item in the order :meth:`pop_next` would serve them if nothing finished meanwhile
        (an estimate of each request's place in line; caps are left out)."""
        heap = [(*self._priority(user), user) for user in self._lines]
        heapq.heapify(heap)
        taken: dict[str, int] = {}
        order: list[T] = []
        clock = self._clock
        while heap:
            running, _, user = heapq.heappop(heap)
            index = taken.get(user, 0)
            line = self._lines[user]
            order.append(line[index])
            taken[user] = index + 1
            clock += 1
            if index + 1 < len(line):
                heapq.heappush(heap, (running + 1, clock, user))
        return order

    def _priority(self, user: str) -> tuple[int, int]:
        return self._running.get(user, 0), self._served_at.get(user, 0)

    def _tidy(self, user: str) -> None:
        line = self._lines.get(user)
        if line is not None and not line:
            del self._lines[user]
        if user not in self._lines and user not in self._running:
            self._served_at.pop(user, None)
