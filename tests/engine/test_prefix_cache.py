"""The radix prefix cache on token ids alone: matches, insertions, spans to copy, the byte budget and its order."""

from __future__ import annotations

from chatstream.engine.prefix_cache import KeepSpan, PrefixMatch, RadixPrefixCache, common_prefix_len

BYTES = 10  # per token


def cache(max_tokens: int = 1000) -> RadixPrefixCache:
    return RadixPrefixCache(max_tokens * BYTES, BYTES)


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2]) == 2
    assert common_prefix_len(list(range(1000)), [*range(777), -1]) == 777
    assert common_prefix_len((1, 2, 3), [1, 2, 3, 4]) == 3


def test_a_prefix_inserted_by_one_sequence_is_matched_by_another() -> None:
    tree = cache()
    spans, evicted = tree.insert([1, 2, 3, 4, 5])
    assert spans == [KeepSpan(0, 0, 5)] and evicted == []
    assert tree.match([1, 2, 3, 9]) == PrefixMatch(((0, 3),), 3)
    assert tree.match([7, 1, 2]) == PrefixMatch()
    assert tree.num_bytes == 5 * BYTES and len(tree) == 1


def test_only_the_new_part_is_kept_and_a_branch_hangs_inside_a_segment() -> None:
    tree = cache()
    tree.insert([1, 2, 3, 4, 5])
    spans, _ = tree.insert([1, 2, 3, 8, 9])  # leaves the first segment after 3 tokens
    assert spans == [KeepSpan(1, 3, 5)]
    assert tree.match([1, 2, 3, 8, 9, 10]) == PrefixMatch(((0, 3), (1, 2)), 5)
    assert tree.match([1, 2, 3, 4, 5, 6]) == PrefixMatch(((0, 5),), 5)
    spans, _ = tree.insert([1, 2, 3, 4, 5, 6, 7])  # continues the first segment
    assert spans == [KeepSpan(2, 5, 7)]
    assert tree.insert([1, 2, 3]) == ([], [])  # nothing new
    assert tree.num_tokens == 5 + 2 + 2 and tree.num_bytes == 9 * BYTES


def test_truncated_match() -> None:
    match = PrefixMatch(((0, 3), (1, 2)), 5)
    assert match.truncated(4) == PrefixMatch(((0, 3), (1, 1)), 4)
    assert match.truncated(3) == PrefixMatch(((0, 3),), 3)
    assert match.truncated(0) == PrefixMatch()
    assert match.truncated(9) == match


def test_least_recently_used_leaves_go_first_and_their_parents_become_leaves() -> None:
    tree = cache(max_tokens=10)
    tree.insert([1, 2, 3, 4])  # node 0
    tree.insert([1, 2, 3, 4, 5, 6])  # node 1, child of 0
    tree.insert([7, 8, 9])  # node 2
    tree.match([7, 8])  # node 2 used more recently than node 1
    spans, evicted = tree.insert([20, 21, 22])  # 4 + 2 + 3 + 3 = 12 tokens > 10
    assert spans == [KeepSpan(3, 0, 3)] and evicted == [1]
    spans, evicted = tree.insert([30, 31, 32, 33, 34])  # 10 + 5: node 0 (now a leaf) then node 2 go
    assert evicted == [0, 2] and tree.num_bytes == 8 * BYTES
    assert tree.match([1, 2, 3]) == PrefixMatch() and tree.num_evicted_nodes == 3


def test_a_conversations_latest_turn_is_evicted_after_every_other_leaf() -> None:
    tree = cache(max_tokens=10)
    tree.insert([1, 2, 3, 4], conversation_id="c")
    tree.insert([5, 6, 7])
    tree.match([5, 6])  # more recent than the conversation's turn, but not a latest turn
    _, evicted = tree.insert([8, 9, 10, 11])
    assert evicted == [1]
    assert tree.match([1, 2, 3, 4]).num_tokens == 4


def test_a_segment_larger_than_the_budget_is_not_kept() -> None:
    tree = cache(max_tokens=4)
    tree.insert([1, 2])
    assert tree.insert([1, 2, 3, 4, 5, 6, 7]) == ([], [])
    spans, evicted = tree.insert([9, 9, 9, 9])  # fits alone: the older leaf makes room
    assert spans == [KeepSpan(1, 0, 4)] and evicted == [0]


def test_disabled_and_clear() -> None:
    off = RadixPrefixCache(0, BYTES)
    assert not off.enabled and off.insert([1, 2]) == ([], []) and off.match([1, 2]) == PrefixMatch()
    assert not RadixPrefixCache(100, 0).enabled
    tree = cache()
    tree.insert([1, 2], conversation_id="c")
    tree.insert([3])
    assert sorted(tree.clear()) == [0, 1] and tree.num_bytes == 0 and tree.match([1, 2]) == PrefixMatch()
