"""A tiny random Llama-style causal LM and a byte-level BPE tokenizer, built offline and deterministically.

Used by the test suite (see ``tests/conftest.py``) and by ``bench/engine_throughput.py --model tiny``. The tokenizer is
trained on a small built-in English + Japanese corpus, so multi-byte characters are split across tokens and the
incremental detokenizer has real work to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chatstream.config import SamplingParams
from chatstream.engine.base import Delta, FinishReason, RequestStream

SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = (
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "ChatStream streams tokens from a language model to the browser.",
    "Once upon a time there was a small model that could only babble.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
    "こんにちは、お元気ですか？私は元気です。",
    "今日は良い天気ですね。散歩に行きましょう。",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "吾輩は猫である。名前はまだ無い。",
    "ユーザー: こんにちは\nアシスタント: こんにちは！何かお手伝いできることはありますか？",
    "絵文字も使えます 😀🎉 and mixed text 日本語 English.",
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on :data:`CORPUS` (deterministic) and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A 2-layer Llama with a wide random init (logit gaps large enough that greedy ties never happen)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
    return model.to(torch.float32).eval()


def build_tiny(path: Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build the tokenizer and model; save both to ``path`` when given (a directory ``from_pretrained`` can load)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(path)
        model.save_pretrained(path)
    return model, tokenizer


# ---- helpers for the engine tests -----------------------------------------------------------------------------------

PROMPTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "こんにちは、お元気ですか？",
    "Once upon a time there was a small model that could only babble. It babbled all day long.",
    "x",
    "日本の首都は東京です。富士山は日本で一番高い山です。吾輩は猫である。",
    "User: What is the capital of France?\nAssistant:",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 and more numbers 42 43 44",
)


def greedy(max_new_tokens: int, **changes: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **changes)


@dataclass
class Collected:
    """Everything one stream delivered."""

    deltas: list[Delta] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.deltas[-1].finish_reason if self.deltas else None


async def collect(stream: RequestStream) -> Collected:
    out = Collected()
    async for delta in stream:
        out.deltas.append(delta)
    return out


def reference(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of ``model.generate`` for the prompt alone (stops at EOS, which it includes)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids) :].tolist()


def tiny_gemma(
    vocab: int, layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention")
) -> Gemma3ForCausalLM:
    """A tiny random Gemma-3 in bfloat16 with heads of 64 (the kernel extension's attention takes them) and a window
    of 24; the same weights every call."""
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, sliding_window=24, max_position_embeddings=1024,
        layer_types=list(layer_types), initializer_range=0.3,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return Gemma3ForCausalLM(config).eval().to(torch.bfloat16)
