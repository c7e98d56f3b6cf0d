"""TransformersEngine on the tiny model: greedy equality with ``model.generate`` under continuous batching."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from tests.tiny_model import PROMPTS, Collected, collect, greedy, reference

from chatstream.config import EngineConfig, SamplingParams
from chatstream.engine.async_engine import TransformersEngine
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


async def test_abort_drops_one_row_and_the_others_still_match(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    streams = [engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(MAX_NEW))) for i in range(3)]
    tasks = [asyncio.create_task(collect(s)) for s in (streams[0], streams[2])]
    aborted = Collected()
    async for delta in streams[1]:
        aborted.deltas.append(delta)
        if len(aborted.deltas) == 3:
            engine.abort("r1")
    assert aborted.finish_reason is FinishReason.ABORT
    assert 3 <= len(aborted.token_ids) < MAX_NEW
    for i, out in zip((0, 2), await asyncio.gather(*tasks), strict=True):
        assert out.token_ids == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), MAX_NEW)
    engine.abort("no-such-request")  # ignored


async def test_abort_of_a_waiting_request(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine(max_batch_size=1)
    running = engine.add_request(GenerationRequest("a", PROMPTS[0], greedy(200, ignore_eos=True)))
    waiting = engine.add_request(GenerationRequest("b", PROMPTS[1], greedy(5)))
    engine.abort("b")
    out = await collect(waiting)
    assert out.finish_reason is FinishReason.ABORT
    assert out.token_ids == []
    engine.abort("a")
    assert (await collect(running)).finish_reason is FinishReason.ABORT


async def test_eos_of_the_tokenizer_stops(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    expected = reference(tiny_model, tiny_tokenizer.encode(PROMPTS[3]), MAX_NEW)
    eos = expected[4]
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    engine = TransformersEngine(tiny_model, tokenizer, EngineConfig())
    engine.start()
    try:
        out = await collect(engine.add_request(GenerationRequest("r", PROMPTS[3], greedy(MAX_NEW))))
        unstopped = await collect(engine.add_request(GenerationRequest("s", PROMPTS[3], greedy(8, ignore_eos=True))))
    finally:
        engine.stop()
    first = expected.index(eos)
    assert out.token_ids == expected[: first + 1]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == tokenizer.decode(expected[:first], skip_special_tokens=True)
    assert unstopped.token_ids == expected[:8]
    assert unstopped.finish_reason is FinishReason.LENGTH


async def test_stop_token_ids_stop(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine()
    expected = reference(tiny_model, tiny_tokenizer.encode(PROMPTS[6]), MAX_NEW)
    stop_id = expected[6]
    out = await collect(
        engine.add_request(GenerationRequest("r", PROMPTS[6], greedy(MAX_NEW, stop_token_ids=(stop_id,))))
    )
    assert out.token_ids == expected[: expected.index(stop_id) + 1]
    assert out.finish_reason is FinishReason.STOP


async def test_max_new_tokens_gives_length(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine()
    out = await collect(engine.add_request(GenerationRequest("r", PROMPTS[2], greedy(5, ignore_eos=True))))
    assert len(out.token_ids) == 5
    assert out.finish_reason is FinishReason.LENGTH
    assert [d.num_generated_tokens for d in out.deltas] == [1, 2, 3, 4, 5]
    one = await collect(engine.add_request(GenerationRequest("s", PROMPTS[2], greedy(1, ignore_eos=True))))
    assert len(one.token_ids) == 1 and one.finish_reason is FinishReason.LENGTH


async def test_prompt_is_truncated_from_the_left(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine(context_len=20)
    ids = tiny_tokenizer.encode(PROMPTS[3])
    assert len(ids) > 16
    out = await collect(engine.add_request(GenerationRequest("r", PROMPTS[3], greedy(4, ignore_eos=True))))
    assert out.deltas[-1].num_prompt_tokens == 16
    assert out.token_ids == reference(tiny_model, ids[-16:], 4)


async def test_full_context_gives_length(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine(context_len=12)
    ids = tiny_tokenizer.encode(PROMPTS[1])
    out = await collect(engine.add_request(GenerationRequest("r", PROMPTS[1], greedy(50, ignore_eos=True))))
    assert out.deltas[-1].num_prompt_tokens == 1
    assert len(out.token_ids) == 11
    assert out.finish_reason is FinishReason.LENGTH
    assert out.token_ids == reference(tiny_model, ids[-1:], 11)


async def test_stop_string_never_reaches_the_stream(
    make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine()
    ids = tiny_tokenizer.encode(PROMPTS[5])
    full = tiny_tokenizer.decode(reference(tiny_model, ids, MAX_NEW), skip_special_tokens=True)
    stop = full[6:9]
    assert stop.strip() and full.index(stop) >= 3
    params = greedy(MAX_NEW, stop=(stop,))
    out = await collect(engine.add_request(GenerationRequest("r", PROMPTS[5], params)))
    assert out.text == full[: full.index(stop)]
    assert stop not in out.text
    assert out.finish_reason is FinishReason.STOP


async def test_prompt_token_ids_are_used_as_given(make_tiny_engine: Any, tiny_model: Any, tiny_tokenizer: Any) -> None:
    engine = make_tiny_engine()
    ids = tiny_tokenizer.encode(PROMPTS[7])[:9]
    request = GenerationRequest("r", "ignored text", greedy(MAX_NEW), prompt_token_ids=tuple(ids))
    out = await collect(engine.add_request(request))
    assert out.token_ids == reference(tiny_model, ids, MAX_NEW)


class _BosTokenizer:
    """The tiny tokenizer, but encode() prepends BOS unless add_special_tokens=False (as Llama/Gemma tokenizers do)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._inner.encode(text, add_special_tokens=False)
        return [self._inner.bos_token_id, *ids] if add_special_tokens else ids


