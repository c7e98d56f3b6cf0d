"""The load client against in-process fake servers (httpx.MockTransport): no network, no model."""

import asyncio
import json

import httpx
import pytest
from bench.load import (
    OpenAITarget,
    RequestResult,
    RoundOutcome,
    native_chat,
    openai_chat,
    run_round,
    summarize_round,
)


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks, delay_s=0.0):
        self.chunks = chunks
        self.delay_s = delay_s

    async def __aiter__(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.delay_s)
            yield chunk.encode()


def _client(handler):
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _words(text):
    return len(text.split())


async def test_openai_chat_uses_usage_and_records_itl_per_event():
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content))
        events = [{"choices": [{"delta": {"content": w}}]} for w in ("a ", "b ", "c")]
        events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
        body = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
        return httpx.Response(200, stream=_Chunks(body, delay_s=0.01))

    target = OpenAITarget("http://test", "m", 16, {"ignore_eos": True})
    async with _client(handler) as client:
        result = await openai_chat(client, target, [{"role": "user", "content": "hi"}], lambda _t: 999)
    assert result.ok and result.text == "a b c"
    assert result.output_tokens == 3  # from usage, not from the counter
    assert result.prompt_tokens == 5
    assert len(result.itl_s) == 2 and result.ttft_s is not None and result.ttft_s > 0
    assert result.arrival_chars == [2, 4, 5] and len(result.arrivals) == 3
    assert seen["temperature"] == 0.0 and seen["max_tokens"] == 16 and seen["ignore_eos"] is True


async def test_openai_chat_falls_back_to_the_tokenizer_without_usage():
    def handler(request):
        body = ['data: {"choices": [{"delta": {"content": "one two"}}]}\n\n', "data: [DONE]\n\n"]
        return httpx.Response(200, stream=_Chunks(body))

    async with _client(handler) as client:
        result = await openai_chat(client, OpenAITarget("http://test", "m", 8), [], _words)
    assert result.output_tokens == 2


async def test_openai_429_counts_as_rejected():
    async with _client(lambda request: httpx.Response(429, json={"error": {"message": "busy"}})) as client:
        result = await openai_chat(client, OpenAITarget("http://test", "m", 8), [], _words)
    assert result.rejected and not result.ok


async def test_native_chat_counts_tokens_on_the_final_cumulative_text():
    def handler(request):
        assert json.loads(request.content) == {"user_input": "hi"}
        body = ["Hello<::EOS::>Hello, ", "world<::EOS::>Hello, world !<::EOS::>"]
        return httpx.Response(200, stream=_Chunks(body, delay_s=0.01))

    async with _client(handler) as client:
        result = await native_chat(client, "http://test", "hi", _words)
    assert result.ok and result.text == "Hello, world !"
    assert result.output_tokens == 3
    # three growing snapshots: one TTFT and two gaps (the last two arrive in the same read)
    assert result.ttft_s is not None and len(result.itl_s) == 2


async def test_native_chat_sees_the_originals_200_rejection():
    async with _client(lambda request: httpx.Response(200, json={"error": "too_many_requests"})) as client:
        result = await native_chat(client, "http://test", "hi", _words)
    assert result.rejected and not result.ok and result.output_tokens == 0


async def test_run_round_bounds_concurrency_and_gives_up_at_the_timeout():
    live = 0
    peak = 0

    async def fake(duration):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(duration)
        live -= 1
        return RequestResult(ok=True, output_tokens=10, ttft_s=0.001)

    outcome = await run_round([lambda: fake(0.01) for _ in range(6)], 2, timeout_s=5.0)
    assert peak == 2 and len(outcome.results) == 6 and outcome.timed_out == 0
    slow = await run_round([lambda: fake(10.0) for _ in range(3)], 3, timeout_s=0.05)
    assert slow.timed_out == 3 and slow.wall_s < 1.0


def test_summarize_round_counts_and_rates():
    results = [
        RequestResult(ok=True, output_tokens=100, ttft_s=0.1, itl_s=[0.01, 0.03]),
        RequestResult(ok=True, output_tokens=50, ttft_s=0.3, itl_s=[0.02]),
        RequestResult(rejected=True, error="too_many_requests"),
        RequestResult(error="boom"),
    ]
    summary = summarize_round(RoundOutcome(results=results, wall_s=2.0, timed_out=1))
    assert summary["completed"] == 2 and summary["rejected"] == 1 and summary["failed"] == 2
    assert summary["tokens_per_s"] == pytest.approx(75.0)
    assert summary["ttft_p50_ms"] == pytest.approx(200.0)
    assert summary["itl_p50_ms"] == pytest.approx(20.0)
