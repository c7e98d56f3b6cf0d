"""The batched sampler on hand-made logits: filters, penalties, greedy, seeds, empirical distributions."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from chatstream.config import GREEDY_TEMPERATURE, SamplingParams
from chatstream.engine import sampler as sampler_module
from chatstream.engine.sampler import (
    TOP_P_PREFILTER,
    apply_penalties,
    argmax_rows,
    greedy_argmax,
    make_generator,
    sample,
)

torch.set_num_threads(1)


def params(**changes: object) -> SamplingParams:
    """Sampling with every filter off unless asked for."""
    base = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    base.update(changes)
    return SamplingParams(**base)  # type: ignore[arg-type]


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def draw(row: torch.Tensor, p: SamplingParams, n: int = 4000, seed: int = 0) -> Counter[int]:
    """Sample ``n`` times from one row of logits (as one batch of n identical rows)."""
    torch.manual_seed(seed)
    logits = row.unsqueeze(0).repeat(n, 1)
    ids = sample(logits, [p] * n, [()] * n, [()] * n, [None] * n)
    assert ids.shape == (n,) and ids.dtype == torch.int64
    return Counter(ids.tolist())


def reference_support(row: torch.Tensor, p: SamplingParams) -> dict[int, float]:
    """The filtered, renormalised distribution of one row, computed the slow obvious way in float64."""
    logits = row.double().numpy() / p.temperature
    order = sorted(range(len(logits)), key=lambda t: -logits[t])
    if p.top_k:
        order = order[: p.top_k]
    weights = np.exp(np.array([logits[t] for t in order]) - logits[order[0]])
    probs = weights / weights.sum()
    kept, mass = [], 0.0
    for token, prob in zip(order, probs, strict=True):
        if kept and mass >= p.top_p - 1e-9:
            break
        kept.append((token, prob))
        mass += prob
    kept = [(t, q) for t, q in kept if q >= p.min_p * probs[0]]
    total = sum(q for _, q in kept)
    return {t: q / total for t, q in kept}


def chi_square(counts: Counter[int], expected: dict[int, float]) -> float:
    n = sum(counts.values())
    return sum((counts.get(t, 0) - n * q) ** 2 / (n * q) for t, q in expected.items())


# --- greedy -------------------------------------------------------------------------------------------------------


def test_all_greedy_is_argmax_of_each_row() -> None:
    logits = torch.randn(6, 50)
    greedy = params(temperature=0.0)
    ids = sample(logits, [greedy] * 6, [()] * 6, [()] * 6, [None] * 6)
    assert torch.equal(ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_argmax_matches_float_argmax_in_chunks(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(sampler_module, "GREEDY_CHUNK_ELEMENTS", 3 * 40)  # 3 rows per chunk: 4 chunks of 11 rows
    torch.manual_seed(0)
    logits = torch.randn(11, 40).to(dtype)
    logits[4, 7] = logits[4, 30] = logits[4].max() + 1  # a tie: the first index wins, as in float32
    expected = logits.float().argmax(dim=-1)
    assert expected[4] == 7
    assert torch.equal(greedy_argmax(logits), expected)
    greedy = params(temperature=0.0)
    assert torch.equal(sample(logits, [greedy] * 11, [()] * 11, [()] * 11, [None] * 11), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_argmax_by_blocks_is_argmax_with_its_ties_nans_and_infinities(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(9, 4096).to(dtype)  # 512 blocks of 8
    top = logits.float().max() + 1
    logits[0, 100] = logits[0, 3000] = top  # a tie across blocks: the first wins
    logits[1, 17] = logits[1, 18] = top  # a tie within a block
    logits[2, 4095] = top  # the last column
    logits[3, 0] = top  # the first
    logits[4, 2000] = logits[4, 10] = float("nan")  # NaNs count as the largest: the first of them
    logits[5] = float("-inf")  # every token masked: index 0, as argmax
    logits[6, 500], logits[6, 900] = float("inf"), float("nan")
    logits[7, 1234] = float("inf")
    assert sampler_module._argmax_blocks(logits) == sampler_module.ARGMAX_BLOCKS
    expected = logits.float().argmax(dim=-1)
    assert expected[:7].tolist() == [100, 17, 4095, 0, 10, 0, 900]
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(greedy_argmax(logits), expected)


@pytest.mark.parametrize("vocab", [50257, 96, 1000])
def test_argmax_by_blocks_takes_any_vocabulary(vocab: int) -> None:
    # 50257 is odd (a plain argmax), 96 splits into 32 blocks of 3, 1000 into 8 (too few: a plain argmax)
    torch.manual_seed(1)
    logits = torch.randn(5, vocab)
    logits[0, vocab - 1] = logits[0, vocab // 2] = 9.0
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(argmax_rows(logits[:, : vocab - 1]), logits[:, : vocab - 1].argmax(dim=-1))  # not contiguous


def test_temperature_below_threshold_is_greedy_and_at_threshold_samples() -> None:
    row = torch.tensor([0.0, 0.0, -1.0])  # two tied top tokens: sampling shows both, argmax only one
    below = draw(row, params(temperature=GREEDY_TEMPERATURE / 2), n=200)
    assert len(below) == 1
    at = draw(row, params(temperature=GREEDY_TEMPERATURE), n=200)
    assert set(at) == {0, 1}


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(2, 10)
    before = logits.clone()
    p = params(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0, temperature=0.7, top_p=0.5)
    sample(logits, [p, p], [[1, 2], [3]], [[4, 4], []], [None, None])
    assert torch.equal(logits, before)


def test_half_precision_logits() -> None:
    logits = torch.randn(3, 40).to(torch.bfloat16)
    ids = sample(logits, [params(temperature=0.0)] * 3, [()] * 3, [()] * 3, [None] * 3)
    assert torch.equal(ids, logits.float().argmax(dim=-1))


# --- filters alone ----------------------------------------------------------------------------------------------


def test_top_k_alone() -> None:
    row = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]) / 3
    assert set(draw(row, params(top_k=3))) == {0, 1, 2}


def test_top_k_with_ties_keeps_exactly_k() -> None:
    row = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    kept = set(draw(row, params(top_k=2)))
    assert len(kept) == 2 and kept <= {0, 1, 2, 3}


def test_top_k_larger_than_vocabulary_is_off() -> None:
    row = torch.zeros(4)
    assert set(draw(row, params(top_k=100))) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.75, {0, 1}),  # 0.5 + 0.25 reaches p exactly: the third token is not needed
        (0.76, {0, 1, 2}),
        (0.5, {0}),  # the top token alone reaches p exactly
        (0.4, {0}),  # the top token alone is above p: still at least one token
        (0.01, {0}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_boundaries(top_p: float, expected: set[int]) -> None:
    row = log_probs(0.5, 0.25, 0.125, 0.125)
    assert set(draw(row, params(top_p=top_p))) == expected


def test_top_p_keeps_order_not_token_ids() -> None:
    row = log_probs(0.1, 0.2, 0.6, 0.1)
    assert set(draw(row, params(top_p=0.8))) == {1, 2}


def test_min_p_alone() -> None:
    row = log_probs(0.4, 0.3, 0.2, 0.1)
    assert set(draw(row, params(min_p=0.6))) == {0, 1}  # keeps prob >= 0.24
    assert set(draw(row, params(min_p=0.4))) == {0, 1, 2}  # keeps prob >= 0.16
    assert set(draw(row, params(min_p=1.0))) == {0}


# --- filters combined -------------------------------------------------------------------------------------------


def test_top_p_is_computed_on_the_top_k_distribution() -> None:
    row = log_probs(0.4, 0.3, 0.2, 0.1)
    # after top-k=2 the top token has 0.4 / 0.7 = 0.571 >= 0.55; without renormalisation it would need two tokens
    assert set(draw(row, params(top_k=2, top_p=0.55))) == {0}
    assert set(draw(row, params(top_k=3, top_p=0.55))) == {0, 1}


def test_temperature_top_k_top_p_together() -> None:
    row = log_probs(0.4, 0.3, 0.2, 0.06, 0.04)
    # T=1: top-4 renormalised is [.417, .313, .208, .063]: 0.85 needs three tokens
    assert set(draw(row, params(top_k=4, top_p=0.85))) == {0, 1, 2}
    # T=0.5 squares the probabilities: [.545, .307, .136, .012] after top-4: two tokens reach 0.85
    assert set(draw(row, params(temperature=0.5, top_k=4, top_p=0.85))) == {0, 1}
    # T=2 flattens them to [.338, .293, .239, .131] after top-4: 0.9 needs all four, the fifth is cut by top-k
    assert set(draw(row, params(temperature=2.0, top_k=4, top_p=0.9))) == {0, 1, 2, 3}
    assert set(draw(row, params(top_k=4, top_p=0.9))) == {0, 1, 2}


def test_all_filters_match_a_reference_on_random_rows() -> None:
    gen = torch.Generator().manual_seed(7)
    for case in range(12):
        row = torch.randn(60, generator=gen) * 2
        p = params(
            temperature=[0.5, 1.0, 1.7][case % 3],
            top_k=[0, 5, 20, 40][case % 4],
            top_p=[1.0, 0.6, 0.9][case % 3],
            min_p=[0.0, 0.05][case % 2],
        )
        expected = reference_support(row, p)
        counts = draw(row, p, n=3000, seed=case)
        assert set(counts) <= set(expected), (case, p)
        frequent = {t for t, q in expected.items() if q > 0.01}
        assert frequent <= set(counts), (case, p)


# --- empirical distributions ------------------------------------------------------------------------------------


def test_top_p_distribution_is_renormalised() -> None:
    row = log_probs(0.4, 0.3, 0.2, 0.1)
    expected = {0: 4 / 9, 1: 3 / 9, 2: 2 / 9}
    counts = draw(row, params(top_p=0.85), n=30000, seed=3)
    assert 3 not in counts
    # chi-square with 2 degrees of freedom: 13.8 is the 0.999 quantile. Sampling from the unrenormalised or the
    # unfiltered distribution gives a statistic in the hundreds.
    assert chi_square(counts, expected) < 13.8
    wrong = {0: 0.4 / 0.9 * 0.95, 1: 0.3 / 0.9 * 1.1, 2: 0.2 / 0.9 * 0.9875}
    assert chi_square(counts, wrong) > 13.8  # the test can tell a 5% distortion apart


def test_full_vocabulary_distribution_with_temperature() -> None:
    row = log_probs(0.5, 0.3, 0.15, 0.05)
    expected = reference_support(row, params(temperature=0.8))
    counts = draw(row, params(temperature=0.8), n=30000, seed=4)
    assert chi_square(counts, expected) < 16.3  # 3 degrees of freedom, 0.999 quantile


@pytest.mark.parametrize("peaked", [True, False])
def test_top_p_over_a_large_vocabulary(peaked: bool) -> None:
    # peaked: the nucleus lies within the first TOP_P_PREFILTER tokens; flat: it does not (full sort)
    vocab = 3 * TOP_P_PREFILTER
    gen = torch.Generator().manual_seed(11)
    row = torch.randn(vocab, generator=gen) * (6.0 if peaked else 0.3)
    p = params(top_p=0.9)
    expected = reference_support(row, p)
    assert (len(expected) < TOP_P_PREFILTER) == peaked
    counts = draw(row, p, n=2000, seed=5)
    assert set(counts) <= set(expected)
    top = max(expected, key=lambda t: expected[t])
    assert abs(counts[top] / 2000 - expected[top]) < 5 * math.sqrt(expected[top] / 2000) + 1e-3


def test_top_p_without_top_k_is_relative_to_the_whole_vocabulary() -> None:
    # 40% of the mass lies in a long flat tail beyond the first TOP_P_PREFILTER tokens: top-p must still count it
    vocab = 3 * TOP_P_PREFILTER
    tail = 0.4 / (vocab - 5)
    row = log_probs(0.2, 0.15, 0.1, 0.08, 0.07, *([tail] * (vocab - 5)))
    p = params(top_p=0.5)
    assert set(reference_support(row, p)) == {0, 1, 2, 3}
    assert set(draw(row, p, n=2000)) == {0, 1, 2, 3}
    assert set(draw(row, params(top_p=0.5, top_k=vocab), n=2000)) == {0, 1, 2, 3}


# --- penalties --------------------------------------------------------------------------------------------------


def test_multiplicative_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    p = params(repetition_penalty=2.0)
    out = apply_penalties(logits, [p], [[0, 4]], [[1, 1, 1]])
    # positive divided, negative multiplied, the repeated token penalised once, unseen tokens untouched
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 0.0]]


def test_subtractive_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    p = params(repetition_penalty=1.5, repetition_penalty_method="subtractive")
    out = apply_penalties(logits, [p], [[0, 0]], [[1, 0]])
    assert out.tolist() == [[0.5, -3.5, 1.0]]


@pytest.mark.parametrize(
    "p",
    [
        params(),
        params(repetition_penalty=1.0),
        params(repetition_penalty=0.0, repetition_penalty_method="subtractive"),
    ],
)
def test_penalties_off(p: SamplingParams) -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    assert torch.equal(apply_penalties(logits, [p], [[0, 1, 2]], [[0, 1, 2]]), logits)


def test_frequency_and_presence_penalties_count_the_output_only() -> None:
    logits = torch.zeros(1, 5)
    p = params(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, [p], [[2, 4, 4]], [[2, 2, 2, 3]])
    assert out.tolist() == [[0.0, 0.0, -1.75, -0.75, 0.0]]


def test_all_penalties_on_different_rows() -> None:
    logits = torch.tensor([[1.0, -1.0, 3.0]] * 3)
    rows = [
        params(repetition_penalty=2.0),
        params(repetition_penalty=0.5, repetition_penalty_method="subtractive", presence_penalty=1.0),
        params(frequency_penalty=-1.0),
    ]
    out = apply_penalties(logits, rows, [[0], [0], [0]], [[1, 1], [1, 1], [1, 1]])
    assert out.tolist() == [[0.5, -2.0, 3.0], [0.5, -2.5, 3.0], [1.0, 1.0, 3.0]]


def test_penalties_accept_token_id_tensors() -> None:
    # the engine may keep prompt and output ids as tensors to skip the list-to-tensor conversion
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    p = params(repetition_penalty=2.0, frequency_penalty=0.5)
    out = apply_penalties(logits, [p], [torch.tensor([0])], [torch.tensor([1, 1])])
    assert out.tolist() == [[1.0, -5.0, 1.0, 0.0]]


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    greedy = params(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [greedy], [[0]], [[]], [None]).tolist() == [1]
    assert sample(logits, [params(temperature=0.0)], [[0]], [[]], [None]).tolist() == [0]


# --- seeds and mixed batches ------------------------------------------------------------------------------------


def _run_seeded(companions: list[SamplingParams], steps: int = 30) -> list[int]:
    """Token ids of a seeded row over ``steps`` steps, next to the given companion rows."""
    target = params(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    generator = make_generator(target.seed)
    logit_gen = torch.Generator().manual_seed(99)
    chosen = []
    for _ in range(steps):
        row = torch.randn(2000, generator=logit_gen)
        batch = torch.stack([row] + [torch.randn(2000) for _ in companions])
        all_params = [target, *companions]
        n = len(all_params)
        gens = [generator] + [make_generator(c.seed) for c in companions]
        chosen.append(int(sample(batch, all_params, [()] * n, [()] * n, gens)[0]))
    return chosen


def test_seeded_row_does_not_depend_on_its_companions() -> None:
    alone = _run_seeded([])
    companions = [params(temperature=0.0), params(top_k=0, top_p=0.5), params(seed=5, top_k=1500), params(min_p=0.1)]
    assert _run_seeded(companions) == alone
    assert _run_seeded([*companions[::-1], params(seed=8)]) == alone
    assert len(set(alone)) > 5  # it really samples


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = torch.randn(1, 500)
    p = params(temperature=1.5)

    def tokens(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [int(sample(logits, [p], [()], [()], [generator])[0]) for _ in range(40)]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


def test_make_generator() -> None:
    assert make_generator(None) is None
    first, second = make_generator(-3), make_generator(-3)
    assert first is not None and second is not None
    assert torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=second))


def test_mixed_batch() -> None:
    vocab = 30
    logits = torch.randn(5, vocab)
    rows = [
        params(temperature=0.0),
        params(top_k=1),
        params(top_k=3, temperature=0.7),
        params(temperature=0.0, repetition_penalty=100.0),
        params(top_p=0.3, min_p=0.2, seed=3),
    ]
    prompts: list[list[int]] = [[], [], [], [int(logits[3].argmax())], []]
    for _ in range(50):
        gens = [make_generator(p.seed) for p in rows]
        ids = sample(logits, rows, prompts, [[]] * 5, gens).tolist()
        assert ids[0] == int(logits[0].argmax())
        assert ids[1] == int(logits[1].argmax())
        assert ids[2] in set(logits[2].topk(3).indices.tolist())
        assert ids[3] == int(apply_penalties(logits[3:4], rows[3:4], prompts[3:4], [[]]).argmax())
        assert ids[3] != int(logits[3].argmax())
        assert ids[4] in reference_support(logits[4], rows[4])


def test_batch_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="batch of 2 rows"):
        sample(torch.zeros(2, 4), [params()], [()], [()], [None])
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.zeros(4), [params()], [()], [()], [None])


# --- logprobs -----------------------------------------------------------------------------------------------------


def test_logprobs_of_chosen_and_top_tokens_with_penalties_and_masks() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, float("-inf"), float("-inf")], [1.0, 1.0, 1.0, 1.0]])
    rows = [params(temperature=0.0, repetition_penalty=4.0), params(temperature=0.7, seed=1), params()]
    prompts, outputs = [[0], [], []], [[], [], []]
    generators = [make_generator(p.seed) for p in rows]
    tokens, logprobs = sampler_module.sample_with_logprobs(logits, rows, prompts, outputs, generators, [2, 5, None])
    again = sample(logits, rows, prompts, outputs, [make_generator(p.seed) for p in rows])
    assert tokens.tolist()[:2] == again.tolist()[:2]
    penalised = torch.tensor([0.5, 1.0, 0.0, -1.0]).log_softmax(-1)  # 2.0 / 4 for the prompt's token 0
    chosen, top = logprobs[0]  # type: ignore[misc]
    assert tokens[0] == 1 and chosen == pytest.approx(float(penalised[1]))
    assert [t for t, _ in top] == [1, 0] and [v for _, v in top] == pytest.approx(penalised[[1, 0]].tolist())
    _, masked_top = logprobs[1]  # type: ignore[misc]
    assert [t for t, _ in masked_top] == [1, 0]  # the masked tokens are never offered
    assert logprobs[2] is None


def test_logprobs_not_asked_for_cost_nothing() -> None:
    logits = torch.randn(3, 10)
    tokens, logprobs = sampler_module.sample_with_logprobs(
        logits, [params(temperature=0.0)] * 3, [[]] * 3, [[]] * 3, [None] * 3, [None] * 3
    )
    assert tokens.tolist() == logits.argmax(-1).tolist() and logprobs == [None, None, None]
