"""ConversationRouter's choice, on hand-made replicas and requests (no cluster)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve.request_router import ReplicaID

from chatstream.ray.router import ConversationRouter

pytestmark = pytest.mark.ray


def replica(unique_id: str) -> Any:
    return SimpleNamespace(replica_id=ReplicaID(unique_id=unique_id, deployment_id=None))


def pending(**kwargs: str) -> Any:
    return SimpleNamespace(kwargs=kwargs, routing_context=SimpleNamespace(should_backoff=False))


def router() -> ConversationRouter:
    r = ConversationRouter.__new__(ConversationRouter)  # Serve's constructor needs a controller; the policy does not
    r.initialize_state(max_conversations=2)
    return r


async def test_a_new_conversation_may_go_to_any_replica_and_backs_off_when_all_are_full() -> None:
    a, b = replica("a"), replica("b")
    request = pending(conversation_id="c1")
    assert await router().choose_replicas([a, b], request) == [[a, b]]
    assert request.routing_context.should_backoff


async def test_a_known_conversation_tries_its_owner_first_then_the_others() -> None:
    a, b, c = replica("a"), replica("b"), replica("c")
    r = router()
    r.on_request_routed(pending(conversation_id="c1"), b.replica_id, None)
    assert await r.choose_replicas([a, b, c], pending(conversation_id="c1")) == [[b], [a, c]]
    assert r.moves == 0


async def test_a_gone_owner_falls_back_to_every_replica_and_the_move_is_counted() -> None:
    a, b = replica("a"), replica("b")
    r = router()
    r.on_request_routed(pending(conversation_id="c1"), b.replica_id, None)
    assert await r.choose_replicas([a], pending(conversation_id="c1")) == [[a]]
    r.on_request_routed(pending(conversation_id="c1"), a.replica_id, None)
    assert r.moves == 1
    assert r.ownership.owner_of("c1") == a.replica_id


async def test_pinned_calls_go_to_their_replica_and_do_not_take_ownership() -> None:
    a, b = replica("a"), replica("b")
    r = router()
    assert await r.choose_replicas([a, b], pending(pinned_replica="b")) == [[b]]
    assert await r.choose_replicas([a], pending(pinned_replica="b")) == [[a]]  # gone: anyone answers, and says who
    r.on_request_routed(pending(pinned_replica="b"), b.replica_id, None)
    assert not r.ownership.owners


async def test_equally_loaded_replicas_are_offered_fewest_conversations_first() -> None:
    a, b, c = replica("a"), replica("b"), replica("c")
    r = router()
    r.initialize_state(max_conversations=10)
    for name, owner in (("c1", a), ("c2", a), ("c3", c)):
        r.on_request_routed(pending(conversation_id=name), owner.replica_id, None)
    assert await r.choose_replicas([a, b, c], pending(conversation_id="new")) == [[b, c, a]]
    assert await r.choose_replicas([a, b, c], pending(conversation_id="c3")) == [[c], [b, a]]
    r.on_request_routed(pending(conversation_id="c1"), b.replica_id, None)  # moved: a owns 1, b 1, c 1
    assert r.ownership.owned == {a.replica_id: 1, b.replica_id: 1, c.replica_id: 1}


def test_owners_are_bounded_least_recently_used_first() -> None:
    r = router()
    for name in ("c1", "c2", "c1", "c3"):
        r.on_request_routed(pending(conversation_id=name), ReplicaID(unique_id="a", deployment_id=None), None)
    assert list(r.ownership.owners) == ["c1", "c3"]
    assert sum(r.ownership.owned.values()) == 2
    with pytest.raises(ValueError, match="max_conversations=0"):
        r.initialize_state(max_conversations=0)
