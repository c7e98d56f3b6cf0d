"""The scheduler on fake model outputs: no model, no tensors, token ids made up by the test."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

from tests.tiny_model import greedy

from chatstream.config import EngineConfig
from chatstream.engine.base import FinishReason, GenerationRequest
from chatstream.engine.scheduler import (
    ModelOutput,
    PrefixCache,
    PrefixEntry,
    Release,
    Scheduler,
    SchedulerOutput,
    common_prefix_len,
)
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
    assert ids(plan.scheduled) == ["a", "b", "c"] and not plan.decodes
    assert all(p.prefix_owner is None and p.num_cached_tokens == 0 for p in plan.prefills)
    assert ids(sched.running) == ["a", "b", "c"] and all(s.status is SequenceStatus.RUNNING for s in updated)
    plan, _ = step(sched)
    assert ids(plan.decodes) == ["a", "b", "c"] and not plan.prefills
    assert [s.output_ids for s in sched.running] == [[7, 7]] * 3


def test_batch_size_bounds_the_running_sequences() -> None:
    sched = scheduler(max_batch_size=2)
    a, b, c = seq("a", [1, 3, 4], max_new=2), seq("b", [1, 3, 4], max_new=2), seq("c", [1, 3, 4], max_new=2)
    for s in (a, b, c):
        sched.add(s)
    plan, _ = step(sched)
    assert plan.scheduled == [a, b] and list(sched.waiting) == [c]
    plan, _ = step(sched)  # a and b reach max_new_tokens
    assert plan.decodes == (a, b) and not sched.running
    plan, _ = step(sched)
    assert plan.scheduled == [c]
    assert plan.releases == (Release(a.seq_id, keep=False), Release(b.seq_id, keep=False))


def test_prefill_budget_counts_padded_tokens_and_the_first_always_joins() -> None:
    sched = scheduler(max_prefill_tokens=10)
    sched.add(seq("long", list(range(3, 20))))  # 17 tokens: over the budget alone, joins anyway
    sched.add(seq("a", [3, 4, 5, 6]))
    plan, _ = step(sched)
    assert ids(plan.scheduled) == ["long"]
    for name in ("b", "c"):
        sched.add(seq(name, [3, 4, 5, 6]))
    step(sched)  # a decode step comes between two prefills while rows run
    plan, _ = step(sched)
    assert ids(plan.scheduled) == ["a", "b"]  # 4 tokens x 2 rows fits, x 3 does not
    assert ids(sched.waiting) == ["c"]


def test_a_prefill_step_is_followed_by_a_decode_step_while_rows_run() -> None:
    sched = scheduler()
    sched.add(seq("a", [3, 4]))
    step(sched)
    sched.add(seq("b", [3, 4]))
    plan, _ = step(sched)
    assert ids(plan.decodes) == ["a"] and not plan.prefills
    plan, _ = step(sched)
    assert ids(plan.scheduled) == ["b"] and not plan.decodes
    plan, _ = step(sched)
    assert ids(plan.decodes) == ["a", "b"]


def test_stop_token_and_length_finish_and_the_rows_are_released_next_step() -> None:
    sched = scheduler()
    sched.add(seq("eos", [3, 4], max_new=10))
    sched.add(seq("short", [3, 4], max_new=2))
    _, updated = step(sched)
    assert [s.take_delta().token_ids for s in updated] == [(7,), (7,)]
    _, updated = step(sched, tokens={"eos": EOS})
    deltas = {s.request_id: s.take_delta() for s in updated}
    assert deltas["eos"].finish_reason is FinishReason.STOP and deltas["eos"].token_ids == (EOS,)
    assert deltas["short"].finish_reason is FinishReason.LENGTH and deltas["short"].num_generated_tokens == 2
    assert not sched.running and sched.has_work()
    plan, updated = step(sched)
    assert [r.keep for r in plan.releases] == [False, False] and not plan.scheduled and not updated
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


def test_abort_of_waiting_and_running_sequences() -> None:
    sched = scheduler(max_batch_size=1)
    sched.add(seq("run", [3, 4], conversation="c"))
    sched.add(seq("wait", [3, 4]))
    step(sched)
    waiting = sched.abort("wait")
    assert waiting is not None and waiting.finish_reason is FinishReason.ABORT and not sched.waiting
    running = sched.abort("run")
    assert running is not None and running.finish_reason is FinishReason.ABORT and not sched.running
    assert sched.abort("unknown") is None and sched.abort("run") is None
    plan = sched.schedule()
    assert plan.releases == (Release(running.seq_id, keep=True),)  # an aborted turn keeps its KV
    entry = sched.prefix_cache.peek("c")
    assert entry is not None and entry.owner == running.seq_id and entry.token_ids == (3, 4)


def test_finished_turn_is_kept_and_the_next_turn_is_planned_on_it() -> None:
    sched = scheduler()
    first = seq("t1", [3, 4, 5], max_new=2, conversation="c")
    sched.add(first)
    step(sched, tokens=8)
    step(sched, tokens=9)  # length: the KV of 3 4 5 8 is kept (9 never went through the model)
    entry = sched.prefix_cache.peek("c")
    assert entry == PrefixEntry((3, 4, 5, 8), first.seq_id, 4 * KV_BYTES)
    assert sched.prefix_cache.num_bytes == 4 * KV_BYTES
    sched.add(seq("t2", [3, 4, 5, 8, 9, 6, 6], conversation="c"))
    plan, _ = step(sched)
    assert plan.releases == (Release(first.seq_id, keep=True),)
    (prefill,) = plan.prefills
    assert prefill.prefix_owner == first.seq_id and prefill.num_cached_tokens == 4
    assert prefill.seq.num_cached_tokens == 4 and sched.num_cached_tokens_total == 4
    assert sched.prefix_cache.peek("c") is None  # the new turn owns it now


def test_regenerate_reuses_all_but_the_last_prompt_token() -> None:
    sched = scheduler()
    sched.prefix_cache.put("c", PrefixEntry((3, 4, 5, 6), owner=100, num_bytes=40))
    sched.add(seq("again", [3, 4, 5], conversation="c"))
    plan, _ = step(sched)
    assert plan.prefills[0].prefix_owner == 100 and plan.prefills[0].num_cached_tokens == 2


def test_hits_prefill_together_with_the_longest_uncached_part() -> None:
    sched = scheduler()
    sched.prefix_cache.put("c1", PrefixEntry(tuple(range(3, 13)), owner=101, num_bytes=100))  # 10 cached
    sched.prefix_cache.put("c2", PrefixEntry(tuple(range(3, 9)), owner=102, num_bytes=60))  # 6 cached
    sched.add(seq("a", [*range(3, 13), 20], conversation="c1"))  # 1 new token
    sched.add(seq("b", [*range(3, 9), 20, 21, 22, 23], conversation="c2"))  # 4 new tokens
    sched.add(seq("plain", [30, 31]))
    plan, _ = step(sched)
    assert [(p.seq.request_id, p.prefix_owner, p.num_cached_tokens) for p in plan.prefills] == [
        ("a", 101, 11 - 4),  # recomputes 3 of its cached tokens so that both rows run 4 new tokens
        ("b", 102, 6),
        ("plain", None, 0),
    ]


def test_a_turn_that_shares_nothing_frees_the_conversations_kv() -> None:
    sched = scheduler()
    sched.prefix_cache.put("c", PrefixEntry((3, 4), owner=100, num_bytes=20))
    sched.add(seq("new", [9, 9, 9], conversation="c"))
    plan, _ = step(sched)
    assert plan.prefills[0].prefix_owner is None and plan.freed_prefixes == (100,)


def test_prefix_cache_lru_budget_returns_what_it_drops() -> None:
    cache = PrefixCache(max_bytes=20)
    assert cache.put("a", PrefixEntry((1,), 1, 10)) == []
    assert cache.put("b", PrefixEntry((1,), 2, 10)) == []
    assert cache.put("c", PrefixEntry((1,), 3, 10)) == [1]  # the least recently used goes
    assert len(cache) == 2 and cache.peek("a") is None and cache.num_bytes == 20
    assert cache.put("b", PrefixEntry((1, 2), 4, 10)) == [2]  # replaced
    popped = cache.pop("b")
    assert popped is not None and popped.owner == 4 and cache.num_bytes == 10
    assert cache.put("huge", PrefixEntry((1,), 5, 100)) == [5]  # larger than the whole budget: not kept
    assert cache.clear() == [3] and cache.num_bytes == 0
    assert not PrefixCache(0).enabled


def test_finish_all_ends_everything_and_forgets_pending_releases() -> None:
    sched = scheduler(max_batch_size=1)
    sched.add(seq("run", [3, 4], conversation="c"))
    sched.add(seq("wait", [3, 4]))
    step(sched)
    sched.abort("run")
    sched.add(seq("run2", [3, 4]))
    step(sched)
    assert ids(sched.running) == ["wait"] and ids(sched.waiting) == ["run2"] and len(sched.prefix_cache) == 1
    failed = sched.finish_all(FinishReason.ERROR, "boom", waiting=False)
    assert ids(failed) == ["wait"] and failed[0].take_delta().error == "boom"
    assert not sched.running and len(sched.prefix_cache) == 0 and ids(sched.waiting) == ["run2"]
    assert not sched.schedule().releases  # the runner is reset with the scheduler: no row is left to release
    aborted = sched.finish_all(FinishReason.ABORT)
    assert ids(aborted) == ["run2"] and aborted[0].finish_reason is FinishReason.ABORT and not sched.has_work()


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2]) == 2
