"""VLLMEngine's request streams against a stand-in for vLLM's ``AsyncLLM``: who drives the stream, and how it ends.

The stand-in keeps vLLM's contract as VLLMEngine uses it: ``add_request`` returns a per-request output collector
(merging deltas the reader has not taken yet, an exception put into it raised by the next ``get``); ``abort`` of an
internal id puts a last, aborted output and forgets the request. So these tests run without vLLM, in the main suite;
tests/engine/test_vllm_engine.py runs the same engine on the real vLLM CPU build.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.tiny_model import build_tokenizer, greedy

from chatstream.engine.base import Delta, EngineError, FinishReason, GenerationRequest
from chatstream.engine.vllm_engine import VLLMEngine


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool = False
    num_cached_tokens: int | None = 0


class Collector:
    """vLLM's RequestOutputCollector as the engine reads it."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.output: Output | Exception | None = None
        self.ready = asyncio.Event()

    def put(self, output: Output | Exception) -> None:
        if self.output is None or isinstance(output, Exception):
            self.output = output
            self.ready.set()
        elif isinstance(self.output, Output):
            self.output.outputs[0].token_ids += output.outputs[0].token_ids
            self.output.finished, self.output.outputs[0].finish_reason = (
                output.finished,
                output.outputs[0].finish_reason,
            )

    def get_nowait(self) -> Output | None:
        output, self.output = self.output, None
        self.ready.clear()
        if isinstance(output, Exception):
            raise output
        return output

    async def get(self) -> Output:
        while self.output is None:
            await self.ready.wait()
        output = self.get_nowait()
        assert output is not None
        return output


@dataclass
class FakeLLM:
    requests: dict[str, Collector] = field(default_factory=dict)  # internal id -> collector
    added: list[str] = field(default_factory=list)  # external ids, in order
    aborted: list[str] = field(default_factory=list)  # internal ids
    add_delay: float = 0.0

    async def add_request(self, request_id: str, prompt: Any, params: Any) -> Collector:
        await asyncio.sleep(self.add_delay)
        collector = Collector(f"{request_id}-internal")
        self.requests[collector.request_id] = collector
        self.added.append(request_id)
        return collector

    async def abort(self, request_id: str, internal: bool = False) -> None:
        assert internal
        collector = self.requests.pop(request_id, None)
        if collector is not None:
            self.aborted.append(request_id)
            collector.put(Output([Completion([], "abort")], finished=True))
        await asyncio.sleep(0)

    def step(self, token_id: int = 7, finish: str | None = None) -> None:
        """One engine step: a token for every request."""
        for internal_id, collector in list(self.requests.items()):
            collector.put(Output([Completion([token_id], finish)], finished=finish is not None))
            if finish is not None:
                del self.requests[internal_id]

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def shutdown(self) -> None:
        self.requests.clear()


@pytest.fixture(autouse=True)
def fake_vllm_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three names the engine imports from vLLM per request."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    inputs = types.ModuleType("vllm.inputs")
    inputs.tokens_input = lambda ids: {"prompt_token_ids": ids}  # type: ignore[attr-defined]
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.RequestOutputKind = types.SimpleNamespace(DELTA="delta")  # type: ignore[attr-defined]
    for name, module in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.sampling_params", sampling_params)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def engine() -> Iterator[tuple[VLLMEngine, FakeLLM]]:
    llm = FakeLLM()
    engine = VLLMEngine("/models/m", tokenizer=build_tokenizer())
    engine._llm, engine._max_model_len = llm, 256
    yield engine, llm
    engine.stop()


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


async def test_the_consumer_drives_the_request_and_vllm_sees_it_only_when_iterated(
    engine: tuple[VLLMEngine, FakeLLM],
) -> None:
    engine_, llm = engine
    stream = engine_.add_request(GenerationRequest("r", "hello world", greedy(3)))
    await asyncio.sleep(0.01)
    assert llm.added == []  # nothing runs until someone reads the stream
    deltas = aiter(stream)
    first = asyncio.ensure_future(anext(deltas))
    await until(lambda: llm.added == ["r"])
    llm.step(11)
    assert (await first).token_ids == (11,)
    llm.step(12)
    llm.step(13, finish="length")  # two steps before the reader came back: merged into one delta
    last = await anext(deltas)
    assert last.token_ids == (12, 13) and last.finish_reason is FinishReason.LENGTH
    assert last.num_generated_tokens == 3 and last.num_prompt_tokens > 0
    with pytest.raises(StopAsyncIteration):
        await anext(deltas)
    stats = engine_.stats()
    assert stats.num_generated_tokens_total == 3 and stats.num_running == 0
    # the id is free again once the stream has finished
    engine_.add_request(GenerationRequest("r", "again", greedy(1)))


async def test_abort_while_vllm_takes_the_request_in_and_while_it_streams(
    engine: tuple[VLLMEngine, FakeLLM],
) -> None:
    engine_, llm = engine
    engine_.abort("unknown")  # ignored
    # while vLLM takes it in: aborted there as soon as it is in
    llm.add_delay = 0.05
    stream = engine_.add_request(GenerationRequest("c", "hello", greedy(5)))
    reader = asyncio.ensure_future(collect_all(stream))
    await asyncio.sleep(0.02)
    engine_.abort("c")
    out = await reader
    assert [d.finish_reason for d in out] == [FinishReason.ABORT]
    assert llm.added == ["c"] and llm.aborted == ["c-internal"] and llm.get_num_unfinished_requests() == 0
    # while it streams: the waiting reader wakes at once, and the request is gone from vLLM when the stream ends
    llm.add_delay = 0.0
    _, deltas = await streaming(engine_, llm, "d")
    waiting = asyncio.ensure_future(anext(deltas))
    await asyncio.sleep(0.01)
    engine_.abort("d")
    end = await waiting
    assert end.finish_reason is FinishReason.ABORT and end.num_generated_tokens == 1
    assert "d-internal" in llm.aborted and llm.get_num_unfinished_requests() == 0
    with pytest.raises(StopAsyncIteration):
        await anext(deltas)


