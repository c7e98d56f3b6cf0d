"""Retention: how long conversations are kept.

The loop that applies a policy now and then is :func:`chatstream.sessions.base.run_retention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RetentionPolicy", "expired_ids"]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which conversations a sweep deletes.

    Attributes:
        max_age_seconds: a conversation not updated for this long is deleted; None keeps conversations of any age.
        max_per_owner: each owner keeps at most this many conversations, the most recently updated ones; None: no
            limit.

    Expired sessions are deleted by every sweep as well.
    """

    max_age_seconds: float | None = None
    max_per_owner: int | None = None

    def __post_init__(self) -> None:
        if self.max_age_seconds is not None and not self.max_age_seconds > 0:
            raise ValueError(f"max_age_seconds must be positive or None, got {self.max_age_seconds!r}")
        if self.max_per_owner is not None and self.max_per_owner < 1:
            raise ValueError(f"max_per_owner must be at least 1 or None, got {self.max_per_owner!r}")

    @property
    def keeps_everything(self) -> bool:
        return self.max_age_seconds is None and self.max_per_owner is None


def expired_ids(recent: Sequence[tuple[str, float]], policy: RetentionPolicy, now: float) -> list[str]:
    """Which of one owner's conversations, given as ``(id, updated_at)`` pairs, ``policy`` no longer keeps: those
    not updated for ``max_age_seconds`` and those beyond the newest ``max_per_owner``."""
    newest_first = sorted(recent, key=lambda pair: (pair[1], pair[0]), reverse=True)
    cutoff = now - policy.max_age_seconds if policy.max_age_seconds is not None else None
    keep = policy.max_per_owner if policy.max_per_owner is not None else len(newest_first)
    return [
        conversation_id
        for rank, (conversation_id, updated_at) in enumerate(newest_first)
        if rank >= keep or (cutoff is not None and updated_at < cutoff)
    ]
