"""The mock engine streams canned answers through the Engine contract."""

import asyncio
from typing import Any

import pytest

from chatstream.config import MockConfig, SamplingParams
from chatstream.engine.base import Delta, EngineError, FinishReason, GenerationRequest, RequestStream
from chatstream.engine.mock_engine import ROUND_ANSWERS, MockEngine, MockRequest, split_mock_tokens


def request(**kw: object) -> MockRequest:
    base = {"request_id": "r1", "prompt": "p"}
    base.update(kw)
    return MockRequest(**base)  # type: ignore[arg-type]


async def collect(engine: MockEngine, req: GenerationRequest) -> tuple[str, list[object]]:
    text, reasons = "", []
    async for delta in engine.add_request(req):
        text += delta.text
        reasons.append(delta.finish_reason)
    return text, reasons


def test_split_words_and_japanese_characters() -> None:
    assert split_mock_tokens("one two three") == ["one", " two", " three"]
    assert split_mock_tokens("こんにちは世界") == list("こんにちは世界")


async def test_round_answers_follow_the_turn() -> None:
    engine = MockEngine(MockConfig(time_per_token_sec=0))
    engine.start()
    text, reasons = await collect(engine, request(turn=2))
    assert text == ROUND_ANSWERS[1]
    assert reasons[-1] is FinishReason.STOP and all(r is None for r in reasons[:-1])


async def test_echo_streams_japanese_per_character() -> None:
    engine = MockEngine(MockConfig(type="echo", time_per_token_sec=0))
    engine.start()
    deltas = [d async for d in engine.add_request(request(user_input="日本語のテスト"))]
    assert [d.text for d in deltas] == list("日本語のテスト")


async def test_max_new_tokens_truncates_with_length() -> None:
    engine = MockEngine(MockConfig(type="long", time_per_token_sec=0))
    engine.start()
    text, reasons = await collect(engine, request(sampling=SamplingParams(max_new_tokens=3)))
    assert len(split_mock_tokens(text)) == 3
    assert reasons[-1] is FinishReason.LENGTH


async def test_abort_ends_the_stream() -> None:
    engine = MockEngine(MockConfig(type="long", time_per_token_sec=0.01))
    engine.start()
    stream = engine.add_request(request())
    got = []
    async for delta in stream:
        got.append(delta)
        if len(got) == 2:
            engine.abort("r1")
    assert got[-1].finish_reason is FinishReason.ABORT
    await asyncio.sleep(0)
    assert engine.stats().num_running == 0


async def test_abort_before_the_task_ran_still_ends_the_stream() -> None:
    engine = MockEngine(MockConfig(type="long", time_per_token_sec=0))
    engine.start()
    stream = engine.add_request(request(request_id="early"))
    engine.abort("early")  # the task has not started: its own CancelledError handler never runs
    deltas = await asyncio.wait_for(_all(stream), timeout=5)
    assert [d.finish_reason for d in deltas] == [FinishReason.ABORT] and engine.stats().num_running == 0


async def _all(stream: RequestStream) -> list[Delta]:
    return [d async for d in stream]


async def test_not_started_refuses() -> None:
    with pytest.raises(EngineError):
        MockEngine().add_request(request())


def test_seed_mock_params_with_builtin_type_key() -> None:
    assert MockConfig.from_seed_params({type: "long"}).type.value == "long"
    assert MockConfig.from_seed_params({"type": "echo", "time_per_token_sec": 0}).time_per_token_sec == 0
    with pytest.raises(ValueError, match="'nope'"):
        MockConfig.from_seed_params({"type": "nope"})


async def test_script_answers_in_turn_and_counts_prompt_tokens(tiny_tokenizer: object) -> None:
    engine = MockEngine(MockConfig(type="script", script=("first answer", "second"), time_per_token_sec=0))
    engine.start()
    texts = [(await collect(engine, request(request_id=f"r{i}")))[0] for i in range(3)]
    assert texts == ["first answer", "second", "first answer"]
    deltas = [d async for d in engine.add_request(request(prompt="three words here", logprobs=1))]
    assert all(d.num_prompt_tokens == 3 for d in deltas)
    assert [lp.token for d in deltas for lp in d.logprobs] == ["second"]
    assert deltas[0].logprobs[0].logprob == 0.0 and [t.token for t in deltas[0].logprobs[0].top] == ["second"]
    counted = MockEngine(MockConfig(time_per_token_sec=0), tiny_tokenizer)
    counted.start()
    prompt = "Hello, how are you today?"
    first = await anext(aiter(counted.add_request(request(prompt=prompt))))
    assert first.num_prompt_tokens == len(tiny_tokenizer.encode(prompt)) > 0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="script"):
        MockConfig(type="script")


async def test_stop_from_a_worker_thread_cancels_through_the_loop() -> None:
    engine = MockEngine(MockConfig(type="long", time_per_token_sec=0.05))
    engine.start()
    stream = engine.add_request(request(request_id="long"))
    deltas = aiter(stream)
    first = await anext(deltas)
    await asyncio.to_thread(engine.stop)  # as the service's shutdown calls it
    rest = await asyncio.wait_for(_rest(deltas), timeout=5)
    assert first.text and rest[-1].finish_reason is FinishReason.ABORT and engine.stats().num_running == 0


async def _rest(deltas: Any) -> list[Delta]:
    return [d async for d in deltas]
