"""The engine contract's request stream: deltas until the finishing one, or the engine's error raised."""

import pytest

from chatstream.engine.base import Delta, EngineOverloaded, FinishReason, RequestStream


async def test_stream_ends_after_the_finishing_delta() -> None:
    stream = RequestStream("r")
    stream.put_nowait(Delta("a"))
    stream.put_nowait(Delta("b", finish_reason=FinishReason.STOP))
    stream.put_nowait(Delta("never read"))
    assert [d.text async for d in stream] == ["a", "b"]


async def test_fail_raises_in_the_consumer_after_earlier_deltas() -> None:
    stream = RequestStream("r")
    stream.put_nowait(Delta("a"))
    stream.fail(EngineOverloaded("the upstream is full", retry_after=7))
    seen = []
    with pytest.raises(EngineOverloaded) as caught:
        async for delta in stream:
            seen.append(delta.text)
    assert seen == ["a"]
    assert caught.value.retry_after == 7


def test_overloaded_retry_after_is_at_least_one_second() -> None:
    assert EngineOverloaded("full", retry_after=0).retry_after == 1
