"""The fused decoder: same tokens and logits as transformers' forward, used only where it is verified."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.engine.test_engine_gemma import build_gemma
from tests.tiny_model import build_model
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from chatstream.engine.cpu.attention import QUERY_BLOCK, attention_blocks
from chatstream.engine.cpu.fast_path import packing_supported
from chatstream.engine.cpu.fused_decoder import FusedDecoder, unsupported_reason
from chatstream.engine.model_runner import ModelRunner

needs_packing = pytest.mark.skipif(
    not packing_supported(nn.Linear(2, 2)), reason="this torch build has no oneDNN packed linear"
)

STEPS = 40


def build_qwen3(tokenizer: Any) -> Qwen3ForCausalLM:
    """A tiny Qwen3: q/k norms of the weight-after-cast kind, GQA, no sandwich norms."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen3ForCausalLM(config)
    return model.eval()


def _decode_both_ways(model: Any, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prefill, then decode STEPS tokens per row through transformers and through the fused decoder, both fed
    transformers' greedy tokens (so one near-tie cannot make the two runs drift apart).

    Returns both paths' greedy choices ``[B, STEPS + 1]`` (prefill included) and the largest logit difference
    relative to the largest logit.
    """
    runner = ModelRunner(model)
    fused = runner.fused
    assert fused is not None, "the fused decoder should be built for this model"
    batches, choices, logits = {}, {"transformers": [], "ours": []}, {"transformers": [], "ours": []}
    with torch.inference_mode():
        for name, impl in (("transformers", None), ("ours", fused)):
            runner.fused = impl
            batches[name], first = runner.prefill(prompts)
            choices[name].append(first.argmax(-1))
            logits[name].append(first.float())
        for _ in range(STEPS):
            fed = choices["transformers"][-1]
            for name, impl in (("transformers", None), ("ours", fused)):
                runner.fused = impl
                batches[name].next_tokens = fed
                step_logits = runner.decode(batches[name])
                choices[name].append(step_logits.argmax(-1))
                logits[name].append(step_logits.float())
    theirs, ours = torch.stack(logits["transformers"], 1), torch.stack(logits["ours"], 1)
    difference = float((ours - theirs).abs().max()) / float(theirs.abs().max())
    return torch.stack(choices["ours"], 1), torch.stack(choices["transformers"], 1), difference


def _prompts(tokenizer: Any) -> list[list[int]]:
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog again and again", "x"]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_matches_transformers(tiny_tokenizer: Any, dtype: torch.dtype) -> None:
    # a fresh model, not a deep copy of the shared one: a copy would still call the shared model's modules through
    # the fast path's switches installed on it
    model = build_model(tiny_tokenizer).to(dtype)
    ours, theirs, difference = _decode_both_ways(model, _prompts(tiny_tokenizer))
    assert torch.equal(ours, theirs)
    assert difference < (1e-5 if dtype == torch.float32 else 1e-2)


def test_gemma3_sliding_window_and_softcap_match_transformers_fp32(tiny_tokenizer: Any) -> None:
    """Windows of 8 with prompts and outputs well past them; q/k norms, sandwich norms, two rotary tables."""
    model = build_gemma(tiny_tokenizer, window=8)
    ours, theirs, difference = _decode_both_ways(model, _prompts(tiny_tokenizer))
    assert torch.equal(ours, theirs)
    assert difference < 1e-5


def test_gemma3_sliding_window_bf16_within_rounding(tiny_tokenizer: Any) -> None:
    """The window's keys are sliced out of the cache before attention, so the sums run in a different order than
    over the whole masked cache: in bf16 the logits differ by a few units in the last place (about 0.4 % each)."""
    model = build_gemma(tiny_tokenizer, window=8).to(torch.bfloat16)
    _, _, difference = _decode_both_ways(model, _prompts(tiny_tokenizer))
    assert difference < 2e-2


def _long_prompts(vocab: int) -> list[list[int]]:
    """Two rows long enough for the attention to run in query blocks (one left-padded by 70 tokens)."""
    generator = torch.Generator().manual_seed(5)
    lengths = (2 * QUERY_BLOCK + 100, 2 * QUERY_BLOCK + 30)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("window", [8, QUERY_BLOCK + 44])
def test_long_prompts_in_query_blocks_match_transformers_fp32(tiny_tokenizer: Any, window: int) -> None:
    """A prefill of more than two query blocks reads, per block, only the columns up to its last query (and from its
    first query's window on): windows shorter and longer than a block, causal and padded rows, same tokens and
    logits as transformers' whole masked attention."""
    model = build_gemma(tiny_tokenizer, window=window)
    ours, theirs, difference = _decode_both_ways(model, _long_prompts(len(tiny_tokenizer)))
    assert torch.equal(ours, theirs)
    assert difference < 1e-5


def test_query_blocks_cover_the_prompt_and_skip_what_no_query_reads(tiny_tokenizer: Any) -> None:
    decoder = FusedDecoder(build_gemma(tiny_tokenizer, window=8))
    new, cached = 2 * QUERY_BLOCK + 100, 50  # a prompt's tail prefilled on top of 50 cached columns
    mask = torch.ones((1, cached + new), dtype=torch.bool)
    blocks = attention_blocks(mask, new, decoder.windows, decoder.groups)
    for window, expected_start in ((None, lambda first: 0), (8, lambda first: cached + first - 7)):
        spans = [(b.first, b.last, b.start, b.end) for b in blocks[window]]
        firsts = range(0, new, QUERY_BLOCK)
        assert spans == [(f, min(new, f + QUERY_BLOCK), expected_start(f), cached + min(new, f + QUERY_BLOCK))
                         for f in firsts]  # fmt: skip
        for block in blocks[window]:  # [B, 1, G * queries, columns]; every query reads its own column
            queries = block.last - block.first
            assert block.mask.shape == (1, 1, decoder.groups * queries, block.end - block.start)
            own = torch.arange(queries).repeat(decoder.groups) + cached + block.first - block.start
            assert bool(block.mask[0, 0, torch.arange(decoder.groups * queries), own].all())
    decoding = attention_blocks(torch.ones((1, cached + 1), dtype=torch.bool), 1, decoder.windows, decoder.groups)
    (decode,) = decoding[None]
    assert (decode.first, decode.last, decode.start, decode.end) == (0, 1, 0, cached + 1)


def test_qwen3_head_norms_match_transformers(tiny_tokenizer: Any) -> None:
    ours, theirs, difference = _decode_both_ways(build_qwen3(tiny_tokenizer), _prompts(tiny_tokenizer))
    assert torch.equal(ours, theirs)
    assert difference < 1e-5


def test_bf16_gemma3_logits_are_bitwise_equal_inside_the_window(tiny_tokenizer: Any) -> None:
    """Same operators in the same order: while every token is inside the window (nothing sliced), the fused
    decoder reproduces transformers' bf16 logits exactly, prefill and decode, whether the linear layers run packed
    (oneDNN) or on ``F.linear`` (CPUs without oneDNN bf16)."""
    model = build_gemma(tiny_tokenizer, window=4096).to(torch.bfloat16)
    ours, theirs, difference = _decode_both_ways(model, _prompts(tiny_tokenizer))
    assert torch.equal(ours, theirs)
    assert difference == 0.0


def test_probe_rejects_a_step_that_disagrees(tiny_tokenizer: Any) -> None:
    model = build_model(tiny_tokenizer)
    reference = ModelRunner(model, fused_decoder=False).transformers_forward
    step = FusedDecoder(model)
    assert step.probe(reference) is None
    down = step.layers[0].down
    step.layers[0].down = lambda x: down(x) * -3  # a wrong MLP in the first layer
    assert "differ" in (step.probe(reference) or "")


def test_unsupported_models_keep_transformers(tiny_model: Any, tiny_tokenizer: Any) -> None:
    model = build_model(tiny_tokenizer)
    model.config.model_type = "gpt_neox"
    assert "gpt_neox" in (unsupported_reason(model) or "")
    assert FusedDecoder.for_model(model, ModelRunner(model, fused_decoder=False).transformers_forward) is None
    assert ModelRunner(model).fused is None
    assert ModelRunner(tiny_model, fused_decoder=False).fused is None


def test_fused_decoder_without_packed_weights(tiny_model: Any) -> None:
    """``pack_weights=False`` keeps the fused decoder, on ``F.linear`` (the switches are separate)."""
    runner = ModelRunner(tiny_model, pack_weights=False)
    assert runner.fast_path is None and runner.fused is not None
    assert runner.fused.lm_head.__name__ == "plain_linear"


def test_engine_runs_the_fused_decoder_unless_configured_off(make_tiny_engine: Any) -> None:
    assert make_tiny_engine().llm.model_runner.fused is not None
    assert make_tiny_engine(fused_decoder=False).llm.model_runner.fused is None


@needs_packing
def test_shares_the_fast_paths_packed_weights(tiny_model: Any) -> None:
    """The LM head, o_proj and down_proj are packed once, for the fast path and the fused decoder together."""
    runner = ModelRunner(tiny_model)
    assert runner.fused is not None and runner.fast_path is not None
    assert runner.fused.lm_head is runner.fast_path.packed(tiny_model.lm_head)
    layer = tiny_model.model.layers[1]
    assert runner.fused.layers[1].o_proj is runner.fast_path.packed(layer.self_attn.o_proj)
    assert runner.fused.layers[1].down is runner.fast_path.packed(layer.mlp.down_proj)
