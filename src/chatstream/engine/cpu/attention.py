"""Which cache columns the fused decoder's queries attend to, block by block, and the masks over them.

Attention runs one ``scaled_dot_product_attention`` call per group of rows and block of queries, with the query
heads of one key head stacked along the query axis (``[B, Hkv, G * S, D]`` against keys ``[B, Hkv, L, D]``, no
repeated keys). A decode step or a short chunk is one block over every column (a sliding-window layer: the columns
inside its window). A long run of new tokens (a prompt prefilled whole) is split into blocks of :data:`QUERY_BLOCK`
queries, each reading the columns up to its own last query and, in a sliding-window layer, from its first query's
window on: the causal mask's upper triangle and the columns outside every window are never computed (a 1,536-token
prompt's prefill in bf16: 0.74× the time of one masked call, ``bench/prefill.py``). A row's allowed columns are the
same either way, so the result is the same attention.

Where the layer ops bring their own attention (the w8a8 extension's, :func:`attend_in_place`), a group whose rows
hold all of the step's new tokens (:func:`full_rows`: decode steps, a prompt's chunks) runs it instead, on the same
blocks' columns, each row from its own first column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chatstream.engine.cpu.fast_path import ChunkAttention

QUERY_BLOCK = 256
"""New tokens per block when a group runs at least twice as many in one forward."""


@dataclass(frozen=True)
class AttentionBlock:
    """The queries ``[first, last)`` of a group's new tokens, attending to its cache columns ``[start, end)`` under
    ``mask`` ``[B, 1, G * (last - first), end - start]`` (query heads of one key head stacked along the query axis)."""

    first: int
    last: int
    start: int
    end: int
    mask: torch.Tensor


def attention_blocks(
    mask: torch.Tensor, new: int, windows: Sequence[int], groups: int
) -> dict[int | None, list[AttentionBlock]]:
    """Per window (None: full attention) the blocks of ``new`` query tokens, the last ``new`` columns of the
    ``[B, L]`` padding mask, with ``groups`` query heads per key head."""
    length = mask.shape[1]
    allowed = mask[:, None, :]  # [B, 1, L]
    if new > 1:
        columns = torch.arange(length, device=mask.device)
        query_columns = columns[length - new :, None]  # [S, 1]
        allowed = allowed & (columns <= query_columns)  # [B, S, L]
    spans = (
        [(0, new)] if new < 2 * QUERY_BLOCK else [(s, min(new, s + QUERY_BLOCK)) for s in range(0, new, QUERY_BLOCK)]
    )
    blocks: dict[int | None, list[AttentionBlock]] = {}
    for window in (None, *windows):
        blocks[window] = []
        for first, last in spans:  # queries [first, last) of the new tokens
            end = length - new + last  # the column after the block's last query
            start = 0 if window is None else max(0, length - new + first - window + 1)
            block = allowed[:, first:last, start:end] if new > 1 else allowed[:, :, start:end]
            if window is not None:
                keys = torch.arange(start, end, device=mask.device)
                queries = torch.arange(length - new + first, end, device=mask.device)[:, None]
                block = block & (keys > queries - window)
            blocks[window].append(AttentionBlock(first, last, start, end, grouped(block, groups)))
    return blocks


def grouped(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, S, L]`` → ``[B, 1, G*S, L]``: the query heads of one key head are stacked along the query axis."""
    mask = mask.unsqueeze(1)
    if mask.shape[2] > 1 and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)
    return mask


def full_rows(mask: torch.Tensor, new: int) -> torch.Tensor | None:
    """Each row's first column (its left padding before), where every row of the ``[B, L]`` padding mask is padding
    then tokens and holds all ``new`` new tokens (a decode step, a prompt's chunk); None otherwise (a prefill group
    whose shorter rows are padded among the new tokens)."""
    length = mask.shape[1]
    starts = length - mask.sum(dim=1)
    if int(starts.max()) > length - new:
        return None
    if not bool((torch.arange(length, device=mask.device) >= starts[:, None]).eq(mask).all()):
        return None
    return starts


def attend_in_place(
    attend: ChunkAttention,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    blocks: Sequence[AttentionBlock],
    starts: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """The attention of queries ``q`` ``[B, S, H, D]`` (rotated) over the cache's ``keys``/``values``
    ``[B, Hkv, L, D]`` (the ``S`` new columns last) through ``attend``
    block by block, rows reading from ``starts``; returns
    ``[B, S, H, D]``, the layout the output projection reads."""
    _, new, heads, _ = q.shape
    groups = heads // keys.shape[1]
    first_column = keys.shape[2] - new  # the first new token's column
    out = torch.empty_like(q)
    for kv in range(keys.shape[1]):
        query_heads = slice(kv * groups, (kv + 1) * groups)
        for block in blocks:
            tokens = slice(block.first, block.last)
            attend(
                q[:, tokens, query_heads],
                keys[:, kv, block.start : block.end],
                values[:, kv, block.start : block.end],
                starts,
                block.start,
                first_column + block.first - block.start,
                window,
                scale,
                out[:, tokens, query_heads],
            )
    return out
