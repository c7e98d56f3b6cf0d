"""The prefix cache shared by every request: a radix tree over token ids whose nodes name kept KV segments.

A node holds a run of tokens (its segment) and stands for the KV of those tokens, computed after the tokens of its
ancestors; the model runner keeps that KV under the node's id (:class:`~chatstream.engine.kv_cache.RowKV`, one
contiguous tensor pair per layer). A child hangs at an ``offset`` inside its parent's segment: the parent's first
``offset`` tokens followed by the child's segment is a cached sequence. Nodes are never split: a sequence that leaves a
segment halfway gets a child at that offset, so every node's KV is exactly what was copied once out of a batch row,
and evicting a leaf frees exactly its own bytes.

:meth:`RadixPrefixCache.match` returns the longest cached prefix of a prompt, whoever computed it (a system prompt,
few-shot examples, a conversation's earlier turns and answers); :meth:`RadixPrefixCache.insert` adds a sequence's
tokens and returns the spans of the sequence whose KV the runner must copy in (only what the tree does not hold yet),
plus the nodes it evicted. The budget is in bytes; least recently used leaves go first, a conversation's latest turn
after every other leaf.

Pure Python: no tensors. Only the engine thread uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def common_prefix_len(a: SequenceABC[int], b: SequenceABC[int]) -> int:
    """The number of leading items ``a`` and ``b`` share (slice comparisons, so long equal runs cost C speed)."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if list(a[low:mid]) == list(b[low:mid]):
            low = mid
        else:
            high = mid
    return low


@dataclass(eq=False)
class _Node:
    node_id: int
    tokens: tuple[int, ...]
    parent: _Node | None
    depth: int  # tokens of the cached sequence before this segment
    children: dict[tuple[int, int], _Node] = field(default_factory=dict)  # (offset, first token) -> child
    last_used: int = 0
    latest_of: set[str] = field(default_factory=set)  # conversations whose latest turn ends here

    @property
    def offset(self) -> int:
        """Where this node hangs in its parent's segment."""
        return self.depth - (self.parent.depth if self.parent is not None else 0)


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a prompt: ``segments`` are ``(node_id, n)`` pairs, the first ``n`` tokens of each
    node's KV in order; ``num_tokens`` is their sum."""

    segments: tuple[tuple[int, int], ...] = ()
    num_tokens: int = 0

    def truncated(self, num_tokens: int) -> PrefixMatch:
        """The same match cut to its first ``num_tokens`` tokens."""
        kept: list[tuple[int, int]] = []
        left = max(0, num_tokens)
        for node_id, n in self.segments:
            if left <= 0:
                break
            kept.append((node_id, min(n, left)))
            left -= min(n, left)
        return PrefixMatch(tuple(kept), min(self.num_tokens, max(0, num_tokens)))


@dataclass(frozen=True)
class KeepSpan:
    """Copy the KV of the sequence's tokens ``[start, end)`` out of its batch row and keep it as node ``node_id``."""

    node_id: int
    start: int
    end: int


