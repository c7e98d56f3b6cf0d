"""RayEngine: the engine contract in the front process, served by the engine deployment's replicas.

``add_request`` starts a streaming call on the deployment handle and relays its items into a
:class:`RequestStream`. ``abort`` cancels the call; Serve cancels the replica's generator, which aborts the request
in its engine. Ray's backpressure (the front's queue for the replicas is full) becomes :class:`EngineOverloaded`
(429 + Retry-After); a replica that dies before the first delta is retried once on another replica, one that dies
mid-stream ends the answer with ``FinishReason.ERROR``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from chatstream.engine.base import (
    Delta,
    EngineError,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
    WorkerStats,
    cancel_task,
)
from chatstream.pool.policy import Ownership
from chatstream.ray.engine_replica import ReplicaTag

logger = logging.getLogger(__name__)

MAX_TRACKED_CONVERSATIONS = 100_000
STATS_TIMEOUT_S = 5.0


@dataclass
class _Relay:
    """One request's progress on its way through Ray."""

    request: GenerationRequest
    stream: RequestStream
    replica: str | None = None
    received: bool = False
    finished: bool = False


class RayEngine:
    """The engine contract over a Ray Serve deployment handle (the engine deployment's ``EngineReplica``).

    Args:
        handle: the engine deployment's handle (``DeploymentHandle``), as Serve passes it to the front.
        retry_after: seconds a refused request is told to wait when Ray's error carries none.
        first_delta_timeout_s: a request without a first delta by then fails with :class:`EngineError` (503).
        max_attempts: tries of one request when its replica dies before answering (another replica is chosen).
        max_running_per_replica: the generations one replica runs at once (its batch size), for ``workers()``.
        wants_chat_context: the replicas run the mock engine, which answers from the user's message and the turn.
    """

    def __init__(
        self,
        handle: Any,
        *,
        retry_after: int = 1,
        first_delta_timeout_s: float = 120.0,
        max_attempts: int = 2,
        max_running_per_replica: int | None = None,
        wants_chat_context: bool = False,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts!r} must be >= 1")
        self._handle = handle.options(stream=True)
        self._stats_handle = handle.options(stream=False)
        self.retry_after = retry_after
        self.first_delta_timeout_s = first_delta_timeout_s
        self.max_attempts = max_attempts
        self.max_running_per_replica = max_running_per_replica
        self.wants_chat_context = wants_chat_context
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._relays: dict[str, _Relay] = {}
        self._running = False
        self._totals: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.turns_by_replica: Counter[str] = Counter()
        self.moved_in: Counter[str] = Counter()
        self.actor_names: dict[str, str] = {}
        self.dead_replicas: set[str] = set()
        self.ownership: Ownership[str] = Ownership(MAX_TRACKED_CONVERSATIONS)

    # ----- the engine contract -----

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        for request_id in list(self._tasks):
            self.abort(request_id)
        self._running = False

    def add_request(self, request: GenerationRequest) -> RequestStream:
        if not self._running:
            raise EngineError("the Ray engine client is not running")
        if request.request_id in self._tasks:
            raise EngineError(f"request_id {request.request_id!r} is already in use")
        stream = RequestStream(request.request_id)
        relay = _Relay(request, stream)
        task = asyncio.get_running_loop().create_task(self._relay(relay))
        self._tasks[request.request_id] = task
        self._relays[request.request_id] = relay
        task.add_done_callback(lambda _: self._forget(request.request_id))
        return stream

    def abort(self, request_id: str) -> None:
        cancel_task(self._tasks.get(request_id))

    def stats(self) -> EngineStats:
        """This front's view: its requests in flight and the token totals of the answers it relayed."""
        totals: Counter[str] = sum(self._totals.values(), Counter())
        return _engine_stats(len(self._tasks), totals)

    def workers(self) -> list[WorkerStats]:
        """Each live replica as this front knows it: its requests in flight from here, the turns and conversations
        this front sent it, the token totals of those answers. A replica seen dying is left out (Serve replaces it,
        and the replacement appears once it serves)."""
        running = Counter(r.replica for r in self._relays.values() if r.replica is not None)
        return [
            WorkerStats(
                name=replica,
                stats=_engine_stats(running[replica], self._totals[replica]),
                max_running=self.max_running_per_replica,
                turns_total=turns,
                moved_in_total=self.moved_in[replica],
                conversations=self.ownership.owned[replica],
            )
            for replica, turns in self.turns_by_replica.items()
            if replica not in self.dead_replicas
        ]

    @property
    def moves(self) -> int:
        """Conversations whose turn went to another replica than their previous one."""
        return self.ownership.moves

    # ----- beyond the contract: what operators and tests look at -----

    def routing_report(self) -> dict[str, Any]:
        """Turns relayed per replica, their actor names and the conversations that changed replica."""
        return {
            "turns_by_replica": dict(self.turns_by_replica),
            "actor_names": dict(self.actor_names),
            "dead_replicas": sorted(self.dead_replicas),
            "moves": self.moves,
            "conversations": len(self.ownership),
        }

    async def replica_stats(self, replica_id: str) -> dict[str, Any]:
        """The stats of one replica (the call is pinned to it; it takes one of its request slots briefly)."""
        response = self._stats_handle.stats.remote(pinned_replica=replica_id)
        return dict(await asyncio.wait_for(response, STATS_TIMEOUT_S))

    def last_replica_of(self, conversation_id: str) -> str | None:
        """The replica that served the conversation's latest turn through this front."""
        return self.ownership.owner_of(conversation_id)

    # ----- relaying one request -----

    async def _relay(self, relay: _Relay) -> None:
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    await self._attempt(relay)
                    return
                except Exception as exc:
                    if not self._retry(relay, exc, attempt):
                        self._end_with(relay, exc)
                        return
        except asyncio.CancelledError:
            if not relay.finished:
                relay.stream.put_nowait(Delta(text="", finish_reason=FinishReason.ABORT))

    async def _attempt(self, relay: _Relay) -> None:
        request = relay.request
        response = self._handle.generate.remote(request, conversation_id=request.conversation_id)
        try:
            items = aiter(response)
            while not relay.finished:
                try:
                    if relay.received:
                        item = await anext(items)
                    else:  # bounded: no replica may take the request (all dead, or the queue does not move)
                        item = await asyncio.wait_for(anext(items), self.first_delta_timeout_s)
                except StopAsyncIteration:
                    raise EngineError("the replica ended the stream without a final delta") from None
                self._take(relay, item)
        finally:
            if not relay.finished:
                response.cancel()  # the replica's generator is cancelled and aborts the request in its engine

    def _take(self, relay: _Relay, item: ReplicaTag | Delta) -> None:
        if isinstance(item, ReplicaTag):
            relay.replica = item.replica_id
            self._note_replica(relay.request.conversation_id, item)
            return
        relay.received = True
        if item.finished:
            relay.finished = True
            self._totals[relay.replica or ""].update(
                generated=item.num_generated_tokens, prompt=item.num_prompt_tokens, cached=item.num_cached_tokens
            )
        relay.stream.put_nowait(item)

    def _note_replica(self, conversation_id: str | None, tag: ReplicaTag) -> None:
        self.turns_by_replica[tag.replica_id] += 1
        self.actor_names[tag.replica_id] = tag.actor_name
        self.dead_replicas.discard(tag.replica_id)
        if self.ownership.record(conversation_id, tag.replica_id) is not None:
            self.moved_in[tag.replica_id] += 1

    def _forget(self, request_id: str) -> None:
        self._tasks.pop(request_id, None)
        self._relays.pop(request_id, None)

    def _retry(self, relay: _Relay, exc: Exception, attempt: int) -> bool:
        """Whether to send the request again: its replica died before it produced anything."""
        if _is_replica_failure(exc) and relay.replica is not None:
            self.dead_replicas.add(relay.replica)
            relay.replica = None
        if relay.received or attempt >= self.max_attempts or not _is_replica_failure(exc):
            return False
        logger.warning("request %s: replica failed before answering (%s); retrying", relay.request.request_id, exc)
        return True

    def _end_with(self, relay: _Relay, exc: Exception) -> None:
        request_id = relay.request.request_id
        if relay.received:  # the answer has begun: end it as an engine error, the protocols report it
            logger.warning("request %s failed mid-stream: %s", request_id, exc)
            relay.stream.put_nowait(Delta(text="", finish_reason=FinishReason.ERROR, error=_describe(exc)))
            return
        error = self._translate(exc)
        logger.info("request %s refused: %s", request_id, error)
        relay.stream.fail(error)

    def _translate(self, exc: Exception) -> EngineError:
        if isinstance(exc, EngineError):
            return exc
        if _is_backpressure(exc):
            retry_after = getattr(exc, "retry_after_s", None) or self.retry_after
            return EngineOverloaded("every engine replica is busy and the queue is full.", int(retry_after + 0.999))
        if isinstance(exc, TimeoutError):
            return EngineError(f"no engine replica answered within {self.first_delta_timeout_s:g} s")
        return EngineError(f"the engine replica failed: {_describe(exc)}")


def _engine_stats(num_running: int, totals: Counter[str]) -> EngineStats:
    return EngineStats(
        num_running=num_running,
        num_generated_tokens_total=totals["generated"],
        num_prompt_tokens_total=totals["prompt"],
        num_cached_tokens_total=totals["cached"],
    )


def _is_backpressure(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError)


def _is_replica_failure(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