async def collect_all(stream: Any) -> list[Delta]:
    return [delta async for delta in stream]


async def streaming(engine: VLLMEngine, llm: FakeLLM, request_id: str) -> tuple[Any, Any]:
    """A request that is in vLLM and has delivered its first delta: its stream and the stream's iterator."""
    stream = engine.add_request(GenerationRequest(request_id, "hello", greedy(50)))
    deltas = aiter(stream)
    first = asyncio.ensure_future(anext(deltas))
    await until(lambda: request_id in llm.added)
    llm.step(5)
    await first
    return stream, deltas


async def test_an_abort_before_reading_never_reaches_vllm(engine: tuple[VLLMEngine, FakeLLM]) -> None:
    engine_, llm = engine
    stream = engine_.add_request(GenerationRequest("a", "hello", greedy(5)))
    engine_.abort("a")
    out = await collect_all(stream)
    assert [d.finish_reason for d in out] == [FinishReason.ABORT] and llm.added == []


async def test_a_reader_that_leaves_drops_the_request_in_vllm(engine: tuple[VLLMEngine, FakeLLM]) -> None:
    engine_, llm = engine
    for leave in ("close", "cancel"):
        request_id = f"r-{leave}"
        _, deltas = await streaming(engine_, llm, request_id)
        if leave == "close":
            await deltas.aclose()  # type: ignore[attr-defined]
        else:
            waiting = asyncio.ensure_future(anext(deltas))
            await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await until(lambda rid=request_id: f"{rid}-internal" in llm.aborted)  # type: ignore[misc]
        assert llm.get_num_unfinished_requests() == 0
        assert request_id not in engine_._streams


async def test_ends_handed_over_from_outside_as_an_engine_pool_does(engine: tuple[VLLMEngine, FakeLLM]) -> None:
    engine_, llm = engine
    # fail(): the reader gets the exception, vLLM drops the request
    stream, deltas = await streaming(engine_, llm, "f")
    stream.fail(EngineError("member failed"))
    with pytest.raises(EngineError, match="member failed"):
        await anext(deltas)
    assert llm.aborted == ["f-internal"] and llm.get_num_unfinished_requests() == 0
    # put_nowait() of a last delta: the reader gets that delta
    stream = engine_.add_request(GenerationRequest("p", "hello", greedy(50)))
    reader = asyncio.ensure_future(collect_all(stream))
    await until(lambda: "p" in llm.added)
    stream.put_nowait(Delta(text="", finish_reason=FinishReason.ERROR, error="gone"))
    out = await reader
    assert [(d.finish_reason, d.error) for d in out] == [(FinishReason.ERROR, "gone")]
    assert llm.get_num_unfinished_requests() == 0


async def test_a_stop_string_ends_the_stream_and_the_request_in_vllm(engine: tuple[VLLMEngine, FakeLLM]) -> None:
    engine_, llm = engine
    tokenizer = engine_.tokenizer
    ids = tokenizer.encode(" the cat sat on the mat", add_special_tokens=False)
    stop_text = tokenizer.decode(ids[2:4]).strip()
    stream = engine_.add_request(GenerationRequest("s", "hello", greedy(50, stop=(stop_text,))))
    reader = asyncio.ensure_future(collect_all(stream))
    await until(lambda: "s" in llm.added)
    for token_id in ids:
        llm.step(token_id)
        await asyncio.sleep(0.005)
        if reader.done():
            break
    out = await reader
    assert out[-1].finish_reason is FinishReason.STOP and stop_text not in "".join(d.text for d in out)
    assert llm.aborted == ["s-internal"] and llm.get_num_unfinished_requests() == 0


async def test_stop_ends_every_stream_with_abort_from_another_thread(engine: tuple[VLLMEngine, FakeLLM]) -> None:
    engine_, llm = engine
    streams = [engine_.add_request(GenerationRequest(f"t{i}", "hello", greedy(50))) for i in range(3)]
    readers = [asyncio.ensure_future(collect_all(s)) for s in streams]
    await until(lambda: len(llm.added) == 3)
    llm.step(5)
    await asyncio.to_thread(engine_.stop)
    outs = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert all(out[-1].finish_reason is FinishReason.ABORT for out in outs)
    assert not engine_.is_running


class EngineDeadError(Exception):
    """Named as vLLM's: the engine tells a dead vLLM by this name."""


async def test_a_dead_vllm_fails_a_waiting_request_and_ends_a_streaming_one(
    engine: tuple[VLLMEngine, FakeLLM],
) -> None:
    engine_, llm = engine
    _, deltas = await streaming(engine_, llm, "s")
    waiting = engine_.add_request(GenerationRequest("w", "hello", greedy(50)))
    first = asyncio.ensure_future(anext(aiter(waiting)))
    await until(lambda: "w" in llm.added)
    for collector in llm.requests.values():  # what vLLM's output handler does when the engine core dies
        collector.put(EngineDeadError("engine core died"))
    with pytest.raises(EngineError, match="the vLLM engine died"):  # no output yet: the protocols answer 503
        await first
    last = await anext(deltas)  # already streaming: an ERROR delta ends the answer
    assert last.finish_reason is FinishReason.ERROR and "engine core died" in (last.error or "")
