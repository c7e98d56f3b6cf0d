"""The routing rule shared by the pool and the Ray router, on plain keys (no engines)."""

from __future__ import annotations

import pytest

from chatstream.pool.policy import Candidate, Ownership, RoundRobin, choose_sticky, least_loaded, sticky_ranks


def table(**owners: str) -> Ownership[str]:
    ownership: Ownership[str] = Ownership()
    for conversation, worker in owners.items():
        ownership.record(conversation, worker)
    return ownership


def test_a_known_conversation_stays_with_its_owner_while_it_has_a_free_slot() -> None:
    ownership = table(c1="b")
    candidates = [Candidate("a", 0, 2), Candidate("b", 1, 2)]
    assert choose_sticky("b", candidates, ownership) == "b"


def test_a_full_owner_gives_the_turn_to_the_least_loaded_other() -> None:
    ownership = table(c1="b")
    candidates = [Candidate("a", 1, 2), Candidate("b", 2, 2), Candidate("c", 0, 2)]
    assert choose_sticky("b", candidates, ownership) == "c"


def test_when_every_engine_is_full_the_turn_waits_at_its_owner() -> None:
    candidates = [Candidate("a", 2, 2), Candidate("b", 2, 2)]
    assert choose_sticky("b", candidates, table(c1="b")) == "b"
    assert choose_sticky(None, [Candidate("a", 3, 2), Candidate("b", 2, 2)], table()) == "b"


def test_a_gone_owner_or_a_new_conversation_goes_to_the_least_loaded_with_fewest_conversations_on_ties() -> None:
    ownership = table(c1="a", c2="a", c3="b")
    idle = [Candidate("a", 0, 2), Candidate("b", 0, 2), Candidate("c", 0, 2)]
    assert choose_sticky(None, idle, ownership) == "c"
    assert choose_sticky("gone", idle[:2], ownership) == "b"
    assert least_loaded([Candidate("a", 1, 4), Candidate("b", 1, 2)], ownership) == "a"  # a quarter vs a half
    assert choose_sticky(None, [], ownership) is None


def test_ownership_counts_moves_and_forgets_the_least_recently_used() -> None:
    ownership: Ownership[str] = Ownership(max_conversations=2)
    assert ownership.record("c1", "a") is None
    assert ownership.record("c1", "a") is None
    assert ownership.record("c1", "b") == "a" and ownership.moves == 1
    ownership.record("c2", "a")
    ownership.record("c1", "b")
    ownership.record("c3", "a")  # c2 was used least recently
    assert list(ownership.owners) == ["c1", "c3"] and ownership.owned == {"a": 1, "b": 1}
    assert ownership.record(None, "a") is None and ownership.owner_of(None) is None
    with pytest.raises(ValueError, match="max_conversations=0"):
        Ownership(max_conversations=0)


def test_sticky_ranks_put_the_owner_first_and_order_the_rest_by_conversations_owned() -> None:
    ownership = table(c1="a", c2="a", c3="c")
    workers = ["a", "b", "c"]
    assert sticky_ranks("c", workers, str, ownership) == [["c"], ["b", "a"]]
    assert sticky_ranks(None, workers, str, ownership) == [["b", "c", "a"]]
    assert sticky_ranks("gone", workers, str, ownership) == [["b", "c", "a"]]
    assert sticky_ranks("a", ["a"], str, ownership) == [["a"]]


def test_round_robin_takes_the_candidates_in_turn() -> None:
    robin: RoundRobin[str] = RoundRobin()
    candidates = [Candidate("a", 5, 2), Candidate("b", 0, 2)]
    assert [robin.choose(candidates) for _ in range(4)] == ["a", "b", "a", "b"]
    assert robin.choose([]) is None
