"""PrefillPacer: the prefill budget in time, learned from the steps' wall times."""

from __future__ import annotations

from chatstream.engine.prefill_pacer import MIN_CHUNK_TOKENS, PrefillPacer


def test_without_measurements_or_decoding_rows_the_budget_is_the_token_limit() -> None:
    pacer = PrefillPacer(256, 2.0)
    assert pacer.budget(decoding=True) == 256  # nothing learned yet
    pacer.observe(num_decodes=8, num_prefill_tokens=0, seconds=0.040)
    assert pacer.budget(decoding=True) == 256  # the cost of a prompt token is still unknown
    pacer.observe(num_decodes=0, num_prefill_tokens=256, seconds=0.256)
    assert pacer.budget(decoding=False) == 256  # nothing decodes: the whole budget


def test_while_rows_decode_a_chunk_keeps_the_step_within_the_slowdown() -> None:
    pacer = PrefillPacer(256, 2.0)
    pacer.observe(num_decodes=8, num_prefill_tokens=0, seconds=0.040)  # a decode step: 40 ms
    pacer.observe(num_decodes=8, num_prefill_tokens=100, seconds=0.140)  # + 1 ms per prompt token
    assert pacer.budget(decoding=True) == 40  # 40 ms more at most: 40 tokens
    tripled = PrefillPacer(256, 3.0)
    tripled.observe(num_decodes=8, num_prefill_tokens=0, seconds=0.040)
    tripled.observe(num_decodes=0, num_prefill_tokens=100, seconds=0.100)
    assert tripled.budget(decoding=True) == 80


def test_the_budget_follows_the_measurements_and_stays_within_its_bounds() -> None:
    pacer = PrefillPacer(64, 2.0)
    pacer.observe(num_decodes=4, num_prefill_tokens=0, seconds=0.010)
    pacer.observe(num_decodes=4, num_prefill_tokens=10, seconds=0.110)  # 10 ms a token: 1 token would fit
    assert pacer.budget(decoding=True) == MIN_CHUNK_TOKENS
    for _ in range(30):  # prefill got much cheaper (0.01 ms a token): the limit again
        pacer.observe(num_decodes=4, num_prefill_tokens=64, seconds=0.0106)
    assert pacer.budget(decoding=True) == 64
    slow = PrefillPacer(8, 2.0)
    slow.observe(num_decodes=4, num_prefill_tokens=0, seconds=0.010)
    slow.observe(num_decodes=0, num_prefill_tokens=8, seconds=1.0)
    assert slow.budget(decoding=True) == 8  # never more than the token limit, even as the minimum


def test_off_means_the_token_limit_always() -> None:
    pacer = PrefillPacer(256, None)
    pacer.observe(num_decodes=8, num_prefill_tokens=0, seconds=0.040)
    pacer.observe(num_decodes=8, num_prefill_tokens=100, seconds=1.0)
    assert pacer.budget(decoding=True) == 256


def test_one_slow_step_does_not_move_the_estimates() -> None:
    pacer = PrefillPacer(256, 2.0)
    for seconds in (0.040, 0.041, 0.039, 1.5, 0.040):  # a page-fault storm in the middle
        pacer.observe(num_decodes=8, num_prefill_tokens=0, seconds=seconds)
    for seconds in (0.080, 0.081, 0.079):
        pacer.observe(num_decodes=8, num_prefill_tokens=40, seconds=seconds)
    assert pacer.budget(decoding=True) == 40


def test_a_stale_decode_estimate_is_replaced_by_the_faster_step() -> None:
    pacer = PrefillPacer(256, 2.0)
    pacer.observe(num_decodes=8, num_prefill_tokens=0, seconds=0.200)  # the first decode steps were slow
    pacer.observe(num_decodes=0, num_prefill_tokens=100, seconds=0.100)  # 1 ms a token
    assert pacer.budget(decoding=True) == 200
    pacer.observe(num_decodes=8, num_prefill_tokens=200, seconds=0.150)  # faster than "a decode alone"
    assert pacer.decode_s == 0.150 and pacer.token_s == 0.001
    assert pacer.budget(decoding=True) == 150


def test_when_more_users_wait_for_a_first_token_than_stream_the_chunk_grows_by_their_ratio() -> None:
    pacer = PrefillPacer(512, 2.0)
    pacer.observe(num_decodes=1, num_prefill_tokens=0, seconds=0.040)  # one stream: 40 ms a step
    pacer.observe(num_decodes=1, num_prefill_tokens=20, seconds=0.060)  # + 1 ms a prompt token
    assert pacer.budget(1) == 40  # nobody waiting counted: 40 ms more at most
    assert pacer.budget(1, waiting=1) == 40  # one user waits for one stream: the same
    assert pacer.budget(1, waiting=7) == 280  # seven users wait for one stream: 7 x 40 ms
    assert pacer.budget(8, waiting=4) == 40  # fewer wait than stream: the streams' pace first
    assert pacer.budget(2, waiting=1000) == 512  # never more than the token limit
