"""TransformersEngine on the tiny model: greedy equality with ``model.generate`` under continuous batching."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.tiny_model import PROMPTS, Collected, collect, greedy, reference

from chatstream.engine.base import Engine, FinishReason, GenerationRequest

MAX_NEW = 24


async def test_implements_the_engine_protocol(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    assert isinstance(engine, Engine)
    assert engine.is_running
    engine.stop()
    assert not engine.is_running


async def test_single_request_matches_generate(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine()
    prompt = PROMPTS[1]
    out = await collect(engine.add_request(GenerationRequest("r0", prompt, greedy(MAX_NEW))))
    expected = reference(tiny_model, tiny_tokenizer.encode(prompt), MAX_NEW)
    assert out.token_ids == expected
    assert out.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    assert out.deltas[-1].num_prompt_tokens == len(tiny_tokenizer.encode(prompt))
    assert out.deltas[-1].num_generated_tokens == len(expected)


async def test_staggered_batch_matches_generate(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    """Eight prompts of different lengths; request i joins after request 0 has streamed i deltas."""
    engine = make_tiny_engine(max_batch_size=8)
    first = engine.add_request(GenerationRequest("r0", PROMPTS[0], greedy(MAX_NEW + 10)))
    seen = Collected()
    tasks: list[asyncio.Task[Collected]] = []
    max_running = 0
    async for delta in first:
        seen.deltas.append(delta)
        max_running = max(max_running, engine.stats().num_running)
        i = len(seen.deltas)
        if i < len(PROMPTS):
            stream = engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(MAX_NEW - i)))
            tasks.append(asyncio.create_task(collect(stream)))
    results = [seen, *await asyncio.gather(*tasks)]
    assert max_running >= 4, "the requests should have shared the batch"
    for i, (prompt, out) in enumerate(zip(PROMPTS, results, strict=True)):
        max_new = MAX_NEW + 10 if i == 0 else MAX_NEW - i
        expected = reference(tiny_model, tiny_tokenizer.encode(prompt), max_new)
        assert out.token_ids == expected, f"prompt {i}"
        assert out.finish_reason is FinishReason.LENGTH or expected[-1] == tiny_tokenizer.eos_token_id
