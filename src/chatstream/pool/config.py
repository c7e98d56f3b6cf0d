"""What a pool is made of (its member engines) and how it routes and handles failures: validated, frozen values."""

from __future__ import annotations

from dataclasses import dataclass

from chatstream.engine.base import Engine
from chatstream.pool.policy import DEFAULT_MAX_CONVERSATIONS, Routing


@dataclass(frozen=True)
class PoolMember:
    """One engine of a pool.

    Attributes:
        name: unique within the pool (e.g. its device, "cuda:1"); the ``engine`` label in /metrics and /get_load.
        engine: the engine (started and stopped by the pool).
        capacity: the generations it runs at once (its batch size); beyond that it counts as full.
    """

    name: str
    engine: Engine
    capacity: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a pool member needs a non-empty name")
        if self.capacity < 1:
            raise ValueError(f"capacity={self.capacity!r} of pool member {self.name!r} must be >= 1")


@dataclass(frozen=True)
class PoolConfig:
    """How a pool routes requests and when it takes a member out of rotation.

    Attributes:
        routing: sticky (the default), least-loaded or round-robin (the last two for comparisons).
        max_consecutive_errors: a member whose requests end with an error this many times in a row is taken out.
        health_check_interval_s: how often running requests' members are checked (``check_health``).
        max_conversations: conversations whose owner the pool remembers (least recently used forgotten first).
    """

    routing: Routing = Routing.STICKY
    max_consecutive_errors: int = 3
    health_check_interval_s: float = 1.0
    max_conversations: int = DEFAULT_MAX_CONVERSATIONS

    def __post_init__(self) -> None:
        if self.max_consecutive_errors < 1:
            raise ValueError(f"max_consecutive_errors={self.max_consecutive_errors!r} must be >= 1")
        if not self.health_check_interval_s > 0:
            raise ValueError(f"health_check_interval_s={self.health_check_interval_s!r} must be > 0")
        if self.max_conversations < 1:
            raise ValueError(f"max_conversations={self.max_conversations!r} must be >= 1")
