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
    assert llm.model_runner.batch is None and not llm.scheduler.running
    assert llm.stats().num_generated_tokens_total == sum(len(tokens(d)) for d in outputs.values())


def test_one_delta_per_request_and_step_and_prefill_then_decode(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    for i in range(3):
        llm.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(5, ignore_eos=True)))
    first = llm.step()
    assert [o.request_id for o in first] == ["r0", "r1", "r2"]
    assert all(len(o.delta.token_ids) == 1 for o in first)
    assert llm.model_runner.batch is not None and llm.model_runner.batch.size == 3
    llm.add_request(GenerationRequest("late", PROMPTS[3], greedy(5, ignore_eos=True)))
    second = llm.step()  # the rows that joined decode in the same forward as the late request's prefill
    assert [o.request_id for o in second] == ["r0", "r1", "r2", "late"]
    assert llm.model_runner.batch is not None and llm.model_runner.batch.size == 4


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
    batch = llm.model_runner.batch
    assert batch is not None and batch.seq_ids == [s.seq_id for s in llm.scheduler.running]


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
    assert llm.model_runner.batch is None and llm.stats().num_waiting == 1
    llm.step()
    assert [(o.request_id, o.delta.finish_reason) for o in llm.abort_all()] == [("r1", FinishReason.ABORT)]
    assert not llm.has_work() and llm.model_runner.batch is None
