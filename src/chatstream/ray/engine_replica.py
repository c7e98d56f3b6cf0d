"""The engine deployment: each replica holds one model copy and serves the engine contract over Ray.

``generate`` is a streaming method: Serve turns the async generator into a streaming response whose items are a
:class:`ReplicaTag` (which replica took the request) followed by the engine's :class:`Delta` values. When the caller
cancels the call (client disconnect, abort), Serve cancels the generator and the request is aborted in the engine,
so its batch row is dropped at the next step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from chatstream.engine.base import Delta, EngineError, GenerationRequest
from chatstream.ray.spec import EngineSpec

logger = logging.getLogger(__name__)

MAX_TRACKED_CONVERSATIONS = 10_000


@dataclass(frozen=True)
class ReplicaTag:
    """The first item of every ``generate`` stream: which replica serves the request.

    Attributes:
        replica_id: the replica's unique id within its deployment (what the router keys on).
        actor_name: the replica's Ray actor name (namespace "serve"), e.g. for ``ray.get_actor`` in operations.
    """

    replica_id: str
    actor_name: str


def _replica_identity() -> ReplicaTag:
    from ray import serve

    try:
        replica_id = serve.get_replica_context().replica_id
    except Exception:  # outside a Serve replica (unit tests call the class directly)
        return ReplicaTag(replica_id="local", actor_name="")
    return ReplicaTag(replica_id=replica_id.unique_id, actor_name=replica_id.to_full_id_str())


class EngineReplica:
    """One replica of the engine deployment: builds its engine from an :class:`EngineSpec` and streams deltas.

    It also counts the turns and conversations it served (``stats``), so that operators can see how the sticky
    router spreads the load.
    """

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.tag = _replica_identity()
        self.engine = spec.build_engine()
        self.engine.start()
        self._turns: OrderedDict[str, int] = OrderedDict()
        logger.info("engine replica %s started (%s)", self.tag.replica_id, type(self.engine).__name__)

    async def generate(
        self, request: GenerationRequest, conversation_id: str | None = None
    ) -> AsyncIterator[ReplicaTag | Delta]:
        """Stream the request: the replica's tag first, then the engine's deltas.

        ``conversation_id`` is the routing key the sticky router reads (the same as ``request.conversation_id``).
        """
        self._count_turn(conversation_id or request.conversation_id)
        stream = self.engine.add_request(request)
        yield self.tag
        finished = False
        try:
            async for delta in stream:
                finished = delta.finished
                yield delta
        finally:
            if not finished:  # the caller cancelled (disconnect, abort) or the stream failed
                self.engine.abort(request.request_id)
                logger.info("request %s aborted on replica %s", request.request_id, self.tag.replica_id)

    async def stats(self, pinned_replica: str | None = None) -> dict[str, Any]:
        """This replica's load and counters. ``pinned_replica`` asks the router for a given replica (see
        :class:`~chatstream.ray.router.ConversationRouter`); the answer's ``replica_id`` says which one answered."""
        return {
            "replica_id": self.tag.replica_id,
            "actor_name": self.tag.actor_name,
            "engine": asdict(self.engine.stats()),
            "conversations": len(self._turns),
            "turns": sum(self._turns.values()),
        }

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        if not self.engine.is_running:
            raise EngineError(f"the engine of replica {self.tag.replica_id} is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()

    def _count_turn(self, conversation_id: str | None) -> None:
        if conversation_id is None:
            return
        self._turns[conversation_id] = self._turns.get(conversation_id, 0) + 1
        self._turns.move_to_end(conversation_id)
        while len(self._turns) > MAX_TRACKED_CONVERSATIONS:
            self._turns.popitem(last=False)
