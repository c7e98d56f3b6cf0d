"""Conversation-sticky routing for the engine deployment, as a Ray Serve request router.

A turn goes to the replica that served its conversation's previous turn, where that conversation's KV cache is
kept; a new conversation goes to the least-loaded replica; when the owner is full or gone, the least-loaded other
replica takes the turn (the move is logged and counted) and becomes the owner.

The routing key travels as the ``conversation_id`` keyword argument of the handle call
(``handle.generate.remote(request, conversation_id=...)``); Serve hands it to :meth:`choose_replicas` in the
``PendingRequest``. Calls with a ``pinned_replica`` keyword (operations: a given replica's stats) go to that
replica. The router runs inside the caller's process (the front deployment), one instance per deployment handle.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from chatstream.pool.policy import DEFAULT_MAX_CONVERSATIONS, Ownership, sticky_ranks

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "chatstream.ray.router.ConversationRouter"


class ConversationRouter(RequestRouter):  # type: ignore[misc]  # RequestRouter is Any when ray is not installed
    """Routes each conversation to the replica holding its KV cache; least-loaded for new or displaced ones.

    The rule is the pool's (:mod:`chatstream.pool.policy`), as ranks handed to Serve: ``[[owner], [every other
    replica]]`` for a known conversation, ``[[all replicas]]`` for a new one. Serve takes the least-loaded replica
    (fewest ongoing requests) with a free slot within the first rank that has one, so "owner full" falls through to
    the least-loaded other replica. Within a rank the replicas are ordered by the conversations they own, which
    breaks Serve's ties (it keeps the first of equally loaded replicas): idle replicas share new conversations
    evenly. ``ownership`` maps conversation id to replica id (bounded, least recently used dropped first) and counts
    the conversations that changed replica (``moves``).
    """

    def initialize_state(self, max_conversations: int = DEFAULT_MAX_CONVERSATIONS, **_: Any) -> None:
        """Called by Serve with ``RequestRouterConfig.request_router_kwargs``."""
        self.ownership: Ownership[ReplicaID] = Ownership(max_conversations)

    @property
    def moves(self) -> int:
        return self.ownership.moves

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every replica is full (without it Serve retries at once, in a spin).
            pending_request.routing_context.should_backoff = True
        pinned = _routing_kwarg(pending_request, "pinned_replica")
        if pinned is not None:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            return [chosen or candidate_replicas]
        owner = self.ownership.owner_of(_routing_kwarg(pending_request, "conversation_id"))
        return sticky_ranks(owner, candidate_replicas, _replica_id, self.ownership)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Serve calls this once a replica accepted the request: the replica becomes the conversation's owner."""
        conversation_id = _routing_kwarg(pending_request, "conversation_id")
        previous = self.ownership.record(conversation_id, replica_id)
        if previous is not None:
            logger.info(
                "conversation %s moved from replica %s to %s (%d moves)",
                conversation_id,
                previous.unique_id,
                replica_id.unique_id,
                self.ownership.moves,
            )


def _replica_id(replica: RunningReplica) -> ReplicaID:
    return replica.replica_id


def _routing_kwarg(pending_request: PendingRequest | None, name: str) -> str | None:
    if pending_request is None:
        return None
    value = pending_request.kwargs.get(name)
    return str(value) if value is not None else None
