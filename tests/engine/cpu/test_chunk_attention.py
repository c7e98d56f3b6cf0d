"""The extension's attention for one row's new tokens (a prompt's chunk; AVX512-BF16) against float32 masked
attention, and the fused decoder running it where it applies."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.tiny_model import tiny_gemma
from torch.nn import functional as F

from chatstream.engine.cpu import w8a8
from chatstream.engine.cpu.fast_path import LayerOps
from chatstream.engine.cpu.fused_decoder import FusedDecoder
from chatstream.engine.kv_cache import BatchKVCache

reason = w8a8.attention_unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"chunk attention: {reason}")


def _allowed(rows: int, tokens: int, columns: int, offset: int, window: int) -> torch.Tensor:
    own = offset + torch.arange(rows) % tokens  # row m is token m % tokens, at column offset + m % tokens
    keys = torch.arange(columns)[None]
    allowed = keys <= own[:, None]
    if window:
        allowed &= keys > own[:, None] - window
    return allowed


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q[None, None].float(), k[None, None].float(), v[None, None].float(), attn_mask=allowed[None, None], scale=scale
    )[0, 0]


@pytest.mark.parametrize(
    ("tokens", "columns", "window", "groups", "head_dim"),
    [
        (1, 1, 0, 4, 256),  # one token reading only itself
        (3, 10, 0, 4, 256),
        (16, 1000, 0, 4, 256),  # a chunk late in a long prompt
        (16, 527, 512, 4, 256),  # a sliding-window layer's columns: the window before the chunk's first token
        (37, 700, 512, 4, 256),  # rows that are not whole blocks of 32, a window shorter than the columns
        (64, 1500, 0, 2, 128),
        (5, 300, 7, 1, 64),  # a window of 7: most columns outside every row's window
        (256, 256, 0, 4, 256),  # a whole prompt
        (100, 130, 40, 1, 64),
        (1, 1500, 0, 4, 256),  # a decode step: few query rows, the columns split between threads and merged
        (1, 700, 512, 4, 256),
        (8, 600, 7, 1, 64),  # split columns where some rows have none of theirs in a part
    ],
)
def test_it_computes_masked_attention(tokens: int, columns: int, window: int, groups: int, head_dim: int) -> None:
    """Within what ``scaled_dot_product_attention`` in bfloat16 differs from float32 (the output's rounding)."""
    generator = torch.Generator().manual_seed(tokens * 1000 + columns)
    rows = groups * tokens

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)

    q, k, v = randn(rows, head_dim), randn(columns, head_dim, scale=2.0), randn(columns, head_dim)
    offset, scale = columns - tokens, head_dim**-0.5
    allowed = _allowed(rows, tokens, columns, offset, window)
    expected = _reference(q, k, v, allowed, scale)
    got = w8a8.chunk_attention(q, k, v, tokens, offset, window, scale)
    assert got.shape == (rows, head_dim) and got.dtype == torch.bfloat16
    sdpa = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], attn_mask=allowed[None, None],
                                          scale=scale)[0, 0]  # fmt: skip
    bound = max(float((sdpa.float() - expected).abs().max()), float(expected.abs().max()) / 256)
    assert float((got.float() - expected).abs().max()) <= bound


def test_it_reads_key_rows_of_a_larger_buffer_and_tokens_before_the_last_columns() -> None:
    """Keys and values as the cache holds them (rows of a buffer with more heads and spare columns), and a block of
    tokens that is not at the end of the columns it reads (a prompt's first query block)."""
    generator = torch.Generator().manual_seed(3)
    buffer_k = torch.randn(2, 900, 64, generator=generator).to(torch.bfloat16)  # [heads, capacity, D]
    buffer_v = torch.randn(2, 900, 64, generator=generator).to(torch.bfloat16)
    k, v = buffer_k[1, 100:700], buffer_v[1, 100:700]
    assert not k.is_contiguous() or k.storage_offset() > 0
    tokens, offset = 50, 320  # tokens at columns 320..369 of 600
    q = torch.randn(4 * tokens, 64, generator=generator).to(torch.bfloat16)
    allowed = _allowed(4 * tokens, tokens, 600, offset, 0)
    expected = _reference(q, k, v, allowed, 0.125)
    got = w8a8.chunk_attention(q, k, v, tokens, offset, 0, 0.125)
    assert float((got.float() - expected).abs().max()) <= float(expected.abs().max()) / 128


