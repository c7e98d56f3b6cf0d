"""Conversation-sticky routing as a small pure policy, shared by the in-process pool and the Ray request router.

A conversation's turn goes to the worker that served its previous turn (its KV cache is there) while that worker has
a free slot; a new conversation, or one whose worker is full or gone, goes to the least-loaded worker, which becomes
its owner (the move is counted). Ties go to the worker that owns the fewest conversations, so idle workers share new
conversations evenly. Nothing here knows engines, HTTP or Ray: workers are plain hashable keys.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

DEFAULT_MAX_CONVERSATIONS = 100_000


class Routing(enum.Enum):
    """How a pool picks the engine of a request."""

    STICKY = "sticky"
    """The conversation's owner while it has a free slot, else the least loaded (the default)."""
    LEAST_LOADED = "least_loaded"
    """The least-loaded engine, whoever served the conversation before (for comparisons)."""
    ROUND_ROBIN = "round_robin"
    """The engines in turn (for comparisons)."""


class Ownership(Generic[K]):
    """Which worker owns each conversation: the one that served its latest turn.

    Bounded: beyond ``max_conversations`` the least recently used conversation is forgotten (its next turn counts as
    new). ``moves`` counts the turns that went to another worker than the owner.
    """

    def __init__(self, max_conversations: int = DEFAULT_MAX_CONVERSATIONS) -> None:
        if max_conversations < 1:
            raise ValueError(f"max_conversations={max_conversations!r} must be >= 1")
        self.max_conversations = max_conversations
        self.owners: OrderedDict[str, K] = OrderedDict()
        self.owned: Counter[K] = Counter()
        self.moves = 0

    def __len__(self) -> int:
        return len(self.owners)

    def owner_of(self, conversation_id: str | None) -> K | None:
        """The worker that served the conversation's latest turn (None: new, forgotten, or no conversation)."""
        return None if conversation_id is None else self.owners.get(conversation_id)

    def record(self, conversation_id: str | None, worker: K) -> K | None:
        """``worker`` serves this turn and owns the conversation from now on. Returns the previous owner when the
        conversation moved (counted in ``moves``), else None."""
        if conversation_id is None:
            return None
        previous = self.owners.get(conversation_id)
        if previous != worker:
            self.owned[worker] += 1
            if previous is not None:
                self.owned[previous] -= 1
                self.moves += 1
        self.owners[conversation_id] = worker
        self.owners.move_to_end(conversation_id)
        while len(self.owners) > self.max_conversations:
            _, dropped = self.owners.popitem(last=False)
            self.owned[dropped] -= 1
        return previous if previous is not None and previous != worker else None

    def fewest_owned_first(self, candidates: Sequence[T], key: Callable[[T], K]) -> list[T]:
        """``candidates`` ordered by the conversations their workers own (stable: equal ones keep their order)."""
        return sorted(candidates, key=lambda c: self.owned[key(c)])


@dataclass(frozen=True)
class Candidate(Generic[K]):
    """A worker that may take a request now.

    Attributes:
        key: the worker.
        load: requests it runs or holds now.
        capacity: requests it runs at once (its batch size).
    """

    key: K
    load: int
    capacity: int

    @property
    def has_free_slot(self) -> bool:
        return self.load < self.capacity

    @property
    def load_fraction(self) -> float:
        return self.load / max(self.capacity, 1)


def choose_sticky(owner: K | None, candidates: Sequence[Candidate[K]], ownership: Ownership[K]) -> K | None:
    """The pool's rule: the owner while it has a free slot; else the least-loaded candidate with a free slot (the
    fewest owned conversations first on ties); when every candidate is full, the owner if it is one (the request
    waits where its KV is), else the least loaded. None without candidates."""
    if not candidates:
        return None
    by_key = {c.key: c for c in candidates}
    if owner is not None and owner in by_key and by_key[owner].has_free_slot:
        return owner
    free = [c for c in candidates if c.has_free_slot]
    if not free and owner is not None and owner in by_key:
        return owner
    return least_loaded(free or candidates, ownership)


def least_loaded(candidates: Sequence[Candidate[K]], ownership: Ownership[K]) -> K:
    """The candidate with the smallest share of its capacity in use (the fewest owned conversations on ties)."""
    ordered = ownership.fewest_owned_first(candidates, lambda c: c.key)
    return min(ordered, key=lambda c: c.load_fraction).key


def sticky_ranks(
    owner: K | None, candidates: Sequence[T], key: Callable[[T], K], ownership: Ownership[K]
) -> list[list[T]]:
    """The same rule as ranks for a router that picks the least loaded with a free slot within the first rank that
    has one (Ray Serve's): ``[[owner], [the others]]`` for a known conversation, ``[all]`` otherwise; within a rank,
    the fewest owned conversations first."""
    ordered = ownership.fewest_owned_first(candidates, key)
    first = [c for c in ordered if owner is not None and key(c) == owner]
    if not first:
        return [ordered]
    others = [c for c in ordered if key(c) != owner]
    return [first, others] if others else [first]


class RoundRobin(Generic[K]):
    """The candidates in turn (a comparison baseline: it ignores both load and conversations)."""

    def __init__(self) -> None:
        self._counter: Iterator[int] = itertools.count()

    def choose(self, candidates: Sequence[Candidate[K]]) -> K | None:
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)].key
