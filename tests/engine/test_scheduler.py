"""The scheduler on fake model outputs: no model, no tensors, token ids made up by the test."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

from tests.tiny_model import greedy

from chatstream.config import EngineConfig
from chatstream.engine.base import FinishReason, GenerationRequest
from chatstream.engine.prefill_pacer import MIN_CHUNK_TOKENS
from chatstream.engine.prefix_cache import PrefixMatch
from chatstream.engine.scheduler import FreeKV, KeepKV, ModelOutput, PrefillChunk, Scheduler, SchedulerOutput
from chatstream.engine.sequence import Detokenizer, Sequence, SequenceStatus

EOS = 2
KV_BYTES = 10  # per token


def seq(
    request_id: str,
    prompt: SequenceABC[int],
    max_new: int = 8,
    conversation: str | None = None,
    detokenizer: Detokenizer | None = None,
) -> Sequence:
    request = GenerationRequest(request_id, "", greedy(max_new), conversation_id=conversation)
    return Sequence(request, list(prompt), max_new, stop_token_ids=frozenset({EOS}), detokenizer=detokenizer)


def scheduler(**config: int) -> Scheduler:
    return Scheduler(EngineConfig(**config), kv_bytes_per_token=KV_BYTES)


def step(sched: Scheduler, tokens: dict[str, int] | int = 7) -> tuple[SchedulerOutput, list[Sequence]]:
    """Schedule and feed back a fake token per scheduled sequence (``tokens`` by request id, or one for all)."""
    plan = sched.schedule()
    sampled = {s.seq_id: tokens if isinstance(tokens, int) else tokens.get(s.request_id, 7) for s in plan.scheduled}
    return plan, sched.update_from_output(plan, ModelOutput(sampled=sampled))


def ids(seqs: SequenceABC[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def test_waiting_sequences_join_in_arrival_order_then_decode() -> None:
    sched = scheduler()
    for name in ("a", "b", "c"):
        sched.add(seq(name, [1, 3, 4]))
    plan, updated = step(sched)
    assert ids([p.seq for p in plan.group]) == ["a", "b", "c"] and not plan.decodes
    assert plan.chunk == PrefillChunk(0, 3, 3, rows=3) and ids(plan.prefilled) == ["a", "b", "c"]
    assert all(p.prefix == PrefixMatch() for p in plan.group)
    assert ids(sched.running) == ["a", "b", "c"] and all(s.status is SequenceStatus.RUNNING for s in updated)
    plan, _ = step(sched)
    assert ids(plan.decodes) == ["a", "b", "c"] and not plan.group and plan.chunk is None
    assert [s.output_ids for s in sched.running] == [[7, 7]] * 3


def test_batch_size_bounds_the_running_sequences() -> None:
    sched = scheduler(max_batch_size=2)
    a, b, c = seq("a", [1, 3, 4], max_new=2), seq("b", [5, 3, 4], max_new=2), seq("c", [6, 3, 4], max_new=2)
    for s in (a, b, c):
        sched.add(s)
    plan, _ = step(sched)
    assert plan.scheduled == [a, b] and list(sched.waiting) == [c]
    plan, _ = step(sched)  # a and b reach max_new_tokens
    assert plan.decodes == (a, b) and not sched.running and not plan.group
    plan, _ = step(sched)
    assert plan.scheduled == [c]
    assert plan.releases == (a.seq_id, b.seq_id)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_decode() -> None:
    sched = scheduler(max_prefill_tokens=4)
    sched.add(seq("a", [3, 4]))
    step(sched)
    sched.add(seq("long", list(range(20, 30))))  # 10 tokens: chunks of 4, 4 and 2
    chunks = []
    for _ in range(3):
        plan, updated = step(sched)
        assert ids(plan.decodes) == ["a"]
        chunks.append(plan.chunk)
    assert chunks == [PrefillChunk(0, 4, 10), PrefillChunk(4, 8, 10), PrefillChunk(8, 10, 10)]
    assert ids(updated) == ["a", "long"] and ids(sched.running) == ["a", "long"]
    assert sched.num_prefill_chunks_total == 4


def test_the_pacer_shrinks_the_chunks_while_rows_decode_and_learns_from_each_step() -> None:
    sched = scheduler(max_prefill_tokens=64, max_decode_slowdown=2.0)
    sched.add(seq("a", [3, 4]))
    plan, _ = step(sched)
    sched.observe(plan, 0.002)  # a prefill alone: 2 tokens in 2 ms
    plan, _ = step(sched)
    sched.observe(plan, 0.020)  # a decode step: 20 ms, so the chunk beside it may add 20 ms: 20 tokens
    sched.add(seq("long", list(range(20, 120))))
    plan, _ = step(sched)
    assert plan.chunk == PrefillChunk(0, 20, 100)
    sched.observe(plan, 0.020 + 20 * 0.010)  # the tokens cost 10 ms each beside the decode: smaller chunks
    plan, _ = step(sched)
    assert plan.chunk == PrefillChunk(20, 20 + MIN_CHUNK_TOKENS, 100)
    off = scheduler(max_prefill_tokens=64, max_decode_slowdown=None)
    off.add(seq("a", [3, 4]))
    for seconds in (0.002, 0.020):
        plan, _ = step(off)
        off.observe(plan, seconds)
    off.add(seq("long", list(range(20, 120))))
    plan, _ = step(off)
    assert plan.chunk == PrefillChunk(0, 64, 100)


def test_users_waiting_for_a_first_token_beyond_the_streams_get_a_larger_chunk() -> None:
    def paced(batch: int) -> Scheduler:
        sched = scheduler(max_prefill_tokens=256, max_decode_slowdown=2.0, max_batch_size=batch)
        sched.add(seq("a", [3, 4]))
        plan, _ = step(sched)
        sched.observe(plan, 0.002)  # a prefill alone: 2 tokens in 2 ms
        plan, _ = step(sched)
        sched.observe(plan, 0.020)  # one stream decodes: 20 ms a step, so 20 tokens fit beside it
        for name in ("x", "y", "z"):  # three long prompts: one group each, the other two wait in the queue
            sched.add(seq(name, list(range(20, 120))))
        return sched

    plan, _ = step(paced(batch=8))
    assert plan.chunk == PrefillChunk(0, 60, 100)  # three users wait for one stream: 3 x 20 tokens
    plan, _ = step(paced(batch=2))
    assert plan.chunk == PrefillChunk(0, 20, 100)  # the batch has no room for the queue: it does not count


def test_a_group_is_formed_while_it_fits_one_step_with_little_padding() -> None:
    sched = scheduler(max_prefill_tokens=10)
    sched.add(seq("a", [3, 4, 5, 6]))
    sched.add(seq("b", [7, 4, 5, 6]))  # 2 rows x 4 tokens fit
    sched.add(seq("c", [8, 4, 5, 6]))  # 3 x 4 do not
    plan, _ = step(sched)
    assert ids([p.seq for p in plan.group]) == ["a", "b"]
    sched.add(seq("d", [9]))
    plan, _ = step(sched)
    assert ids([p.seq for p in plan.group]) == ["c", "d"]  # 2 x 4 padded for 5 tokens of work
    sched.add(seq("e", [10, 11, 12, 13, 14, 15, 16, 17, 18]))
    sched.add(seq("f", [19]))
    plan, _ = step(sched)
    assert ids([p.seq for p in plan.group]) == ["e"]  # with f: 2 x 9 padded for 10 tokens of work


def test_stop_token_and_length_finish_and_the_rows_are_released_next_step() -> None:
    sched = scheduler()
    sched.add(seq("eos", [3, 4], max_new=10))
    sched.add(seq("short", [5, 4], max_new=2))
    _, updated = step(sched)
    assert [s.take_delta().token_ids for s in updated] == [(7,), (7,)]
    _, updated = step(sched, tokens={"eos": EOS})
    deltas = {s.request_id: s.take_delta() for s in updated}
    assert deltas["eos"].finish_reason is FinishReason.STOP and deltas["eos"].token_ids == (EOS,)
    assert deltas["short"].finish_reason is FinishReason.LENGTH and deltas["short"].num_generated_tokens == 2
    assert not sched.running and sched.has_work()
    plan, updated = step(sched)
    assert len(plan.releases) == 2 and not plan.scheduled and not updated
    assert not sched.has_work()


def test_a_stop_string_seen_by_the_detokenizer_finishes() -> None:
    class StopAtNine:
        stopped = False

        def add_tokens(self, token_ids: SequenceABC[int]) -> str:
            self.stopped = 9 in token_ids
            return "" if self.stopped else "x"

        def flush(self) -> str:
            return ""

    sched = scheduler()
    sched.add(seq("a", [3, 4], detokenizer=StopAtNine()))
    _, updated = step(sched, tokens=5)
    assert updated[0].take_delta().text == "x"
    _, updated = step(sched, tokens=9)
    delta = updated[0].take_delta()
    assert delta.finish_reason is FinishReason.STOP and delta.text == ""


def test_model_errors_fail_only_those_sequences_and_leave_no_row_to_release() -> None:
    sched = scheduler()
    sched.add(seq("ok", [3, 4]))
    sched.add(seq("bad", [3, 5]))
    plan = sched.schedule()
    ok, bad = plan.scheduled
    updated = sched.update_from_output(plan, ModelOutput({ok.seq_id: 7}, {bad.seq_id: "prefill failed: boom"}))
    assert bad.take_delta().error == "prefill failed: boom" and bad.finish_reason is FinishReason.ERROR
    assert updated == [ok, bad] and sched.running == [ok]
    assert sched.num_prompt_tokens_total == 2
    assert not sched.schedule().releases


def test_a_failed_chunk_fails_the_whole_group() -> None:
    sched = scheduler(max_prefill_tokens=2)
    long = seq("long", [3, 4, 5, 6, 7])
    sched.add(long)
    plan = sched.schedule()
    assert plan.chunk == PrefillChunk(0, 2, 5) and not plan.prefilled
    updated = sched.update_from_output(plan, ModelOutput(errors={long.seq_id: "prefill failed: boom"}))
    assert updated == [long] and long.finish_reason is FinishReason.ERROR
    assert not sched.prefilling and not sched.has_work()


def test_abort_of_waiting_prefilling_and_running_sequences() -> None:
    sched = scheduler(max_batch_size=2, max_prefill_tokens=2)
    sched.add(seq("run", [3, 4], conversation="c"))
    step(sched)
    sched.add(seq("pre", [5, 6, 7, 8]))
    sched.add(seq("wait", [9, 4]))
    step(sched)  # "pre" has its first chunk
    waiting = sched.abort("wait")
    assert waiting is not None and waiting.finish_reason is FinishReason.ABORT and not sched.waiting
    prefilling = sched.abort("pre")
    assert prefilling is not None and prefilling.finish_reason is FinishReason.ABORT
    running = sched.abort("run")
    assert running is not None and running.finish_reason is FinishReason.ABORT and not sched.running
    assert sched.abort("unknown") is None and sched.abort("run") is None
    plan = sched.schedule()
    assert plan.cancel_group and plan.chunk is None and not sched.prefilling
    assert plan.releases == (running.seq_id,)  # an aborted turn keeps its KV: prompt and answer are cached
    assert [op for op in plan.cache_ops if isinstance(op, KeepKV)] == [KeepKV(1, running.seq_id, 2, 3)]


def test_prompts_and_answers_are_cached_and_a_next_turn_reuses_them() -> None:
    sched = scheduler()
    first = seq("t1", [3, 4, 5], max_new=2, conversation="c")
    sched.add(first)
    step(sched, tokens=8)
    plan, _ = step(sched, tokens=9)  # length: the KV of 3 4 5 8 is cached (9 never went through the model)
    assert plan.cache_ops == (KeepKV(0, first.seq_id, 0, 3),)  # the prompt, after its prefill
    assert sched.prefix_cache.num_bytes == 4 * KV_BYTES
    other = seq("t2", [3, 4, 5, 8, 9, 6, 6], conversation="c")
    sched.add(other)
    plan, _ = step(sched)
    assert plan.releases == (first.seq_id,) and plan.cache_ops == (KeepKV(1, first.seq_id, 3, 4),)
    (prefill,) = plan.group
    assert prefill.prefix == PrefixMatch(((0, 3), (1, 1)), 4)
    assert prefill.seq.num_cached_tokens == 4 and sched.num_cached_tokens_total == 4
    assert sched.num_prefix_hits_total == 1 and sched.num_prefix_queries_total == 2


def test_another_conversation_reuses_a_shared_prompt_but_not_the_last_token() -> None:
    sched = scheduler()
    sched.add(seq("a", [3, 4, 5, 6], conversation="c1"))
    step(sched)
    sched.add(seq("b", [3, 4, 5, 6], conversation="c2"))
    sched.add(seq("c", [3, 4, 9], conversation="c3"))
    plan, _ = step(sched)
    # the shared prompt is cached after a's prefill; b recomputes only its last token, c its last and first new one
    assert [(p.seq.request_id, p.num_cached_tokens) for p in plan.group] == [("b", 3), ("c", 2)]


def test_a_sequence_waits_for_a_prefix_that_its_group_is_about_to_cache() -> None:
    sched = scheduler(max_prefill_tokens=1000)
    system = list(range(100, 150))
    sched.add(seq("a", [*system, 1, 2]))
    sched.add(seq("b", [*system, 3]))
    plan, _ = step(sched)
    assert ids([p.seq for p in plan.group]) == ["a"]
    plan, _ = step(sched)
    (prefill,) = plan.group
    assert prefill.seq.request_id == "b" and prefill.num_cached_tokens == len(system)


def test_hits_prefill_together_with_the_longest_uncached_part() -> None:
    sched = scheduler()
    sched.prefix_cache.insert(list(range(3, 13)))  # 10 cached
    sched.prefix_cache.insert(list(range(30, 36)))  # 6 cached
    sched.add(seq("a", [*range(3, 13), 20]))  # 1 new token
    sched.add(seq("b", [*range(30, 36), 20, 21, 22, 23]))  # 4 new tokens
    sched.add(seq("plain", [40, 41]))
    plan, _ = step(sched)
    # "a" recomputes 3 of its cached tokens so that every row runs 4 new tokens
    assert [(p.seq.request_id, p.num_cached_tokens) for p in plan.group] == [("a", 7), ("b", 6), ("plain", 0)]
    assert plan.chunk == PrefillChunk(0, 4, 4, rows=3)


def test_eviction_frees_the_dropped_nodes() -> None:
    sched = Scheduler(EngineConfig(prefix_cache_bytes=6 * KV_BYTES), kv_bytes_per_token=KV_BYTES)
    a = seq("a", [3, 4, 5, 6], max_new=1)
    sched.add(a)
    step(sched)
    b = seq("b", [7, 8, 9, 10], max_new=1)
    sched.add(b)
    plan, _ = step(sched)
    assert plan.cache_ops == (KeepKV(0, a.seq_id, 0, 4),)
    plan, _ = step(sched)
    assert plan.cache_ops == (KeepKV(1, b.seq_id, 0, 4), FreeKV(0))
    assert sched.prefix_cache.num_bytes == 4 * KV_BYTES


def test_finish_all_ends_everything_and_forgets_pending_releases() -> None:
    sched = scheduler(max_batch_size=1)
    sched.add(seq("run", [3, 4], conversation="c"))
    sched.add(seq("wait", [5, 4]))
    step(sched)
    sched.abort("run")
    sched.add(seq("run2", [6, 4]))
    step(sched)
    assert ids(sched.running) == ["wait"] and ids(sched.waiting) == ["run2"] and len(sched.prefix_cache) == 2
    failed = sched.finish_all(FinishReason.ERROR, "boom", waiting=False)
    assert ids(failed) == ["wait"] and failed[0].take_delta().error == "boom"
    assert not sched.running and len(sched.prefix_cache) == 0 and ids(sched.waiting) == ["run2"]
    assert not sched.schedule().releases  # the runner is reset with the scheduler: no row is left to release
    aborted = sched.finish_all(FinishReason.ABORT)
    assert ids(aborted) == ["run2"] and aborted[0].finish_reason is FinishReason.ABORT and not sched.has_work()


def test_plan_lists_decodes_before_the_prefilled() -> None:
    plan = SchedulerOutput(decodes=(seq("a", [1]),), prefilled=(seq("b", [1]),))
    assert ids(plan.scheduled) == ["a", "b"]


def test_a_hit_that_would_recompute_most_of_its_cache_waits_for_the_next_group() -> None:
    sched = scheduler()
    sched.prefix_cache.insert(list(range(3, 23)))  # 20 cached
    sched.add(seq("long", list(range(40, 58))))  # 18 new tokens
    sched.add(seq("next_turn", [*range(3, 23), 24]))  # beside "long" it would compute 18 columns: 17 of its 20 again
    plan, _ = step(sched)
    assert [p.seq.request_id for p in plan.group] == ["long"]
    plan, _ = step(sched)
    assert [(p.seq.request_id, p.num_cached_tokens) for p in plan.group] == [("next_turn", 20)]
