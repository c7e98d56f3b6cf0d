"""TransformersEngine: failures stay with the affected requests, stats count, the event loop keeps running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from tests.tiny_model import PROMPTS, collect, greedy, reference

from chatstream.engine.base import EngineError, FinishReason, GenerationRequest


async def test_bad_token_id_fails_only_that_request(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    good = engine.add_request(GenerationRequest("good", PROMPTS[1], greedy(10)))
    bad = engine.add_request(GenerationRequest("bad", "", greedy(10), prompt_token_ids=(5, 10_000)))
    bad_out, good_out = await collect(bad), await collect(good)
    assert bad_out.finish_reason is FinishReason.ERROR
    assert bad_out.deltas[-1].error and "10000" in bad_out.deltas[-1].error
    assert good_out.token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[1]), 10)


def _fail_forward(runner: Any, monkeypatch: pytest.MonkeyPatch, fails: Callable[[list[Any]], bool]) -> None:
    """Make the runner's forward raise whenever ``fails(parts)``."""
    original = runner._forward

    def forward(parts: Any) -> Any:
        if fails(list(parts)):
            raise RuntimeError("boom" if len(parts) else "?")
        return original(parts)

    monkeypatch.setattr(runner, "_forward", forward)


async def test_failed_prefill_is_retried_row_by_row(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_tiny_engine()
    poison = [5, 6, 7, 8, 9, 10, 11]

    def has_poison(parts: list[Any]) -> bool:
        rows = [row.tolist() for part in parts for row in part.input_ids]
        return any(row[-len(poison) :] == poison for row in rows)

    _fail_forward(engine.llm.model_runner, monkeypatch, has_poison)
    ids = (tiny_tokenizer.encode(PROMPTS[0]), poison, tiny_tokenizer.encode(PROMPTS[2]))
    streams = [
        engine.add_request(GenerationRequest(f"r{i}", "", greedy(6), prompt_token_ids=tuple(p)))
        for i, p in enumerate(ids)
    ]
    outs = [await collect(s) for s in streams]
    assert outs[1].finish_reason is FinishReason.ERROR and "boom" in (outs[1].deltas[-1].error or "")
    for i in (0, 2):
        assert outs[i].token_ids == reference(tiny_model, list(ids[i]), 6)


async def test_decode_failure_fails_the_batch_and_the_engine_keeps_serving(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_tiny_engine()
    runner = engine.llm.model_runner
    calls = {"n": 0}

    def third_decode(parts: list[Any]) -> bool:
        if not any(part.cache is batch.cache for batch in runner.batches for part in parts):
            return False
        calls["n"] += 1
        return calls["n"] == 3

    _fail_forward(runner, monkeypatch, third_decode)
    failed = await collect(engine.add_request(GenerationRequest("a", PROMPTS[1], greedy(20, ignore_eos=True))))
    assert failed.finish_reason is FinishReason.ERROR
    assert "boom" in (failed.deltas[-1].error or "")
    assert failed.token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[1]), 3)
    after = await collect(engine.add_request(GenerationRequest("b", PROMPTS[1], greedy(8))))
    assert after.token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[1]), 8)
    assert engine.is_running


async def test_a_decode_failure_in_one_decode_group_fails_only_its_rows(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_tiny_engine()
    long_ids = tuple(tiny_tokenizer.encode(" ".join(PROMPTS)) * 3)[:150]

    def long_row_decodes(parts: list[Any]) -> bool:  # only the long prompt's row decodes at positions past 150
        return any(part.decode and int(part.positions.max()) >= 151 for part in parts)

    _fail_forward(engine.llm.model_runner, monkeypatch, long_row_decodes)
    short = engine.add_request(GenerationRequest("short", PROMPTS[1], greedy(30, ignore_eos=True)))
    await asyncio.sleep(0.05)
    long = engine.add_request(GenerationRequest("long", "", greedy(10, ignore_eos=True), prompt_token_ids=long_ids))
    short_out, long_out = await asyncio.gather(collect(short), collect(long))
    assert long_out.finish_reason is FinishReason.ERROR and "boom" in (long_out.deltas[-1].error or "")
    assert long_out.token_ids == reference(tiny_model, list(long_ids), 2)
    assert short_out.token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[1]), 30)


async def test_stats_count(make_tiny_engine: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine(max_batch_size=1)
    streams = [engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(6, ignore_eos=True))) for i in range(3)]
    waiting_seen = engine.stats().num_waiting
    await asyncio.gather(*(collect(s) for s in streams))
    stats = engine.stats()
    assert waiting_seen >= 2
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_generated_tokens_total == 18
    assert stats.num_prompt_tokens_total == sum(len(tiny_tokenizer.encode(PROMPTS[i])) for i in range(3))


async def test_duplicate_and_stopped(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    stream = engine.add_request(GenerationRequest("same", PROMPTS[0], greedy(50, ignore_eos=True)))
    with pytest.raises(EngineError):
        engine.add_request(GenerationRequest("same", PROMPTS[0], greedy(5)))
    engine.stop()
    assert (await collect(stream)).finish_reason is FinishReason.ABORT
    with pytest.raises(EngineError):
        engine.add_request(GenerationRequest("later", PROMPTS[0], greedy(5)))
    engine.stop()  # idempotent


async def test_event_loop_is_never_blocked(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    streams = [
        engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(150, ignore_eos=True))) for i in range(8)
    ]
    started = time.perf_counter()
    await asyncio.gather(*(collect(s) for s in streams))
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    assert len(gaps) >= 20, f"the ticker ticked {len(gaps)} times in {elapsed:.2f}s"
    assert max(gaps) < 0.5
