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
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "chatstream.ray.router.ConversationRouter"
DEFAULT_MAX_CONVERSATIONS = 100_000


class ConversationRouter(RequestRouter):  # type: ignore[misc]  # RequestRouter is Any when ray is not installed
    """Routes each conversation to the replica holding its KV cache; least-loaded for new or displaced ones.

    Ranks handed to Serve: ``[[owner], [every other replica]]`` for a known conversation, ``[[all replicas]]``
    for a new one. Serve takes the least-loaded replica (fewest ongoing requests) with a free slot within the
    first rank that has one, so "owner full" falls through to the least-loaded other replica. Within a rank the
    replicas are ordered by the conversations they own, which breaks Serve's ties (it keeps the first of equally
    loaded replicas): idle replicas share new conversations evenly. ``moves`` counts conversations that changed
    replica; ``owners`` maps conversation id to replica id (bounded, least recently used dropped first).
    """

    def initialize_state(self, max_conversations: int = DEFAULT_MAX_CONVERSATIONS, **_: Any) -> None:
        """Called by Serve with ``RequestRouterConfig.request_router_kwargs``."""
        if max_conversations < 1:
            raise ValueError(f"max_conversations={max_conversations!r} must be >= 1")
        self.max_conversations = max_conversations
        self.owners: OrderedDict[str, ReplicaID] = OrderedDict()
        self.owned: Counter[ReplicaID] = Counter()
        self.moves = 0

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
        owner_id = self._owner_of(_routing_kwarg(pending_request, "conversation_id"))
        ordered = sorted(candidate_replicas, key=lambda r: self.owned[r.replica_id])
        owner = [r for r in ordered if r.replica_id == owner_id]
        if not owner:
            return [ordered]
        others = [r for r in ordered if r.replica_id != owner_id]
        return [owner, others] if others else [owner]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Serve calls this once a replica accepted the request: the replica becomes the conversation's owner."""
        conversation_id = _routing_kwarg(pending_request, "conversation_id")
        if conversation_id is None:
            return
        previous = self.owners.get(conversation_id)
        if previous is not None and previous != replica_id:
            self.moves += 1
            logger.info(
                "conversation %s moved from replica %s to %s (%d moves)",
                conversation_id,
                previous.unique_id,
                replica_id.unique_id,
                self.moves,
            )
        if previous != replica_id:
            self.owned[replica_id] += 1
            if previous is not None:
                self.owned[previous] -= 1
        self.owners[conversation_id] = replica_id
        self.owners.move_to_end(conversation_id)
        while len(self.owners) > self.max_conversations:
            _, dropped = self.owners.popitem(last=False)
            self.owned[dropped] -= 1

    def _owner_of(self, conversation_id: str | None) -> ReplicaID | None:
        if conversation_id is None:
            return None
        return self.owners.get(conversation_id)


def _routing_kwarg(pending_request: PendingRequest | None, name: str) -> str | None:
    if pending_request is None:
        return None
    value = pending_request.kwargs.get(name)
    return str(value) if value is not None else None
