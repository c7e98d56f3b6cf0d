"""TransformersEngine on a tiny random Gemma-3 (sliding-window layers): greedy equality with ``model.generate``.

The engine keeps every layer at full length and lets the model's sliding-window mask apply the window, while
``generate`` uses transformers' own sliding-window cache; prompts and outputs run well past the window.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from tests.tiny_model import PROMPTS, collect, greedy, reference
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from chatstream.engine.base import GenerationRequest

WINDOW = 8


def build_gemma(tokenizer: Any, window: int) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        max_position_embeddings=2048,
        initializer_range=0.5,
        final_logit_softcapping=30.0,
        tie_word_embeddings=False,  # tied random embeddings make the model repeat its input token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = Gemma3ForCausalLM(config)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_gemma(tiny_tokenizer: Any) -> Gemma3ForCausalLM:
    return build_gemma(tiny_tokenizer, WINDOW)


async def test_sliding_window_model_matches_generate(
    make_tiny_engine: Any, tiny_gemma: Gemma3ForCausalLM, tiny_tokenizer: Any
) -> None:
    engine = make_tiny_engine(model=tiny_gemma, max_batch_size=8)
    prompts = [PROMPTS[i] for i in (3, 0, 5, 7)]
    assert max(len(tiny_tokenizer.encode(p)) for p in prompts) > 2 * WINDOW
    max_new = 3 * WINDOW
    streams = []
    for i, prompt in enumerate(prompts):
        streams.append(engine.add_request(GenerationRequest(f"r{i}", prompt, greedy(max_new))))
        await asyncio.sleep(0.01)
    outs = await asyncio.gather(*(collect(s) for s in streams))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference(tiny_gemma, tiny_tokenizer.encode(prompt), max_new)
    # the window really shapes these outputs: the same weights without a window answer differently
    unwindowed = build_gemma(tiny_tokenizer, 4096)
    ids = tiny_tokenizer.encode(prompts[0])
    assert reference(unwindowed, ids, max_new) != outs[0].token_ids
