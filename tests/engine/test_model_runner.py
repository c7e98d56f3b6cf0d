"""ModelRunner: plans carried out on the batch, and the fall back from a failing fused decoder to transformers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch
from tests.tiny_model import PROMPTS, build_model, collect, greedy, reference

from chatstream.engine.base import GenerationRequest
from chatstream.engine.model_runner import ModelRunner
from chatstream.engine.prefix_cache import PrefixMatch
from chatstream.engine.scheduler import FreeKV, KeepKV, ModelOutput, PrefillChunk, ScheduledPrefill, SchedulerOutput
from chatstream.engine.sequence import Sequence


def _seq(request_id: str, prompt: list[int]) -> Sequence:
    return Sequence(GenerationRequest(request_id, "", greedy(8)), prompt, 8)


def _fail_at_second_layer(runner: ModelRunner, after_calls: int = 0) -> dict[str, int]:
    """Make the fused decoder raise in its second layer (the first layer has appended its keys and values by then),
    from the ``after_calls``-th call on."""
    assert runner.fused is not None
    layer = runner.fused.layers[1]
    qkv = layer.qkv
    calls = {"n": 0}

    def failing_qkv(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise RuntimeError("fused kernel failed")
        return qkv(x)

    layer.qkv = failing_qkv
    return calls


def test_a_failing_fused_forward_is_redone_by_transformers_on_restored_cache_lengths(
    tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model(tiny_tokenizer)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS[:3]]
    plain = ModelRunner(model, fused_decoder=False)
    runner = ModelRunner(model)
    calls = _fail_at_second_layer(runner, after_calls=1)  # the prefill runs fused, the decode fails
    with torch.inference_mode():
        expected_batch, expected = plain.prefill(prompts)
        batch, logits = runner.prefill(prompts)
        assert runner.fused is not None and torch.equal(logits.argmax(-1), expected.argmax(-1))
        batch.next_tokens = expected_batch.next_tokens = logits.argmax(-1)
        with caplog.at_level(logging.WARNING, logger="chatstream.engine.model_runner"):
            step = runner.decode(batch)
            step_expected = plain.decode(expected_batch)
    assert runner.fused is None and calls["n"] == 2
    assert batch.cache.lengths() == expected_batch.cache.lengths() == [expected_batch.cache.length] * 2
    torch.testing.assert_close(step, step_expected, rtol=1e-5, atol=1e-5)
    assert [r.levelname for r in caplog.records if "fused decoder failed" in r.getMessage()] == ["WARNING"]


async def test_engine_requests_still_get_the_greedy_tokens_of_generate_after_the_fallback(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_tiny_engine(max_batch_size=4)
    runner = engine.llm.model_runner
    _fail_at_second_layer(runner, after_calls=6)  # a few steps in, with three rows in the batch
    with caplog.at_level(logging.WARNING, logger="chatstream.engine.model_runner"):
        streams = [
            engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(16, ignore_eos=True))) for i in range(3)
        ]
        outs = await asyncio.gather(*(collect(s) for s in streams))
    for i, out in enumerate(outs):
        assert out.token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), 16), i
    assert runner.fused is None
    assert len([r for r in caplog.records if "fused decoder failed" in r.getMessage()]) == 1


def _prefill_plan(*prefills: ScheduledPrefill, chunk: tuple[int, int] | None = None) -> SchedulerOutput:
    width = max(len(p.seq.prompt_ids) - p.num_cached_tokens for p in prefills)
    start, end = chunk or (0, width)
    final = end >= width
    return SchedulerOutput(
        group=prefills, chunk=PrefillChunk(start, end, width), prefilled=tuple(p.seq for p in prefills) if final else ()
    )


def test_run_keeps_kv_releases_rows_and_prefills_on_cached_segments(tiny_model: Any, tiny_tokenizer: Any) -> None:
    runner = ModelRunner(tiny_model)
    a, b = _seq("a", tiny_tokenizer.encode(PROMPTS[1])), _seq("b", tiny_tokenizer.encode(PROMPTS[2]))
    out = runner.run(_prefill_plan(ScheduledPrefill(a), ScheduledPrefill(b)))
    assert set(out.sampled) == {a.seq_id, b.seq_id} and not out.errors
    a.output_ids.append(out.sampled[a.seq_id])
    assert runner.seq_ids == [a.seq_id, b.seq_id] and len(runner.batches) == 1
    n = len(a.prompt_ids)
    keeps = (KeepKV(10, a.seq_id, 0, 5), KeepKV(11, a.seq_id, 5, n), KeepKV(12, b.seq_id, 0, 2), FreeKV(12))
    runner.run(SchedulerOutput(cache_ops=keeps, releases=(a.seq_id,)))
    assert runner.seq_ids == [b.seq_id] and sorted(runner.kept) == [10, 11]
    assert runner.kept[10].num_tokens == 5 and runner.kept[11].num_tokens == n - 5
    again = _seq("again", [*a.prompt_ids, a.output_ids[0]])
    prefix = PrefixMatch(((10, 5), (11, n - 5)), n)
    out = runner.run(_prefill_plan(ScheduledPrefill(again, prefix)))
    assert out.sampled[again.seq_id] == reference(tiny_model, again.prompt_ids, 1)[0]
    assert runner.seq_ids == [b.seq_id, again.seq_id] and sorted(runner.kept) == [10, 11]


def test_a_chunked_prefill_runs_beside_the_decode_and_gives_the_tokens_of_generate(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    runner = ModelRunner(tiny_model)
    a = _seq("a", tiny_tokenizer.encode(PROMPTS[1]))
    runner.run(_prefill_plan(ScheduledPrefill(a)))
    long = _seq("long", (tiny_tokenizer.encode(" ".join(PROMPTS)) * 4)[:150])  # longer than a buffer's headroom
    expected = reference(tiny_model, long.prompt_ids, 1)[0]
    width, step = len(long.prompt_ids), 37
    buffers: set[int] = set()
    for start in range(0, width, step):
        plan = _prefill_plan(ScheduledPrefill(long), chunk=(start, min(width, start + step)))
        plan = SchedulerOutput(
            group=plan.group if start == 0 else (), chunk=plan.chunk, decodes=(a,), prefilled=plan.prefilled
        )
        out = runner.run(plan)
        assert set(out.sampled) == ({a.seq_id, long.seq_id} if plan.prefilled else {a.seq_id})
        if runner.group is not None:  # the group's cache was sized for the whole prompt: chunks append in place
            buffers.add(runner.group.cache.buffered[0].key_buffer.data_ptr())
    assert len(buffers) == 1
    assert out.sampled[long.seq_id] == expected
    assert runner.group is None and runner.seq_ids == [a.seq_id, long.seq_id]


def test_a_plan_that_does_not_match_the_batch_is_a_bug(tiny_model: Any, tiny_tokenizer: Any) -> None:
    runner = ModelRunner(tiny_model)
    a = _seq("a", tiny_tokenizer.encode(PROMPTS[1]))
    runner.run(_prefill_plan(ScheduledPrefill(a)))
    with pytest.raises(RuntimeError, match="not the rows"):
        runner.run(SchedulerOutput(decodes=(_seq("stranger", [5]),)))
    with pytest.raises(RuntimeError, match="no row"):
        runner.run(SchedulerOutput(releases=(10**9,)))
    with pytest.raises(RuntimeError, match="no row"):
        runner.run(SchedulerOutput(cache_ops=(KeepKV(1, 10**9, 0, 1),)))
    assert runner.run(SchedulerOutput()) == ModelOutput()
