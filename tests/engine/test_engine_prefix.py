"""Per-conversation KV reuse: the next turn prefills only its new tokens and answers exactly as without reuse."""

from __future__ import annotations

from typing import Any

from tests.tiny_model import PROMPTS, collect, greedy, reference

from chatstream.engine.base import FinishReason, GenerationRequest


def turn(request_id: str, ids: list[int], max_new: int, conversation: str | None = "c1") -> GenerationRequest:
    return GenerationRequest(
        request_id, "", greedy(max_new, ignore_eos=True), prompt_token_ids=tuple(ids), conversation_id=conversation
    )


async def test_second_turn_reuses_the_first_turns_kv(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    first_ids = tiny_tokenizer.encode(PROMPTS[3])
    first = await collect(engine.add_request(turn("t1", first_ids, 10)))
    assert first.deltas[-1].num_cached_tokens == 0
    stats = engine.stats()
    assert stats.prefix_cache_entries == 2  # the prompt, cached after its prefill, and the answer after it
    assert stats.prefix_cache_tokens == len(first_ids) + len(first.token_ids) - 1
    assert stats.prefix_cache_bytes > 0 and stats.prefix_cache_queries_total == 1 and stats.prefix_cache_hits_total == 0

    second_ids = first_ids + first.token_ids + tiny_tokenizer.encode(PROMPTS[6])
    second = await collect(engine.add_request(turn("t2", second_ids, 12)))
    # the last token of turn 1 never went through the model, so its KV is not cached
    assert second.deltas[-1].num_cached_tokens == len(first_ids) + len(first.token_ids) - 1
    assert second.token_ids == reference(tiny_model, second_ids, 12)
    assert engine.stats().num_cached_tokens_total == second.deltas[-1].num_cached_tokens
    assert engine.stats().prefix_cache_hits_total == 1

    fresh = make_tiny_engine(prefix_cache_bytes=0)
    await collect(fresh.add_request(turn("t1", first_ids, 10)))
    without = await collect(fresh.add_request(turn("t2", second_ids, 12)))
    assert without.deltas[-1].num_cached_tokens == 0
    assert without.token_ids == second.token_ids
    assert fresh.stats().prefix_cache_entries == 0


async def test_regenerate_reuses_all_but_the_last_prompt_token(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    ids = tiny_tokenizer.encode(PROMPTS[1])
    await collect(engine.add_request(turn("a", ids, 6)))
    again = await collect(engine.add_request(turn("b", ids, 6)))
    assert again.deltas[-1].num_cached_tokens == len(ids) - 1
    assert again.token_ids == reference(tiny_model, ids, 6)


async def test_reuse_inside_a_busy_batch(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine()
    ids = tiny_tokenizer.encode(PROMPTS[5])
    first = await collect(engine.add_request(turn("a", ids, 8)))
    others = [engine.add_request(turn(f"o{i}", tiny_tokenizer.encode(PROMPTS[i]), 30, None)) for i in (0, 7)]
    longer = ids + first.token_ids + tiny_tokenizer.encode(PROMPTS[4])
    second = engine.add_request(turn("b", longer, 10))
    second_out = await collect(second)
    assert second_out.deltas[-1].num_cached_tokens > 0
    assert second_out.token_ids == reference(tiny_model, longer, 10)
    for i, stream in zip((0, 7), others, strict=True):
        assert (await collect(stream)).token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), 30)


async def test_budget_evicts_the_least_recently_used(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    probe = make_tiny_engine()
    prompts = [tiny_tokenizer.encode(PROMPTS[i]) for i in (3, 5, 7, 1)]  # share no first token
    await collect(probe.add_request(turn("p", prompts[0], 4)))
    one_turn = probe.stats().prefix_cache_bytes
    budget = int(one_turn * 2.5)
    engine = make_tiny_engine(prefix_cache_bytes=budget)
    for i, ids in enumerate(prompts):
        await collect(engine.add_request(turn(f"r{i}", ids, 4, conversation=f"c{i}")))
        assert engine.stats().prefix_cache_bytes <= budget
    assert engine.stats().prefix_cache_evictions_total > 0
    oldest = await collect(engine.add_request(turn("again0", prompts[0], 4, conversation="c0")))
    newest = await collect(engine.add_request(turn("again3", prompts[3], 4, conversation="c3")))
    assert oldest.deltas[-1].num_cached_tokens == 0
    assert newest.deltas[-1].num_cached_tokens == len(prompts[3]) - 1
    assert oldest.token_ids == reference(tiny_model, prompts[0], 4)
    assert newest.token_ids == reference(tiny_model, prompts[3], 4)


async def test_aborted_turn_keeps_its_kv(make_tiny_engine: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine()
    ids = tiny_tokenizer.encode(PROMPTS[2])
    stream = engine.add_request(turn("a", ids, 100))
    got = []
    async for delta in stream:
        got.append(delta)
        if len(got) == 3:
            engine.abort("a")
    assert got[-1].finish_reason is FinishReason.ABORT
    generated = [t for d in got for t in d.token_ids]
    follow = await collect(engine.add_request(turn("b", ids + generated + [5], 3)))
    assert follow.deltas[-1].num_cached_tokens == len(ids) + len(generated) - 1


async def test_several_conversations_prefill_their_next_turns_together(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    firsts = {}
    for i in range(4):  # different first-turn lengths
        ids = tiny_tokenizer.encode(PROMPTS[i])
        firsts[i] = (ids, await collect(engine.add_request(turn(f"a{i}", ids, 6 + i, conversation=f"c{i}"))))
    # next turns with suffixes of different lengths, sent at once
    suffixes = {0: PROMPTS[7], 1: "ok", 2: PROMPTS[5], 3: PROMPTS[2] + PROMPTS[6]}
    seconds = {}
    for i, (ids, first) in firsts.items():
        seconds[i] = ids + first.token_ids + tiny_tokenizer.encode(suffixes[i])
    streams = {i: engine.add_request(turn(f"b{i}", seconds[i], 9, conversation=f"c{i}")) for i in range(4)}
    results = {i: await collect(stream) for i, stream in streams.items()}
    for i, result in results.items():
        assert result.token_ids == reference(tiny_model, seconds[i], 9), i
    assert sum(result.deltas[-1].num_cached_tokens > 0 for result in results.values()) >= 2
    # Rows prefilled together compute as many new columns as the longest uncached suffix among them, so a row with a
    # short suffix recomputes part of its cache; a row that would lose more than half of it waits for the next
    # group instead. Every row therefore keeps at least half of what the first turn cached (its prompt and answer,
    # short of the answer's last token), and never more.
    for i, result in results.items():
        cached_by_first_turn = len(firsts[i][0]) + len(firsts[i][1].token_ids) - 1
        assert cached_by_first_turn <= 2 * result.deltas[-1].num_cached_tokens <= 2 * cached_by_first_turn, i


async def test_conversations_sharing_a_system_prompt_reuse_its_kv(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    """Four conversations that start with the same system prompt arrive together: the first prefills it, the others
    reuse it (they wait one group for it), and every answer is the one of generate."""
    engine = make_tiny_engine(max_batch_size=8)
    system = tiny_tokenizer.encode(PROMPTS[3] + " " + PROMPTS[7])
    assert len(system) > 40
    prompts = [system + tiny_tokenizer.encode(PROMPTS[i]) for i in (0, 1, 2, 6)]
    streams = [engine.add_request(turn(f"u{i}", ids, 10, conversation=f"c{i}")) for i, ids in enumerate(prompts)]
    outs = [await collect(stream) for stream in streams]
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference(tiny_model, ids, 10)
    cached = [out.deltas[-1].num_cached_tokens for out in outs]
    # the three reuse the system prompt together: each computes as many new tokens as the longest new part
    longest_new = max(len(ids) - len(system) for ids in prompts[1:])
    assert cached[0] == 0 and cached[1:] == [len(ids) - longest_new for ids in prompts[1:]], cached
    stats = engine.stats()
    assert stats.prefix_cache_hits_total == 3 and stats.prefix_cache_queries_total == 4
    assert stats.num_cached_tokens_total == sum(cached) and 0 < stats.prefix_cache_hit_rate < 1
    # a later request with the same system prompt, from nobody so far, reuses it too
    late = system + tiny_tokenizer.encode(PROMPTS[5])
    out = await collect(engine.add_request(turn("late", late, 6, conversation=None)))
    assert out.deltas[-1].num_cached_tokens >= len(system) - 1
    assert out.token_ids == reference(tiny_model, late, 6)


async def test_a_next_turn_reuses_the_answer_up_to_the_first_differing_token(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    first_ids = tiny_tokenizer.encode(PROMPTS[1])
    first = await collect(engine.add_request(turn("t1", first_ids, 10)))
    # the history as re-tokenized differs from the generated ids from the fourth answer token on
    changed = first.token_ids[3] + 1 if first.token_ids[3] + 1 < len(tiny_tokenizer) else 5
    second_ids = first_ids + first.token_ids[:3] + [changed] + tiny_tokenizer.encode(PROMPTS[6])
    second = await collect(engine.add_request(turn("t2", second_ids, 8)))
    assert second.deltas[-1].num_cached_tokens == len(first_ids) + 3
    assert second.token_ids == reference(tiny_model, second_ids, 8)


async def test_a_long_prompt_joins_a_busy_batch_in_chunks(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    """With a prefill budget of 8 tokens a long prompt is prefilled over many steps while the running streams keep
    decoding (one delta per step); every answer is the one of generate."""
    engine = make_tiny_engine(max_prefill_tokens=8, prefix_cache_bytes=0)
    running = [engine.add_request(turn(f"r{i}", tiny_tokenizer.encode(PROMPTS[i]), 40, None)) for i in (0, 4)]
    seen = [await anext(aiter(stream)) for stream in running]
    long_ids = tiny_tokenizer.encode(PROMPTS[3] + " " + PROMPTS[5] + " " + PROMPTS[7])
    assert len(long_ids) > 60
    joiner = engine.add_request(turn("long", long_ids, 12, None))
    long_out = await collect(joiner)
    assert long_out.token_ids == reference(tiny_model, long_ids, 12)
    assert engine.stats().num_prefill_chunks_total >= len(long_ids) // 8 + 1
    for i, stream, first in zip((0, 4), running, seen, strict=True):
        rest = await collect(stream)
        tokens = list(first.token_ids) + rest.token_ids
        assert tokens == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), 40)
        # the stream never stalled for the whole prefill: it got a token at every step
        assert all(len(d.token_ids) <= 2 for d in rest.deltas)


async def test_a_tiny_budget_evicts_under_load_and_answers_stay_exact(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    probe = make_tiny_engine()
    await collect(probe.add_request(turn("p", tiny_tokenizer.encode(PROMPTS[1]), 2)))
    per_token = probe.stats().prefix_cache_bytes // (len(tiny_tokenizer.encode(PROMPTS[1])) + 1)
    engine = make_tiny_engine(prefix_cache_bytes=per_token * 30, max_batch_size=4)
    history = {c: tiny_tokenizer.encode(PROMPTS[c]) for c in range(4)}
    for round_ in range(3):
        streams = {c: engine.add_request(turn(f"{c}-{round_}", ids, 6, f"c{c}")) for c, ids in history.items()}
        for c, stream in streams.items():
            out = await collect(stream)
            assert out.token_ids == reference(tiny_model, history[c], 6), (round_, c)
            history[c] = history[c] + out.token_ids + tiny_tokenizer.encode(PROMPTS[(c + round_) % 8])
        assert engine.stats().prefix_cache_bytes <= per_token * 30
    assert engine.stats().prefix_cache_evictions_total > 0
    assert len(engine.llm.model_runner.kept) == engine.stats().prefix_cache_entries
