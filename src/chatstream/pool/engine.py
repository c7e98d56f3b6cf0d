"""PoolEngine: several engines in one process behind the engine contract, with conversation-sticky routing.

The service, its admission control and both protocols see one engine. Each request goes to a member engine chosen by
:mod:`chatstream.pool.policy` (by default the engine that served the conversation's previous turn, where its KV cache
is kept, while that engine has a free slot; else the least-loaded one, and the move is counted), and a relay task
hands the member's deltas on to the caller's stream, keeping count of each member's requests and failures.

A member that fails is taken out of rotation: when it refuses a request as not running, when its ``check_health``
fails (its thread died; a watchdog looks every ``health_check_interval_s`` while requests run), or when
``max_consecutive_errors`` of its requests in a row end with an error. Its running requests end with an error that
names it; one that had produced nothing yet is sent once more, to another member. The other members keep serving;
``workers()`` reports each member (/get_load, /metrics) and /health says "degraded" while one is out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from chatstream.engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
    WorkerStats,
    engine_health,
    wants_chat_context,
)
from chatstream.pool.config import PoolConfig, PoolMember
from chatstream.pool.policy import Candidate, Ownership, RoundRobin, Routing, choose_sticky, least_loaded

logger = logging.getLogger(__name__)

MAX_TRIES = 2
"""Sends of one request: the first, and one more when its engine failed before it produced anything."""


class MemberFailed(EngineError):
    """The member engine that ran a request was taken out of rotation."""


@dataclass(eq=False)
class _Member:
    """A member and what the pool knows of it."""

    spec: PoolMember
    flights: dict[str, _Flight] = field(default_factory=dict)
    healthy: bool = True
    error: str | None = None
    consecutive_errors: int = 0
    turns: int = 0
    moved_in: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def engine(self) -> Engine:
        return self.spec.engine

    def candidate(self) -> Candidate[str]:
        return Candidate(self.name, len(self.flights), self.spec.capacity)


@dataclass(eq=False)
class _Flight:
    """One request on its way through a member."""

    request: GenerationRequest
    stream: RequestStream
    member: _Member
    member_stream: RequestStream
    task: asyncio.Task[None] | None = None
    started: bool = False
    aborted: bool = False
    tries: int = 1


class PoolEngine:
    """The engine contract over several member engines (implements :class:`chatstream.engine.base.Engine`).

    Args:
        members: the engines, each with a unique name and its capacity.
        config: routing and failure handling.
    """

    def __init__(self, members: Sequence[PoolMember], config: PoolConfig | None = None) -> None:
        if not members:
            raise ValueError("a pool needs at least one engine")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"the names of a pool's engines must be unique, got {names!r}")
        self.config = config or PoolConfig()
        self._members = {m.name: _Member(m) for m in members}
        self.ownership: Ownership[str] = Ownership(self.config.max_conversations)
        self._round_robin: RoundRobin[str] = RoundRobin()
        self._flights: dict[str, _Flight] = {}
        self._running = False
        self._watchdog: asyncio.Task[None] | None = None

    # ----- the engine contract -----

    @property
    def wants_chat_context(self) -> bool:
        return any(wants_chat_context(m.engine) for m in self._members.values())

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        for member in self._members.values():
            member.engine.start()
        self._running = True

    def stop(self) -> None:
        """Stop every member (each aborts what it runs). May be called from a worker thread."""
        self._running = False
        for member in self._members.values():
            try:
                member.engine.stop()
            except Exception:  # a broken member must not keep the others running
                logger.exception("engine %s failed to stop", member.name)

    def add_request(self, request: GenerationRequest) -> RequestStream:
        if not self._running:
            raise EngineError("the engine pool is not running")
        if request.request_id in self._flights:
            raise EngineError(f"request_id {request.request_id!r} is already in use")
        stream = RequestStream(request.request_id)
        member, member_stream = self._submit(request, frozenset())
        flight = _Flight(request, stream, member, member_stream)
        self._flights[request.request_id] = member.flights[request.request_id] = flight
        flight.task = stream.loop.create_task(self._relay(flight))
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = stream.loop.create_task(self._watch())
        return stream

    def abort(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is None:
            return
        flight.aborted = True
        if flight.member.healthy:
            flight.member.engine.abort(request_id)
        else:  # nobody there will end it
            flight.member_stream.put_nowait(Delta(text="", finish_reason=FinishReason.ABORT))

    def stats(self) -> EngineStats:
        """The members' stats added up."""
        totals = dict.fromkeys((f.name for f in dataclasses.fields(EngineStats)), 0)
        for member in self._members.values():
            for name, value in dataclasses.asdict(member.engine.stats()).items():
                if isinstance(value, int) and name in totals:
                    totals[name] += value
        return EngineStats(**totals)

    # ----- beyond the contract: health and per-engine reports -----

    def check_health(self) -> None:
        """Raise EngineError when no member can serve (stopped, or every member failed)."""
        self._probe()
        if not self._running:
            raise EngineError("the engine pool is not running")
        if not any(m.healthy for m in self._members.values()):
            failures = "; ".join(f"{m.name}: {m.error}" for m in self._members.values())
            raise EngineError(f"every engine of the pool failed ({failures})")

    def workers(self) -> list[WorkerStats]:
        """Each member's load, counters and health (members that stopped or died are taken out first)."""
        self._probe()
        return [
            WorkerStats(
                name=m.name,
                stats=m.engine.stats(),
                max_running=m.spec.capacity,
                healthy=m.healthy,
                error=m.error,
                turns_total=m.turns,
                moved_in_total=m.moved_in,
                conversations=self.ownership.owned[m.name],
            )
            for m in self._members.values()
        ]

    @property
    def engines(self) -> dict[str, Engine]:
        """The member engines by name."""
        return {name: member.engine for name, member in self._members.items()}

    @property
    def moves(self) -> int:
        """Turns that went to another engine than the one holding their conversation's KV."""
        return self.ownership.moves

    def owner_of(self, conversation_id: str) -> str | None:
        """The engine that serves the conversation's next turn while it has a free slot."""
        return self.ownership.owner_of(conversation_id)

    def take_out(self, name: str, reason: str) -> None:
        """Take a member out of rotation by hand (operations, tests); its running requests end with an error."""
        self._take_out(self._members[name], reason)

    # ----- routing -----

    def _submit(self, request: GenerationRequest, exclude: frozenset[str]) -> tuple[_Member, RequestStream]:
        """Hand the request to the chosen member, else to the next; raises EngineError when none takes it."""
        overloaded: EngineOverloaded | None = None
        tried = set(exclude)
        while (member := self._choose(request.conversation_id, tried)) is not None:
            tried.add(member.name)
            try:
                member_stream = member.engine.add_request(request)
            except EngineOverloaded as exc:
                overloaded = exc
                continue
            except EngineError as exc:
                self._take_out(member, f"it refused a request: {exc}")
                continue
            self._assign(member, request.conversation_id)
            return member, member_stream
        if overloaded is not None:
            raise overloaded
        raise EngineError(self._unavailable())

    def _choose(self, conversation_id: str | None, tried: set[str]) -> _Member | None:
        candidates = [m.candidate() for m in self._members.values() if m.healthy and m.name not in tried]
        if not candidates:
            return None
        if self.config.routing is Routing.ROUND_ROBIN:
            key = self._round_robin.choose(candidates)
        elif self.config.routing is Routing.LEAST_LOADED:
            key = least_loaded(candidates, self.ownership)
        else:
            key = choose_sticky(self.ownership.owner_of(conversation_id), candidates, self.ownership)
        return None if key is None else self._members[key]

    def _assign(self, member: _Member, conversation_id: str | None) -> None:
        member.turns += 1
        previous = self.ownership.record(conversation_id, member.name)
        if previous is not None:
            member.moved_in += 1
            logger.info(
                "conversation %s moved from engine %s to %s (%d moves)",
                conversation_id,
                previous,
                member.name,
                self.ownership.moves,
            )

    def _unavailable(self) -> str:
        failed = [f"{m.name}: {m.error}" for m in self._members.values() if not m.healthy]
        if failed:
            return f"no engine of the pool can take the request ({'; '.join(failed)})"
        return "no engine of the pool can take the request"

    # ----- relaying one request -----

    async def _relay(self, flight: _Flight) -> None:
        try:
            while not await self._pump(flight):
                pass  # resent to another member: relay that one's stream
        finally:
            self._flights.pop(flight.request.request_id, None)
            flight.member.flights.pop(flight.request.request_id, None)

    async def _pump(self, flight: _Flight) -> bool:
        """Relay the current member's deltas; True when the request has ended, False when it was resent."""
        try:
            async for delta in flight.member_stream:
                if delta.finished:
                    return self._finish(flight, delta)
                flight.started = flight.started or bool(delta.text or delta.token_ids)
                flight.stream.put_nowait(delta)
        except EngineError as exc:  # the member was taken out, or its stream failed
            if self._resend(flight):
                return False
            self._end_with(flight, exc)
        return True

    def _end_with(self, flight: _Flight, exc: EngineError) -> None:
        """End the caller's stream after a failure: ABORT when it was aborted, an ERROR delta once the answer has
        begun, else the exception itself (the protocols answer 503, or 429 for EngineOverloaded)."""
        if flight.aborted:
            flight.stream.put_nowait(Delta(text="", finish_reason=FinishReason.ABORT))
        elif flight.started:
            flight.stream.put_nowait(Delta(text="", finish_reason=FinishReason.ERROR, error=str(exc)))
        else:
            flight.stream.fail(exc)

    def _finish(self, flight: _Flight, delta: Delta) -> bool:
        member = flight.member
        member.flights.pop(flight.request.request_id, None)
        if delta.finish_reason is FinishReason.ERROR:
            member.consecutive_errors += 1
            if member.consecutive_errors >= self.config.max_consecutive_errors:
                self._take_out(member, f"{member.consecutive_errors} requests in a row failed (last: {delta.error})")
            if self._resend(flight):
                return False
            delta = dataclasses.replace(delta, error=f"engine {member.name}: {delta.error}")
        elif delta.finish_reason is not FinishReason.ABORT:
            member.consecutive_errors = 0
        flight.stream.put_nowait(delta)
        return True

    def _resend(self, flight: _Flight) -> bool:
        """Send the request to another member when its own failed before it produced anything."""
        failed = flight.member
        if flight.started or flight.aborted or flight.tries >= MAX_TRIES or failed.healthy or not self._running:
            return False
        try:
            member, member_stream = self._submit(flight.request, frozenset({failed.name}))
        except EngineError:
            return False
        failed.flights.pop(flight.request.request_id, None)
        logger.warning(
            "request %s: engine %s failed before answering; sent to engine %s",
            flight.request.request_id,
            failed.name,
            member.name,
        )
        flight.member, flight.member_stream, flight.tries = member, member_stream, flight.tries + 1
        member.flights[flight.request.request_id] = flight
        return True

    # ----- failures -----

    def _take_out(self, member: _Member, reason: str) -> None:
        if not member.healthy:
            return
        member.healthy, member.error = False, reason
        running = list(member.flights.values())
        logger.warning(
            "engine %s taken out of rotation: %s (%d running requests end)", member.name, reason, len(running)
        )
        failure = MemberFailed(f"engine {member.name} failed and was taken out of rotation: {reason}")
        for flight in running:
            flight.member_stream.fail(failure)
            try:
                member.engine.abort(flight.request.request_id)
            except Exception:  # it is broken already; the request has ended for the caller
                logger.debug("abort on failed engine %s raised", member.name, exc_info=True)

    def _probe(self) -> None:
        """Take out the members that stopped or whose ``check_health`` fails."""
        if not self._running:
            return
        for member in self._members.values():
            if member.healthy and (reason := engine_health(member.engine)) is not None:
                self._take_out(member, reason)

    async def _watch(self) -> None:
        """While requests run, look at the members' health (a member whose thread died delivers nothing more)."""
        while self._running and self._flights:
            await asyncio.sleep(self.config.health_check_interval_s)
            self._probe()