class RadixPrefixCache:
    """The radix tree, its byte budget and its counters.

    Args:
        max_bytes: the most KV bytes kept (0 disables the cache: nothing matches, nothing is kept).
        bytes_per_token: the KV size of one token over all layers.
    """

    def __init__(self, max_bytes: int, bytes_per_token: int) -> None:
        self.max_bytes = max_bytes if bytes_per_token > 0 else 0
        self.bytes_per_token = bytes_per_token
        self._root = _Node(node_id=-1, tokens=(), parent=None, depth=0)
        self._nodes: dict[int, _Node] = {}
        self._latest: dict[str, _Node] = {}
        self._next_id = 0
        self._clock = 0
        self.num_bytes = 0
        self.num_evicted_nodes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def num_tokens(self) -> int:
        return sum(len(node.tokens) for node in self._nodes.values())

    # ---- lookups ---------------------------------------------------------------------------------------------------

    def match(self, token_ids: SequenceABC[int], *, touch: bool = True) -> PrefixMatch:
        """The longest cached prefix of ``token_ids``; ``touch`` marks its nodes as just used."""
        path = self._walk(token_ids)
        if touch and path:
            self._touch(path[-1][0])
        segments = tuple((node.node_id, used) for node, used in path)
        return PrefixMatch(segments, sum(used for _, used in path))

    def _walk(self, token_ids: SequenceABC[int]) -> list[tuple[_Node, int]]:
        """The nodes along the longest cached prefix and how many tokens of each it uses."""
        path: list[tuple[_Node, int]] = []
        node, used, position = self._root, 0, 0
        while position < len(token_ids):
            child = node.children.get((used, token_ids[position]))
            if child is None:
                break
            used = common_prefix_len(child.tokens, token_ids[position : position + len(child.tokens)])
            path.append((child, used))
            node, position = child, position + used
        return path

    def _touch(self, node: _Node | None) -> None:
        self._clock += 1
        while node is not None and node is not self._root:
            node.last_used = self._clock
            node = node.parent

    # ---- insertion and eviction ------------------------------------------------------------------------------------

    def insert(
        self, token_ids: SequenceABC[int], conversation_id: str | None = None
    ) -> tuple[list[KeepSpan], list[int]]:
        """Add ``token_ids`` (whose KV its batch row holds); returns the spans to copy in and the evicted node ids.

        Only the part past the longest cached prefix becomes a new node; with ``conversation_id`` the sequence's last
        node becomes that conversation's latest turn. A new node that alone exceeds the budget is not kept.
        """
        if not self.enabled or not token_ids:
            return [], []
        path = self._walk(token_ids)
        matched = sum(used for _, used in path)
        parent, offset = (path[-1][0], path[-1][1]) if path else (self._root, 0)
        spans: list[KeepSpan] = []
        last = parent if path else None
        if matched < len(token_ids):
            segment = tuple(token_ids[matched:])
            if len(segment) * self.bytes_per_token > self.max_bytes:
                logger.debug("prefix cache: a %d-token segment exceeds the budget", len(segment))
            else:
                last = self._add(parent, offset, matched, segment)
                spans.append(KeepSpan(last.node_id, matched, len(token_ids)))
        if conversation_id is not None and last is not None:
            self._set_latest(conversation_id, last)
        self._touch(last)
        evicted = self._evict(protect=last)
        if spans and spans[0].node_id in evicted:
            spans = []
        return spans, evicted

    def _add(self, parent: _Node, offset: int, depth: int, segment: tuple[int, ...]) -> _Node:
        node = _Node(node_id=self._next_id, tokens=segment, parent=parent, depth=depth)
        self._next_id += 1
        parent.children[(offset, segment[0])] = node
        self._nodes[node.node_id] = node
        self.num_bytes += len(segment) * self.bytes_per_token
        return node

    def _set_latest(self, conversation_id: str, node: _Node) -> None:
        previous = self._latest.get(conversation_id)
        if previous is not None:
            previous.latest_of.discard(conversation_id)
        node.latest_of.add(conversation_id)
        self._latest[conversation_id] = node

    def _evict(self, protect: _Node | None = None) -> list[int]:
        """Drop least recently used leaves until the budget holds: plain leaves first, then conversations' latest
        turns; ``protect`` (the node just added) goes last."""
        evicted: list[int] = []
        while self.num_bytes > self.max_bytes:
            leaves = [node for node in self._nodes.values() if not node.children]
            victim = min(leaves, key=lambda n: (n is protect, bool(n.latest_of), n.last_used))
            evicted.append(self._remove(victim))
        return evicted

    def _remove(self, node: _Node) -> int:
        assert node.parent is not None
        del node.parent.children[(node.offset, node.tokens[0])]
        del self._nodes[node.node_id]
        for conversation_id in node.latest_of:
            del self._latest[conversation_id]
        self.num_bytes -= len(node.tokens) * self.bytes_per_token
        self.num_evicted_nodes += 1
        return node.node_id

    def clear(self) -> list[int]:
        """Drop every node; returns their ids."""
        ids = list(self._nodes)
        self._nodes.clear()
        self._latest.clear()
        self._root.children.clear()
        self.num_bytes = 0
        return ids