def test_it_rejects_what_it_cannot_read() -> None:
    q, k = torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(10, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        w8a8.chunk_attention(q[:, :48], k[:, :48], k[:, :48], 8, 2, 0, 1.0)
    with pytest.raises(RuntimeError, match="lie in the key columns"):
        w8a8.chunk_attention(q, k, k, 8, 5, 0, 1.0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        w8a8.chunk_attention(q.float(), k.float(), k.float(), 8, 2, 0, 1.0)


def _counting(decoder: FusedDecoder, kernel: Any) -> list[int]:
    """Install ``kernel`` as the decoder's chunk attention (None: none); returns a list that counts its calls."""
    calls: list[int] = []

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return kernel(*args)

    decoder.ops = LayerOps(chunk_attention=None if kernel is None else counted)
    return calls


def _run(decoder: FusedDecoder, chunks: list[list[int]], rows: int = 1) -> list[torch.Tensor]:
    """Prefill ``chunks`` one forward after another on one cache (``rows`` copies of each); returns the logits."""
    cache, done, logits = BatchKVCache(len(decoder.layers)), 0, []
    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.tensor([chunk] * rows)
            positions = torch.arange(done, done + len(chunk)).repeat(rows, 1)
            mask = torch.ones((rows, done + len(chunk)), dtype=torch.bool)
            logits.append(decoder(ids, positions, mask, cache))
            done += len(chunk)
    return logits


def _same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(got, expected, strict=True):
        assert float((a.float() - b.float()).abs().max()) < 0.05 * float(b.float().abs().max())
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_the_fused_decoder_runs_a_prompts_chunks_on_it(tiny_tokenizer: Any) -> None:
    """A prompt prefilled in chunks past the window, alone and as two rows: logits within bfloat16 rounding of the
    decoder's own attention and the same next tokens; the kernel runs for every layer of every chunk (the last, of
    one token, as a decode step)."""
    model = tiny_gemma(len(tiny_tokenizer))
    prompt = torch.randint(3, len(tiny_tokenizer), (90,), generator=torch.Generator().manual_seed(2)).tolist()
    chunks = [prompt[:40], prompt[40:57], prompt[57:89], prompt[89:]]
    plain, fused = FusedDecoder(model), FusedDecoder(model)
    assert not _counting(plain, None)
    for rows in (1, 2):
        calls = _counting(fused, w8a8.chunk_attention_into)
        _same(_run(fused, chunks, rows), _run(plain, chunks, rows))
        assert len(calls) == len(chunks) * len(model.model.layers)


def test_left_padded_rows_decode_on_it_and_a_padded_prefill_does_not(tiny_tokenizer: Any) -> None:
    """Two prompts of 10 and 60 tokens prefilled together (the shorter padded among the new tokens: the decoder's
    own attention), then decoded four steps (each row from its own first column: the kernel); every layer attends
    to every column, so a row reading its padding would differ."""
    model = tiny_gemma(len(tiny_tokenizer), ("full_attention",) * 3)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, len(tiny_tokenizer), (n,), generator=generator).tolist() for n in (10, 60)]
    ids = torch.zeros((2, 60), dtype=torch.long)
    mask = torch.zeros((2, 60), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, 60 - len(prompt) :], mask[row, 60 - len(prompt) :] = torch.tensor(prompt), True
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    plain, fused = FusedDecoder(model), FusedDecoder(model)
    _counting(plain, None)
    calls = _counting(fused, w8a8.chunk_attention_into)
    caches = [BatchKVCache(len(model.model.layers)) for _ in range(2)]
    with torch.inference_mode():
        expected, got = plain(ids, positions, mask, caches[0]), fused(ids, positions, mask, caches[1])
        assert not calls and torch.equal(got, expected)
        for _ in range(4):
            step = expected.argmax(-1)[:, None]
            positions, mask = positions[:, -1:] + 1, torch.cat([mask, torch.ones((2, 1), dtype=torch.bool)], dim=1)
            expected, got = plain(step, positions, mask, caches[0]), fused(step, positions, mask, caches[1])
            # the same rounding as the decoder's own attention: a few units in the last place of the largest logit
            assert float((got.float() - expected.float()).abs().max()) < 0.01 * float(expected.float().abs().max())
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert len(calls) == 4 * len(model.model.layers)
