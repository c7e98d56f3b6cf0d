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
    assert engine.stats().prefix_cache_entries == 1
    assert engine.stats().prefix_cache_bytes > 0

    second_ids = first_ids + first.token_ids + tiny_tokenizer.encode(PROMPTS[6])
    second = await collect(engine.add_request(turn("t2", second_ids, 12)))
    # the last token of turn 1 never went through the model, so its KV is not cached
    assert second.deltas[-1].num_cached_tokens == len(first_ids) + len(first.token_ids) - 1
    assert second.token_ids == reference(tiny_model, second_ids, 12)
    assert engine.stats().num_cached_tokens_total == second.deltas[-1].num_cached_tokens

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


async def test_budget_evicts_the_least_recently_used(make_tiny_engine: Any, tiny_tokenizer: Any) -> None:
    probe = make_tiny_engine()
    ids = tiny_tokenizer.encode(PROMPTS[3])
    await collect(probe.add_request(turn("p", ids, 4)))
    one_entry = probe.stats().prefix_cache_bytes
    engine = make_tiny_engine(prefix_cache_bytes=int(one_entry * 2.5))
    for i in range(4):
        await collect(engine.add_request(turn(f"r{i}", ids, 4, conversation=f"c{i}")))
    stats = engine.stats()
    assert stats.prefix_cache_entries == 2
    assert stats.prefix_cache_bytes <= one_entry * 2.5
    oldest = await collect(engine.add_request(turn("again0", ids, 4, conversation="c0")))
    newest = await collect(engine.add_request(turn("again3", ids, 4, conversation="c3")))
    assert oldest.deltas[-1].num_cached_tokens == 0
    assert newest.deltas[-1].num_cached_tokens == len(ids) - 1


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
    # every row used as much of its cache as the longest new suffix allowed
    longest_suffix = max(len(seconds[i]) - (len(firsts[i][0]) + len(firsts[i][1].token_ids) - 1) for i in range(4))
    for i, result in results.items():
        assert result.deltas[-1].num_cached_tokens == max(len(seconds[i]) - longest_suffix, 0)
