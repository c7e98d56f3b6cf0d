"""Constrained decoding and logprobs inside the engine: grammar masks in the batched sampler (the prefill's first
token included), other rows untouched, logprobs of the masked and penalised distribution."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import jsonschema
import pytest
import torch
from tests.engine.test_llm_engine import run_until_idle, tokens
from tests.tiny_model import PROMPTS, greedy, reference

from chatstream.config import EngineConfig, SamplingParams
from chatstream.engine.base import Delta, FinishReason, GenerationRequest
from chatstream.engine.grammar import GrammarSpec
from chatstream.engine.llm_engine import LLMEngine

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def test_unconstrained_rows_keep_their_greedy_tokens(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_batch_size=8))
    outputs: dict[str, list[Delta]] = defaultdict(list)
    for i in range(4):
        llm.add_request(GenerationRequest(f"plain{i}", PROMPTS[i], greedy(12)))
        sampling = SamplingParams(max_new_tokens=40, temperature=1.0, seed=i)
        llm.add_request(GenerationRequest(f"json{i}", PROMPTS[i], sampling, grammar=GrammarSpec.json_schema(SCHEMA)))
    run_until_idle(llm, outputs)
    for i in range(4):
        assert tokens(outputs[f"plain{i}"]) == reference(tiny_model, tiny_tokenizer.encode(PROMPTS[i]), 12), i
        constrained = outputs[f"json{i}"]
        assert constrained[-1].finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(text_of(constrained)), SCHEMA)


def test_the_first_token_from_the_prefill_is_constrained(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    outputs: dict[str, list[Delta]] = defaultdict(list)
    for i in range(3):
        llm.add_request(GenerationRequest(f"r{i}", PROMPTS[i], greedy(1), grammar=GrammarSpec.json_object()))
    run_until_idle(llm, outputs)
    for i in range(3):
        (delta,) = outputs[f"r{i}"]
        assert delta.text == "{" and delta.finish_reason is FinishReason.LENGTH


def test_a_grammar_that_completes_stops_without_eos(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    outputs: dict[str, list[Delta]] = defaultdict(list)
    spec = GrammarSpec.json_schema({"enum": ["yes", "no"]})
    llm.add_request(GenerationRequest("r", PROMPTS[1], greedy(30, ignore_eos=True), grammar=spec))
    run_until_idle(llm, outputs)
    assert text_of(outputs["r"]) in ('"yes"', '"no"')
    assert outputs["r"][-1].finish_reason is FinishReason.STOP


def test_an_invalid_grammar_fails_only_its_request(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    (failed,) = llm.add_request(GenerationRequest("bad", "x", greedy(3), grammar=GrammarSpec.lark("start: nope")))
    assert failed.delta.finish_reason is FinishReason.ERROR and "tool_choice" in (failed.delta.error or "")
    with pytest.raises(ValueError, match=r"response_format\.json_schema\.schema"):
        llm.validate_grammar(GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}))


def first_step_logits(model: Any, tokenizer: Any, prompt: str) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokenizer.encode(prompt)])).logits[0, -1].float()


def test_logprobs_are_the_log_softmax_of_the_logits(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    outputs: dict[str, list[Delta]] = defaultdict(list)
    llm.add_request(GenerationRequest("top5", PROMPTS[1], greedy(4), logprobs=5))
    llm.add_request(GenerationRequest("none", PROMPTS[1], greedy(4)))
    llm.add_request(GenerationRequest("chosen", PROMPTS[1], greedy(4), logprobs=0))
    run_until_idle(llm, outputs)
    expected = first_step_logits(tiny_model, tiny_tokenizer, PROMPTS[1]).log_softmax(-1)
    first = outputs["top5"][0].logprobs[0]
    assert first.token_id == int(expected.argmax()) and first.token == tiny_tokenizer.decode([first.token_id])
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    values, ids = expected.topk(5)
    assert [t.token_id for t in first.top] == ids.tolist()
    assert [t.logprob for t in first.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert all(len(d.logprobs) == len(d.token_ids) for d in outputs["top5"])
    raw = b"".join(lp.token_bytes for d in outputs["top5"] for lp in d.logprobs)
    assert raw.decode("utf-8", "replace") == tiny_tokenizer.decode(tokens(outputs["top5"]), skip_special_tokens=False)
    assert all(not d.logprobs for d in outputs["none"])
    assert all(len(d.logprobs) == 1 and d.logprobs[0].top == () for d in outputs["chosen"] if d.token_ids)


def test_logprobs_follow_the_grammar_mask(tiny_model: Any, tiny_tokenizer: Any) -> None:
    llm = LLMEngine(tiny_model, tiny_tokenizer)
    outputs: dict[str, list[Delta]] = defaultdict(list)
    llm.add_request(GenerationRequest("r", PROMPTS[1], greedy(1), grammar=GrammarSpec.json_object(), logprobs=5))
    run_until_idle(llm, outputs)
    (logprob,) = outputs["r"][0].logprobs
    assert logprob.token == "{" and logprob.logprob == pytest.approx(0.0, abs=1e-6)  # the only token allowed
    assert [t.token for t in logprob.top] == ["{"]
