"""Batched next-token sampling: repetition penalties, temperature, top-k, top-p, min-p and per-row seeds.

One call handles a whole decode batch ``[B, V]`` whose rows may have different :class:`SamplingParams`. For one row
the order is the one of Hugging Face ``generate``:

1. repetition penalty over the distinct tokens of prompt + output (multiplicative or subtractive);
2. OpenAI frequency and presence penalties over the output;
3. greedy rows (temperature below ``GREEDY_TEMPERATURE``) take the argmax of the penalised logits;
4. temperature, then top-k (exactly k tokens, even with ties), then top-p on the top-k distribution, then min-p;
5. one draw from the renormalised distribution by inverse CDF, with a single uniform number from the row's own
   generator, so a seeded row gives the same token whatever its batch companions are.

Penalties are gathered and scattered at the seen positions only (no ``[B, V]`` masks, no Python loop over the
vocabulary); sorting happens only for rows that need top-p, and only over the top tokens when they hold the nucleus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from chatstream.config import RepetitionPenaltyMethod, SamplingParams

TOP_P_PREFILTER = 1024
"""Rows with top-p but no top-k first look for their nucleus among this many top tokens (a full sort otherwise)."""

GREEDY_CHUNK_ELEMENTS = 1 << 21
"""Logits widened to float32 at a time by :func:`greedy_argmax` (8 MiB: 8 rows of a 262k vocabulary)."""

ARGMAX_BLOCKS = 512
"""Blocks per row in :func:`argmax_rows`: at most this many, as many as divide the vocabulary evenly."""

MIN_ARGMAX_BLOCKS = 16
"""Fewer blocks than this (a vocabulary with few small factors) and :func:`argmax_rows` is a plain ``argmax``."""

RowLogprobs = tuple[float, tuple[tuple[int, float], ...]]
"""One row's logprobs: the chosen token's, and ``(token id, logprob)`` of the top tokens, best first."""


_TOP_P_TOLERANCE = 1e-6
"""float32 cumulative sums are off by about this much; a cumulative probability this close to p has reached p."""


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``; None (the global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed % 2**64)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick the next token of every row; returns ``[B]`` int64 on the device of ``logits``.

    ``logits`` is never modified; it may have any float dtype (the math runs in float32).
    """
    _check_batch(logits, params, prompt_ids, output_ids, generators)
    penalised = any(_has_penalties(p) for p in params)
    if all(p.greedy for p in params) and not penalised:
        return greedy_argmax(logits)
    logits = logits.float()  # logits: [B, V]
    if penalised:
        logits = apply_penalties(logits, params, prompt_ids, output_ids)
    return _pick(logits, params, generators)


def sample_with_logprobs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    num_logprobs: Sequence[int | None],
) -> tuple[torch.Tensor, list[RowLogprobs | None]]:
    """:func:`sample`, plus the log-probabilities of the rows whose ``num_logprobs`` is not None: the chosen token's
    and the top ``k`` tokens' of the log-softmax of the penalised logits (before temperature and filters)."""
    if len(num_logprobs) != logits.shape[0]:
        raise ValueError(f"{len(num_logprobs)} logprob counts for {logits.shape[0]} rows")
    if all(k is None for k in num_logprobs):
        return sample(logits, params, prompt_ids, output_ids, generators), [None] * len(num_logprobs)
    _check_batch(logits, params, prompt_ids, output_ids, generators)
    processed = logits.float()  # [B, V]
    if any(_has_penalties(p) for p in params):
        processed = apply_penalties(processed, params, prompt_ids, output_ids)
    next_ids = _pick(processed, params, generators)
    return next_ids, token_logprobs(processed, next_ids, num_logprobs)


def token_logprobs(
    logits: torch.Tensor, next_ids: torch.Tensor, num_logprobs: Sequence[int | None]
) -> list[RowLogprobs | None]:
    """The chosen token's log-probability and the top ``k`` of every row with a count; tokens whose probability is
    zero (masked by a grammar) are never among the top ones."""
    # logits: [B, V] float32; next_ids: [B]
    rows = [row for row, k in enumerate(num_logprobs) if k is not None]
    index = torch.tensor(rows, device=logits.device)
    logprobs = logits[index].log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(1, next_ids[index].unsqueeze(1)).squeeze(1).tolist()  # [R]
    k = min(max(num_logprobs[row] or 0 for row in rows), logits.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1)  # [R, k] each
    values, ids = top_values.tolist(), top_ids.tolist()
    out: list[RowLogprobs | None] = [None] * len(num_logprobs)
    for i, row in enumerate(rows):
        pairs = zip(ids[i][: num_logprobs[row]], values[i][: num_logprobs[row]], strict=True)
        out[row] = (chosen[i], tuple((token, value) for token, value in pairs if value != -math.inf))
    return out


