"""LLMEngine stepped by the test, without a thread, on the tiny model."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tests.tiny_model import PROMPTS, greedy, reference

from chatstream.config import EngineConfig
from chatstream.engine.base import Delta, FinishReason, GenerationRequest
from chatstream.engine.llm_engine import LLMEngine, RequestOutput


def run_until_idle(llm: LLMEngine, outputs: dict[str, list[Delta]], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not llm.has_work():
            return
        record(outputs, llm.step())
    raise AssertionError("the engine did not finish")


def record(outputs: dict[str, list[Delta]], new: list[RequestOutput]) -> None:
    for request_id, delta in new:
        outputs[request_id].append(delta)


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_requests_joining_at_different_steps_get_the_tokens_of_generate(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_batch_size=4))
    outputs: dict[str, list[Delta]] = defaultdict(list)
    for i in range(6):
        assert llm.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(12 + i))) == []
        record(outputs, llm.step())
        record(outputs, llm.step())
    run_until_idle(llm, outputs)
    for i in range(6):
        deltas = outputs[f"r{i}"]
        assert tokens(deltas) == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), 12 + i), i
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert not llm.model_runner.batches and not llm.scheduler.running
    assert llm.stats().num_generated_tokens_total == sum(len(tokens(d)) for d in outputs.values())


def test_one_delta_per_request_and_step_and_prefill_then_decode(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    for i in range(3):
        llm.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(5, ignore_eos=True)))
    first = llm.step()
    assert [o.request_id for o in first] == ["r0", "r1", "r2"]
    assert all(len(o.delta.token_ids) == 1 for o in first)
    assert len(llm.model_runner.seq_ids) == 3
    llm.add_request(GenerationRequest("late", PROMPTS[3], greedy(5, ignore_eos=True)))
    second = llm.step()  # the rows that joined decode in the same forward as the late request's prefill
    assert [o.request_id for o in second] == ["r0", "r1", "r2", "late"]
    assert len(llm.model_runner.seq_ids) == 4


def test_abort_gives_the_last_delta_at_once_and_the_row_leaves_at_the_next_step(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    for i in range(2):
        llm.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(20, ignore_eos=True)))
    llm.step()
    (aborted,) = llm.abort_request("r0")
    assert aborted.request_id == "r0" and aborted.delta.finish_reason is FinishReason.ABORT
    assert llm.abort_request("r0") == [] and llm.abort_request("nobody") == []
    assert [o.request_id for o in llm.step()] == ["r1"]
    assert sorted(llm.model_runner.seq_ids) == sorted(s.seq_id for s in llm.scheduler.running)


def test_a_bad_request_is_answered_at_once(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    (output,) = llm.add_request(GenerationRequest("bad", "", greedy(4), prompt_token_ids=(1, 99_999)))
    assert output.delta.finish_reason is FinishReason.ERROR and "99999" in (output.delta.error or "")
    assert not llm.has_work()


def test_next_turn_reuses_the_kept_kv(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    ids = tiny_tokenizer.encode(PROMPTS[3])
    outputs: dict[str, list[Delta]] = defaultdict(list)
    llm.add_request(GenerationRequest("t1", "", greedy(6, ignore_eos=True), tuple(ids), conversation_id="c"))
    run_until_idle(llm, outputs)
    assert llm.stats().prefix_cache_entries == 2 and len(llm.model_runner.kept) == 2  # the prompt, then the answer
    second = ids + tokens(outputs["t1"]) + tiny_tokenizer.encode(PROMPTS[0])
    llm.add_request(GenerationRequest("t2", "", greedy(6, ignore_eos=True), tuple(second), conversation_id="c"))
    run_until_idle(llm, outputs)
    assert outputs["t2"][-1].num_cached_tokens == len(ids) + 6 - 1
    assert tokens(outputs["t2"]) == reference(tiny_model, second, 6)


def test_abort_all_and_fail_running(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_batch_size=1))
    for i in range(2):
        llm.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(20, ignore_eos=True)))
    llm.step()
    failed = llm.fail_running("boom")
    assert [(o.request_id, o.delta.finish_reason, o.delta.error) for o in failed] == [
        ("r0", FinishReason.ERROR, "boom")
    ]
    assert not llm.model_runner.batches and llm.stats().num_waiting == 1
    llm.step()
    assert [(o.request_id, o.delta.finish_reason) for o in llm.abort_all()] == [("r1", FinishReason.ABORT)]
    assert not llm.has_work() and not llm.model_runner.batches


def _long_prompt(tokenizer: Any, length: int) -> tuple[int, ...]:
    ids = [t for p in PROMPTS for t in tokenizer.encode(p)]
    return tuple((ids * (length // len(ids) + 1))[:length])


def test_a_long_prompt_joins_as_a_decode_group_of_its_own_without_copying_the_running_rows(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_batch_size=8, max_prefill_tokens=32))
    outputs: dict[str, list[Delta]] = defaultdict(list)
    for i in range(2):
        llm.add_request(GenerationRequest(f"short{i}", PROMPTS[i], greedy(40, ignore_eos=True)))
    while len(llm.model_runner.seq_ids) < 2:
        record(outputs, llm.step())
    running = list(llm.model_runner.batches)
    long_ids = _long_prompt(tiny_tokenizer, 150)
    llm.add_request(GenerationRequest("long", "", greedy(6, ignore_eos=True), prompt_token_ids=long_ids))
    while not outputs["long"]:
        record(outputs, llm.step())
    runner = llm.model_runner
    *kept, joined = runner.batches
    assert len(kept) == len(running) and all(a is b for a, b in zip(kept, running, strict=True))  # no copy
    assert max(b.attention_mask.shape[1] for b in kept) < 100 < joined.attention_mask.shape[1]
    assert joined.seq_ids == [llm.scheduler.running[-1].seq_id]
    run_until_idle(llm, outputs)
    assert tokens(outputs["long"]) == reference(tiny_model, list(long_ids), 6)
    for i in range(2):
        assert tokens(outputs[f"short{i}"]) == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), 40), i
    assert not runner.batches


def test_decode_groups_past_the_limit_merge_and_every_row_keeps_the_tokens_of_generate(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    from chatstream.engine.model_runner import MAX_DECODE_GROUPS

    llm = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_batch_size=16))
    outputs: dict[str, list[Delta]] = defaultdict(list)
    prompts = {f"r{i}": _long_prompt(tiny_tokenizer, 10 + 25 * i) for i in range(MAX_DECODE_GROUPS + 2)}
    most = 0
    for request_id, ids in prompts.items():
        llm.add_request(GenerationRequest(request_id, "", greedy(30, ignore_eos=True), prompt_token_ids=ids))
        record(outputs, llm.step())
        record(outputs, llm.step())
        most = max(most, len(llm.model_runner.batches))
    assert most == MAX_DECODE_GROUPS and len(llm.model_runner.seq_ids) == len(prompts)
    run_until_idle(llm, outputs)
    for request_id, ids in prompts.items():
        assert tokens(outputs[request_id]) == reference(tiny_model, list(ids), 30), request_id


def test_without_the_fused_decoder_the_running_rows_stay_in_one_group(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(fused_decoder=False))
    outputs: dict[str, list[Delta]] = defaultdict(list)
    llm.add_request(GenerationRequest("short", PROMPTS[0], greedy(12, ignore_eos=True)))
    record(outputs, llm.step())
    long_ids = _long_prompt(tiny_tokenizer, 120)
    llm.add_request(GenerationRequest("long", "", greedy(4, ignore_eos=True), prompt_token_ids=long_ids))
    record(outputs, llm.step())
    assert len(llm.model_runner.batches) == 1 and len(llm.model_runner.seq_ids) == 2
    run_until_idle(llm, outputs)
    assert tokens(outputs["long"]) == reference(tiny_model, list(long_ids), 4)
    assert tokens(outputs["short"]) == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[0]), 12)