async def test_add_special_tokens_per_request(tiny_model: Any, tiny_tokenizer: Any) -> None:
    tokenizer = _BosTokenizer(tiny_tokenizer)
    engine = TransformersEngine(tiny_model, tokenizer, EngineConfig())
    engine.start()
    try:
        text = "hello world"
        counts = []
        for flag in (None, False, True):
            req = GenerationRequest(
                request_id=f"r-{flag}", prompt=text, sampling=SamplingParams(max_new_tokens=1), add_special_tokens=flag
            )
            deltas = [d async for d in engine.add_request(req)]
            counts.append(deltas[-1].num_prompt_tokens)
    finally:
        engine.stop()
    plain = len(tiny_tokenizer.encode(text, add_special_tokens=False))
    assert counts == [plain + 1, plain, plain + 1]


async def test_a_burst_arriving_at_an_idle_engine_is_prefilled_together(
    make_tiny_engine: Any, monkeypatch: Any
) -> None:
    """Requests arriving a little apart at an idle engine join one prefill instead of the first running alone."""
    from chatstream.engine import async_engine

    monkeypatch.setattr(async_engine, "BURST_POLL_S", 0.3)  # wide enough to be deterministic on a busy CI
    monkeypatch.setattr(async_engine, "BURST_MAX_S", 5.0)
    engine = make_tiny_engine(max_batch_size=4)
    batch_sizes: list[int] = []
    start_group = engine.llm.model_runner._start_group

    def recording_start_group(prefills: Any, output: Any) -> Any:
        batch_sizes.append(len(prefills))
        return start_group(prefills, output)

    engine.llm.model_runner._start_group = recording_start_group
    await asyncio.sleep(0.5)  # the engine thread is idle, waiting for work
    streams = []
    for i in range(3):
        streams.append(engine.add_request(GenerationRequest(f"burst-{i}", PROMPTS[i], greedy(3))))
        await asyncio.sleep(0.05)
    await asyncio.gather(*(collect(s) for s in streams))
    assert batch_sizes == [3]