def _pick(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """The next token of every row from float32 (penalised) logits: argmax for greedy rows, a draw for the others."""
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return argmax_rows(logits)  # [B]
    if len(sampled_rows) == len(params):
        return _sample_rows(logits, params, generators)
    next_ids = argmax_rows(logits)  # [B]; the sampled rows are overwritten below
    index = torch.tensor(sampled_rows, device=logits.device)
    next_ids[index] = _sample_rows(
        logits[index], [params[row] for row in sampled_rows], [generators[row] for row in sampled_rows]
    )
    return next_ids


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.float().argmax(-1)`` (the same token, the same first-index tie-break) in any float dtype, by
    :func:`argmax_rows`; where that falls back to a plain ``argmax``, low-precision rows are widened a few at a time
    instead of all at once, which keeps every temporary small enough to be reused by the allocator (a 32 × 262k
    float32 copy costs more than the argmax itself)."""
    # logits: [B, V]
    if logits.dtype == torch.float32 or _argmax_blocks(logits) is not None:
        return argmax_rows(logits)
    rows = max(1, GREEDY_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if logits.shape[0] <= rows:
        return logits.float().argmax(dim=-1)
    return torch.cat([chunk.float().argmax(dim=-1) for chunk in logits.split(rows)])  # [B]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``[B, V]`` logits in two passes: the maximum of each block of the row (a plain
    reduction, which PyTorch vectorises; its index reduction over a long row is several times slower), the first
    block holding the row's maximum, then the first index of it within that block. The result is ``argmax``'s: the
    first index of the maximum, a NaN counting as larger than any number (both reductions propagate it)."""
    blocks = _argmax_blocks(logits)
    if blocks is None:
        return logits.argmax(dim=-1)
    size, width = logits.shape[0], logits.shape[-1] // blocks
    by_block = logits.view(size, blocks, width)  # [B, blocks, width]
    block = by_block.amax(dim=-1).argmax(dim=-1)  # [B]: the first block whose maximum is the row's
    within = by_block[torch.arange(size, device=logits.device), block].argmax(dim=-1)  # [B]
    return block * width + within


def _argmax_blocks(logits: torch.Tensor) -> int | None:
    """How many blocks :func:`argmax_rows` splits each row into, or None for a plain ``argmax``."""
    if logits.dim() != 2 or not logits.is_contiguous():
        return None
    blocks = math.gcd(logits.shape[-1], ARGMAX_BLOCKS)
    return blocks if blocks >= MIN_ARGMAX_BLOCKS else None


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """The repetition, frequency and presence penalties of every row; returns a new ``[B, V]`` float32 tensor."""
    logits = logits.float().clone()  # logits: [B, V]
    for method in RepetitionPenaltyMethod:
        rows = [row for row, p in enumerate(params) if _repetition_active(p) and p.repetition_penalty_method is method]
        if rows:
            seen = [(row, ids) for row in rows for ids in (prompt_ids[row], output_ids[row])]
            penalties = [params[row].repetition_penalty or 0.0 for row, _ in seen]
            _repetition_penalty(logits, seen, penalties, method)
    rows = [row for row, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if rows:
        _openai_penalties(logits, rows, [params[row] for row in rows], output_ids)
    return logits


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    sizes = {len(params), len(prompt_ids), len(output_ids), len(generators)}
    if sizes != {logits.shape[0]}:
        raise ValueError(
            f"batch of {logits.shape[0]} rows but {len(params)} params, {len(prompt_ids)} prompts, "
            f"{len(output_ids)} outputs and {len(generators)} generators"
        )


# --- penalties --------------------------------------------------------------------------------------------------


def _repetition_active(p: SamplingParams) -> bool:
    penalty = p.repetition_penalty
    if penalty is None:
        return False
    if p.repetition_penalty_method is RepetitionPenaltyMethod.MULTIPLICATIVE:
        return penalty > 0.0 and penalty != 1.0  # 0 would divide by zero: treated as off
    return penalty != 0.0


def _has_penalties(p: SamplingParams) -> bool:
    return _repetition_active(p) or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _flat_index(
    seqs: Sequence[tuple[int, Sequence[int]]], values: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, token) pairs of every token of every ``(row, ids)`` and the value of its sequence, all ``[N]``."""
    tokens = [torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1) for _, ids in seqs]
    lengths = torch.tensor([t.numel() for t in tokens], device=device)
    rows = torch.repeat_interleave(torch.tensor([row for row, _ in seqs], device=device), lengths)
    per_token = torch.repeat_interleave(torch.tensor(values, dtype=torch.float32, device=device), lengths)
    return rows, torch.cat(tokens), per_token


def _repetition_penalty(
    logits: torch.Tensor,
    seqs: Sequence[tuple[int, Sequence[int]]],
    penalties: Sequence[float],
    method: RepetitionPenaltyMethod,
) -> None:
    # logits: [B, V], changed in place. Every copy of a repeated token computes its new value from the same
    # original logit, so writing the duplicates is idempotent: each distinct token is penalised once.
    rows, tokens, penalty = _flat_index(seqs, penalties, logits.device)  # [N] each
    original = logits[rows, tokens]  # [N]
    if method is RepetitionPenaltyMethod.MULTIPLICATIVE:
        penalised = torch.where(original > 0, original / penalty, original * penalty)
    else:
        penalised = original - penalty
    logits[rows, tokens] = penalised


def _openai_penalties(
    logits: torch.Tensor, rows: Sequence[int], params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]]
) -> None:
    # logits: [B, V], changed in place. Presence: once per distinct output token (idempotent write, as above);
    # frequency: once per occurrence (accumulating write).
    seqs = [(row, output_ids[row]) for row in rows]
    index_rows, tokens, presence = _flat_index(seqs, [p.presence_penalty for p in params], logits.device)
    if tokens.numel() == 0:
        return
    logits[index_rows, tokens] = logits[index_rows, tokens] - presence
    _, _, frequency = _flat_index(seqs, [p.frequency_penalty for p in params], logits.device)
    logits.index_put_((index_rows, tokens), -frequency, accumulate=True)


# --- sampling ---------------------------------------------------------------------------------------------------


def _sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Sample every row (none greedy); returns ``[S]`` token ids."""
    # logits: [S, V]
    vocab_size = logits.shape[-1]
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)  # [S, 1]
    scaled = logits / temperatures  # [S, V]
    uniforms = _uniforms(generators, logits.device)  # [S]
    ks = [_effective_top_k(p, vocab_size) for p in params]
    filtered = [row for row, p in enumerate(params) if ks[row] < vocab_size or p.top_p < 1.0]
    if not filtered:
        return _sample_full_vocab(scaled, params, uniforms)
    if len(filtered) == len(params):
        return _sample_candidates(scaled, params, ks, uniforms)
    filtered_set = set(filtered)
    plain = [row for row in range(len(params)) if row not in filtered_set]
    next_ids = torch.empty(len(params), dtype=torch.long, device=logits.device)
    index = torch.tensor(filtered, device=logits.device)
    next_ids[index] = _sample_candidates(
        scaled[index], [params[row] for row in filtered], [ks[row] for row in filtered], uniforms[index]
    )
    index = torch.tensor(plain, device=logits.device)
    next_ids[index] = _sample_full_vocab(scaled[index], [params[row] for row in plain], uniforms[index])
    return next_ids


def _effective_top_k(p: SamplingParams, vocab_size: int) -> int:
    return min(p.top_k, vocab_size) if p.top_k else vocab_size


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, from the row's own generator (or the global RNG)."""
    uniforms = torch.rand(len(generators), dtype=torch.float64)  # [S]
    for row, generator in enumerate(generators):
        if generator is not None:
            uniforms[row] = torch.rand(1, dtype=torch.float64, generator=generator)[0]
    return uniforms.to(device)


def _sample_full_vocab(scaled: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """Rows without top-k and top-p: the whole vocabulary in token order, no sort."""
    probs = scaled.softmax(dim=-1)  # [S, V]
    if any(p.min_p > 0.0 for p in params):
        probs = _min_p_filter(probs, params, probs.amax(dim=-1, keepdim=True))
    return _inverse_cdf(probs, uniforms)


def _sample_candidates(
    scaled: torch.Tensor, params: Sequence[SamplingParams], ks: Sequence[int], uniforms: torch.Tensor
) -> torch.Tensor:
    """Rows with top-k or top-p: the top tokens in descending order, filtered, then mapped back to token ids."""
    thresholds = [p.top_p - _TOP_P_TOLERANCE if p.top_p < 1.0 else 2.0 for p in params]
    probs, token_ids = _top_candidates(scaled, ks, thresholds)  # [S, K] each
    probs = _top_p_filter(probs, thresholds)
    if any(p.min_p > 0.0 for p in params):
        probs = _min_p_filter(probs, params, probs[:, :1])
    positions = _inverse_cdf(probs, uniforms)  # [S]
    return token_ids.gather(1, positions.unsqueeze(1)).squeeze(1)


def _top_candidates(
    scaled: torch.Tensor, ks: Sequence[int], thresholds: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after top-k (zero beyond each row's k) of the top tokens, in descending order, and their ids."""
    # scaled: [S, V]
    vocab_size = scaled.shape[-1]
    if max(ks) < vocab_size:
        values, token_ids = scaled.topk(max(ks), dim=-1)  # [S, K]
        return _top_k_probs(values, ks, None), token_ids
    width = max([TOP_P_PREFILTER, *(k for k in ks if k < vocab_size)])
    if width < vocab_size:
        values, token_ids = scaled.topk(width, dim=-1)  # [S, W]
        probs = _top_k_probs(values, ks, scaled.logsumexp(dim=-1, keepdim=True))
        if _holds_nucleus(probs, ks, thresholds, vocab_size):
            return probs, token_ids
    values, token_ids = scaled.sort(dim=-1, descending=True)  # [S, V]
    return _top_k_probs(values, ks, None), token_ids


def _top_k_probs(values: torch.Tensor, ks: Sequence[int], full_log_norm: torch.Tensor | None) -> torch.Tensor:
    """Softmax of the first k values of each row (zero beyond); rows whose k is the whole vocabulary are normalised
    over the whole row (``full_log_norm``, ``[S, 1]``) when ``values`` holds only its top tokens."""
    # values: [S, K], sorted descending
    k_column = torch.tensor(ks, device=values.device).unsqueeze(1)  # [S, 1]
    in_top_k = torch.arange(values.shape[-1], device=values.device) < k_column  # [S, K]
    masked = values.masked_fill(~in_top_k, float("-inf"))
    log_norm = masked.logsumexp(dim=-1, keepdim=True)  # [S, 1]
    if full_log_norm is not None:
        log_norm = torch.where(k_column > values.shape[-1], full_log_norm, log_norm)
    return (masked - log_norm).exp()


def _holds_nucleus(probs: torch.Tensor, ks: Sequence[int], thresholds: Sequence[float], vocab_size: int) -> bool:
    """True when the top tokens in ``probs`` ([S, W]) contain the top-p set of every row without top-k."""
    unlimited = torch.tensor([k >= vocab_size for k in ks], device=probs.device)
    reached = probs.cumsum(dim=-1)[:, -1] >= torch.tensor(thresholds, device=probs.device)
    return bool((reached | ~unlimited).all())


def _top_p_filter(probs: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Keep the smallest prefix of each row whose cumulative probability reaches p (at least one token)."""
    # probs: [S, K], sorted descending
    before = probs.cumsum(dim=-1) - probs  # probability mass ahead of each token
    keep = before < torch.tensor(thresholds, device=probs.device).unsqueeze(1)  # [S, K]
    keep[:, 0] = True
    return probs.masked_fill(~keep, 0.0)


def _min_p_filter(probs: torch.Tensor, params: Sequence[SamplingParams], max_probs: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability (``max_probs``: [S, 1])."""
    min_ps = torch.tensor([p.min_p for p in params], device=probs.device).unsqueeze(1)  # [S, 1]
    return probs.masked_fill(probs < min_ps * max_probs, 0.0)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The position in each row where the cumulative mass first exceeds ``u`` × the row's total mass."""
    # probs: [S, W] non-negative, not necessarily normalised; uniforms: [S] float64 in [0, 1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [S, W]; float64 keeps tail tokens' shares exact enough
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)  # [S, 1]
    positions = torch.searchsorted(cdf, targets, right=True)  # [S, 1]; a zero-probability token is never picked
    return positions.clamp_max_(probs.shape[-1] - 1).squeeze(1)
