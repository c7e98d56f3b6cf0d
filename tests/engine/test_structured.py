"""Constrained decoding: grammar specs, the compiler's cache and errors, matchers, batched masks, and the proof that
the tiny random model's output always parses and validates under a JSON schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast

from chatstream.config import SamplingParams
from chatstream.engine.sampler import make_generator, sample
from chatstream.engine.structured import (
    GrammarCompiler,
    GrammarKind,
    GrammarMatcher,
    GrammarSpec,
    _mask_rows_by_row,
    _mask_rows_dense,
    allocate_bitmask,
    apply_masks,
    bitmask_to_bool,
    response_format_grammar,
)

torch.set_num_threads(1)

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
"""Every string and array is bounded, so a complete object always fits in :data:`MAX_NEW_TOKENS`."""

MAX_NEW_TOKENS = 256


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer: PreTrainedTokenizerFast) -> GrammarCompiler:
    return GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), [tiny_tokenizer.eos_token_id])


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---- specs -------------------------------------------------------------------------------------------------------


def test_response_format_text_and_none_need_no_grammar() -> None:
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None


def test_response_format_json_object_and_schema() -> None:
    assert response_format_grammar({"type": "json_object"}) == GrammarSpec.json_object()
    spec = response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}})
    assert spec is not None and spec.kind is GrammarKind.JSON_SCHEMA
    assert json.loads(spec.text) == PERSON_SCHEMA
    assert spec.field == "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("json", "response_format must be an object"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema is required"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema.schema must be"),
    ],
)
def test_bad_response_format_names_the_field(value: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        response_format_grammar(value)


def test_schema_text_is_canonical() -> None:
    assert GrammarSpec.json_schema({"b": 1, "a": 2}).text == GrammarSpec.json_schema({"a": 2, "b": 1}).text


# ---- compiler ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "foo"},
        {"type": "string", "pattern": "(("},
        {"type": "integer", "minimum": 5, "maximum": 2},
        {"properties": {"a": {"$ref": "#/nowhere"}}},
    ],
)
def test_invalid_schema_is_a_value_error_naming_the_field(compiler: GrammarCompiler, schema: dict[str, Any]) -> None:
    spec = response_format_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    assert spec is not None
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: ") as caught:
        compiler.matcher(spec)
    assert "\n" not in str(caught.value)


def test_compiled_grammars_are_cached_and_bounded(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    small = GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), [tiny_tokenizer.eos_token_id], max_cached=2)
    specs = [GrammarSpec.json_schema({"type": "object", "maxProperties": n}) for n in range(3)]
    small.validate(specs[0])
    first = small._templates[f"json_schema:{specs[0].text}"]
    small.validate(specs[0])
    assert small._templates[f"json_schema:{specs[0].text}"] is first
    small.validate(specs[1])
    small.validate(specs[2])
    assert len(small._templates) == 2 and f"json_schema:{specs[0].text}" not in small._templates


def test_matchers_of_one_grammar_are_independent(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    one, two = compiler.matcher(GrammarSpec.json_object()), compiler.matcher(GrammarSpec.json_object())
    assert all(one.accept(t) for t in encode(tiny_tokenizer, '{"a":'))
    assert two.allowed().nonzero().flatten().tolist() == encode(tiny_tokenizer, "{")


# ---- matcher -----------------------------------------------------------------------------------------------------


def test_stop_token_allowed_only_where_the_json_may_end(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    eos = tiny_tokenizer.eos_token_id
    matcher = compiler.matcher(GrammarSpec.json_object())
    assert not matcher.allowed()[eos]
    tokens = encode(tiny_tokenizer, '{"a":[1,2],"b":{"c":"x"}}')
    for token in tokens[:-1]:
        assert matcher.accept(token)
        assert not matcher.can_end and not matcher.allowed()[eos]
    assert matcher.accept(tokens[-1])
    assert matcher.can_end and matcher.is_finished
    assert matcher.allowed().nonzero().flatten().tolist() == [eos]
    assert matcher.accept(eos)


def test_a_forbidden_token_is_refused_with_an_error(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    matcher = compiler.matcher(GrammarSpec.json_object())
    assert matcher.error is None
    assert not matcher.accept(encode(tiny_tokenizer, "x")[0])
    assert matcher.error and matcher.is_finished


def test_lark_grammar_with_a_special_token(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    bos = tiny_tokenizer.bos_token_id
    spec = GrammarSpec.lark(f'start: <[{bos}]> "call:" %json{{"type": "integer"}}')
    matcher = compiler.matcher(spec)
    assert matcher.allowed().nonzero().flatten().tolist() == [bos]
    assert matcher.accept(bos)
    assert all(matcher.accept(t) for t in encode(tiny_tokenizer, "call:42"))
    assert matcher.can_end


def test_invalid_lark_names_tool_choice(compiler: GrammarCompiler) -> None:
    with pytest.raises(ValueError, match=r"^tool_choice: "):
        compiler.matcher(GrammarSpec.lark("start: undefined_rule"))


# ---- masks -------------------------------------------------------------------------------------------------------


def test_bitmask_to_bool_unpacks_every_bit() -> None:
    vocab_size = 70  # not a multiple of 32: the last word is cut
    allowed = torch.rand(3, vocab_size, generator=torch.Generator().manual_seed(0)) < 0.5  # [3, V]
    bitmask = allocate_bitmask(3, vocab_size)
    bitmask.zero_()
    for row, token in allowed.nonzero().tolist():
        word, bit = divmod(token, 32)
        bitmask[row, word] |= torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)
    assert torch.equal(bitmask_to_bool(bitmask, vocab_size), allowed)


def test_apply_masks_touches_only_constrained_rows(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    vocab_size = len(tiny_tokenizer)
    logits = torch.randn(3, vocab_size).to(torch.bfloat16)  # [B, V]
    original = logits.clone()
    matcher = compiler.matcher(GrammarSpec.json_object())
    apply_masks(logits, [None, matcher, None])
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    allowed = matcher.allowed()
    assert torch.equal(logits[1][allowed], original[1][allowed])
    assert bool((logits[1][~allowed] == float("-inf")).all())
    apply_masks(logits, [None, None, None])
    with pytest.raises(ValueError, match="2 matchers for 3 rows"):
        apply_masks(logits, [matcher, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_by_row_masks_match_the_dense_ones(
    compiler: GrammarCompiler, tiny_tokenizer: Any, dtype: torch.dtype
) -> None:
    start = compiler.matcher(GrammarSpec.json_object())  # allows "{" only: rebuilt from its allowed logits
    inside = compiler.matcher(GrammarSpec.json_object())  # inside a string: most tokens allowed
    assert all(inside.accept(t) for t in encode(tiny_tokenizer, '{"a":"'))
    assert int(inside.allowed().sum()) > len(tiny_tokenizer) // 2
    finished = compiler.matcher(GrammarSpec.json_schema({"const": 1}))
    assert finished.accept(encode(tiny_tokenizer, "1")[0])  # allows EOS only
    bitmask = allocate_bitmask(3, len(tiny_tokenizer))
    for index, matcher in enumerate((start, inside, finished)):
        matcher.fill_bitmask(bitmask, index)
    logits = torch.randn(4, len(tiny_tokenizer)).to(dtype)  # [B, V]
    by_row, dense = logits.clone(), logits.clone()
    _mask_rows_by_row(by_row, [0, 2, 3], bitmask)
    _mask_rows_dense(dense, [0, 2, 3], bitmask)
    assert torch.equal(by_row, dense) and torch.equal(by_row[1], logits[1])
    assert by_row[3].isfinite().nonzero().flatten().tolist() == [tiny_tokenizer.eos_token_id]


def test_apply_masks_rejects_a_vocabulary_mismatch(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="vocabularies"):
        apply_masks(torch.zeros(1, len(tiny_tokenizer) + 32), [compiler.matcher(GrammarSpec.json_object())])


# ---- the tiny random model under a schema -----------------------------------------------------------------------


def generate_constrained(
    model: LlamaForCausalLM, prompt_ids: list[int], matchers: list[GrammarMatcher], eos: int
) -> tuple[list[list[int]], list[str]]:
    """Decode a batch (one row per matcher, same prompt) with masks and seeded sampling; (tokens, finish reasons)."""
    rows = len(matchers)
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=row) for row in range(rows)]
    generators = [make_generator(p.seed) for p in params]
    outputs: list[list[int]] = [[] for _ in range(rows)]
    finish: list[str | None] = [None] * rows
    input_ids = torch.tensor([prompt_ids] * rows)  # [B, T]
    cache = DynamicCache(config=model.config)  # filled in place by each forward
    with torch.inference_mode():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(input_ids=input_ids, cache=cache, use_cache=True).logits[:, -1, :].clone()  # [B, V]
            live = [m if finish[row] is None else None for row, m in enumerate(matchers)]
            apply_masks(logits, live)
            next_ids = sample(logits, params, [prompt_ids] * rows, outputs, generators)  # [B]
            for row, token in enumerate(next_ids.tolist()):
                if finish[row] is None:
                    assert matchers[row].accept(token), matchers[row].error
                    finish[row] = "stop" if token == eos else None
                    if finish[row] is None:
                        outputs[row].append(token)
            if all(finish):
                break
            input_ids = next_ids.unsqueeze(1)  # [B, 1]; finished rows feed their EOS on, ignored
    return outputs, [reason or "length" for reason in finish]


def test_twenty_random_generations_parse_and_validate(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast, compiler: GrammarCompiler
) -> None:
    spec = response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}})
    assert spec is not None
    prompt_ids = encode(
        tiny_tokenizer,
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        ),
    )
    matchers = [compiler.matcher(spec) for _ in range(20)]
    outputs, finish = generate_constrained(tiny_model, prompt_ids, matchers, tiny_tokenizer.eos_token_id)
    assert finish == ["stop"] * 20
    texts = [tiny_tokenizer.decode(ids) for ids in outputs]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert len(set(texts)) == 20  # the seeds really sampled: the rows differ


@pytest.mark.slow
def test_gemma_tokenizer_random_walks_parse_and_validate() -> None:
    """Gemma-3's SentencePiece-style vocabulary (262k tokens, byte fallback, ``<end_of_turn>`` as a second stop)."""
    from transformers import AutoTokenizer

    from chatstream.models import prepare_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_model_dir(None, progress=False)), local_files_only=True)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    compiler = GrammarCompiler(tokenizer, 262144, stops)
    spec = GrammarSpec.json_schema(PERSON_SCHEMA)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        matcher, tokens = compiler.matcher(spec), []
        while len(tokens) < MAX_NEW_TOKENS:
            logits = torch.randn(1, 262144, generator=generator) * 3  # [1, V]
            apply_masks(logits, [matcher])
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            assert matcher.accept(token), matcher.error
            if token in stops:
                break
            tokens.append(token)
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), PERSON_SCHEMA)
