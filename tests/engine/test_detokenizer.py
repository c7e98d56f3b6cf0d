"""Incremental detokenization on tokenizers built offline: multi-byte text, stop strings, output replacements."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chatstream.engine.detokenizer import IncrementalDetokenizer, TextFilter

CORPUS = [
    "Hello world, this is a test. The quick brown fox jumps over the lazy dog.",
    "User: how are you?\nAssistant: I am fine, thank you. Shall we talk about the weather?",
    "こんにちは、世界。今日はいい天気ですね。東京へ行きます。",
    "日本語のテキストをトークンに分割します。絵文字もあります 🎉✨",
]
EOS = "<|endoftext|>"
FFFD = "\ufffd"


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    # a small vocabulary keeps most Japanese characters split over several byte tokens
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS)


def _word_level_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "</s>", "hello", "world", "how", "are", "you", "stop", "here"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="</s>")


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: words carry a leading "▁" and a decode drops the space before its first word."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    model.decoder = decoders.Metaspace(prepend_scheme="always")
    model.train_from_iterator(CORPUS[:2] * 5, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=model)


BYTE_LEVEL = _byte_level_tokenizer()
WORD_LEVEL = _word_level_tokenizer()


def stream(detok: IncrementalDetokenizer, token_ids: Sequence[int], chunk: int = 1) -> list[str]:
    """Feed ``token_ids`` ``chunk`` at a time; every returned piece, the flush included."""
    pieces = [detok.add_tokens(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)]
    return [*pieces, detok.flush()]


def spans_tokens(text: str, token_ids: Sequence[int]) -> bool:
    """True when no single token's text contains ``text`` (it is split across tokens)."""
    return all(text not in BYTE_LEVEL.decode([t]) for t in token_ids)


def test_japanese_split_over_byte_tokens_never_emits_a_broken_character() -> None:
    text = "こんにちは、世界。今日はいい天気ですね。🎉 東京へ行きます。"
    ids = BYTE_LEVEL.encode(text)
    assert any(FFFD in BYTE_LEVEL.decode([t]) for t in ids)  # the test means something: characters are split
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt_token_ids=BYTE_LEVEL.encode("User: hi\n"))
    pieces = stream(detok, ids)
    assert not any(FFFD in piece for piece in pieces)
    assert "".join(pieces) == text
    assert sum(1 for piece in pieces if piece) > 5  # it streams, it does not wait for the end


def test_chunks_of_several_tokens() -> None:
    text = "Hello world, 今日はいい天気ですね。"
    ids = BYTE_LEVEL.encode(text)
    for chunk in (2, 3, 7):
        pieces = stream(IncrementalDetokenizer(BYTE_LEVEL), ids, chunk)
        assert "".join(pieces) == text and not any(FFFD in piece for piece in pieces)


def test_special_tokens_are_skipped_or_kept() -> None:
    ids = [*BYTE_LEVEL.encode("Hello"), BYTE_LEVEL.eos_token_id, *BYTE_LEVEL.encode(" world")]
    assert "".join(stream(IncrementalDetokenizer(BYTE_LEVEL), ids)) == "Hello world"
    kept = IncrementalDetokenizer(BYTE_LEVEL, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == f"Hello{EOS} world"


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    ids = BYTE_LEVEL.encode("I am fine.\nUser: and you?")
    assert spans_tokens("User:", ids)
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=["User:"])
    pieces, stopped_at = [], None
    for i, token in enumerate(ids):
        pieces.append(detok.add_tokens([token]))
        if detok.stopped and stopped_at is None:
            stopped_at = i
    pieces.append(detok.flush())
    assert "".join(pieces) == "I am fine.\n"
    assert not any("U" in piece for piece in pieces)
    assert stopped_at is not None and BYTE_LEVEL.decode(ids[: stopped_at + 1]).endswith("User:")
    assert BYTE_LEVEL.decode(ids[:stopped_at]).count("User:") == 0  # it stopped on the token that completed it


def test_stop_string_in_the_prompt_does_not_stop() -> None:
    prompt = BYTE_LEVEL.encode("User: hello\nAssistant: ")
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt_token_ids=prompt, stop=["User:", "Assistant:"])
    assert "".join(stream(detok, BYTE_LEVEL.encode("Hi there!"))) == "Hi there!"
    assert not detok.stopped


def test_stop_string_across_the_prompt_boundary_does_not_stop() -> None:
    prompt = BYTE_LEVEL.encode("say Us")
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt_token_ids=prompt, stop=["User:"])
    assert "".join(stream(detok, BYTE_LEVEL.encode("er: ok"))) == "er: ok"
    assert not detok.stopped


def test_partial_stop_string_is_held_back_and_released_by_flush() -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=["User:"])
    assert "".join(detok.add_tokens([t]) for t in BYTE_LEVEL.encode("Hello Us")) == "Hello "
    assert detok.flush() == "Us"
    assert not detok.stopped
    assert detok.flush() == "" and detok.add_tokens(BYTE_LEVEL.encode("x")) == ""


def test_tokens_after_a_stop_are_ignored() -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=["."])
    assert detok.add_tokens(BYTE_LEVEL.encode("One. Two")) == "One"
    assert detok.stopped
    assert detok.add_tokens(BYTE_LEVEL.encode(" three")) == "" and detok.flush() == ""


def test_the_earliest_of_several_stop_strings_wins() -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=["B", "A"])
    assert detok.add_tokens(BYTE_LEVEL.encode("xAyBz")) == "x"


def test_prompt_ending_inside_a_character_is_not_used_as_context() -> None:
    ids = BYTE_LEVEL.encode("今日は")
    cut = next(i for i in range(1, len(ids)) if BYTE_LEVEL.decode(ids[:i]).endswith(FFFD))
    prompt, output = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt_token_ids=prompt)
    assert "".join(stream(detok, output)) == BYTE_LEVEL.decode(output)


def test_replacement_split_across_tokens() -> None:
    ids = BYTE_LEVEL.encode("こんにちは<NL>元気?<NL>")
    assert spans_tokens("<NL>", ids)
    detok = IncrementalDetokenizer(BYTE_LEVEL, replacements=[("<NL>", "\n")])
    pieces = stream(detok, ids)
    assert "".join(pieces) == "こんにちは\n元気?\n"
    assert not any("<" in piece for piece in pieces)


def test_replacements_apply_in_order_then_stop_strings() -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=["\nUser"], replacements=[("<NL>", "\n"), ("\n\n", "\n")])
    text = "A<NL><NL>B<NL>User: no"
    assert "".join(stream(detok, BYTE_LEVEL.encode(text))) == "A\nB"
    assert detok.stopped


def test_a_partial_replacement_at_the_end_is_released_unchanged() -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, replacements=[("<NL>", "\n")])
    assert "".join(stream(detok, BYTE_LEVEL.encode("end<N"))) == "end<N"


def test_empty_old_string_or_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty old"):
        IncrementalDetokenizer(BYTE_LEVEL, replacements=[("", "x")])
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        IncrementalDetokenizer(BYTE_LEVEL, stop=[""])


def test_word_level_tokenizer() -> None:
    ids = WORD_LEVEL.encode("hello world how are you")
    assert "".join(stream(IncrementalDetokenizer(WORD_LEVEL), ids)) == "hello world how are you"
    # continuing a prompt, the first word keeps the space that separates it from the prompt
    with_prompt = IncrementalDetokenizer(WORD_LEVEL, prompt_token_ids=WORD_LEVEL.encode("hello"))
    assert "".join(stream(with_prompt, ids)) == " hello world how are you"
    stopping = IncrementalDetokenizer(WORD_LEVEL, stop=["stop"])
    assert "".join(stream(stopping, WORD_LEVEL.encode("hello stop here"))) == "hello "


def test_sentencepiece_style_leading_space_comes_from_the_prompt_context() -> None:
    tokenizer = _metaspace_tokenizer()
    prompt, output = tokenizer.encode("Hello"), tokenizer.encode("world, this is a test.")
    assert tokenizer.decode(output) == "world, this is a test."  # a decode alone drops the first space
    alone = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(alone, output)) == "world, this is a test."
    continuing = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    expected = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
    assert "".join(stream(continuing, output)) == expected == " world, this is a test."


# --- property: streaming equals the one-shot reference ----------------------------------------------------------

# no stop string is a substring of another, so "the first stop string" is the same for a stream and a whole text
STOP_POOL = ["th", "o w", "。", "ll", "\nUser:"]
REPLACEMENT_POOL = [("e", "E"), ("th", "<NL>"), ("<NL>", "\n"), ("。", "."), ("He", ""), ("ou", "oü")]
PROMPT_POOL = ["", "User: hi\nAssistant:", "今日は"]


def one_shot(token_ids: Sequence[int], stop: Sequence[str], replacements: Sequence[tuple[str, str]]) -> str:
    text = BYTE_LEVEL.decode(token_ids, skip_special_tokens=True)
    for old, new in replacements:
        text = text.replace(old, new)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


@settings(max_examples=200, deadline=None)
@given(
    token_ids=st.lists(st.integers(0, len(BYTE_LEVEL) - 1), max_size=40),
    chunk=st.integers(1, 4),
    stop=st.lists(st.sampled_from(STOP_POOL), max_size=3, unique=True),
    replacements=st.lists(st.sampled_from(REPLACEMENT_POOL), max_size=4),
    prompt=st.sampled_from(PROMPT_POOL),
)
def test_streamed_text_equals_one_shot_decoding(
    token_ids: list[int], chunk: int, stop: list[str], replacements: list[tuple[str, str]], prompt: str
) -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, BYTE_LEVEL.encode(prompt), stop, replacements)
    pieces, fed = [], 0
    while fed < len(token_ids) and not detok.stopped:
        pieces.append(detok.add_tokens(token_ids[fed : fed + chunk]))
        fed += chunk
    pieces.append(detok.flush())
    expected = one_shot(token_ids[:fed], stop, replacements)
    assert "".join(pieces) == expected
    assert detok.stopped == (expected != one_shot(token_ids[:fed], (), replacements))
    # pieces are never taken back, so a U+FFFD sent for a character that later completed would break equality


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abcdeこん世界🎉 .\n<NL>", max_size=30), st.integers(1, 3))
def test_real_text_round_trips(text: str, chunk: int) -> None:
    ids = BYTE_LEVEL.encode(text)
    pieces = stream(IncrementalDetokenizer(BYTE_LEVEL, BYTE_LEVEL.encode("User:")), ids, chunk)
    assert "".join(pieces) == BYTE_LEVEL.decode(ids)
    assert not any(FFFD in piece for piece in pieces)


@settings(max_examples=150, deadline=None)
@given(
    st.text(alphabet="ab<NL>", max_size=30),
    st.lists(st.sampled_from([("aba", "X"), ("aa", "b"), ("bb", "a"), ("<NL>", "\n"), ("X\n", "")]), max_size=3),
    st.lists(st.sampled_from(["bab", "\nX", "La"]), max_size=2, unique=True),
)
def test_overlapping_replacements_and_stops_match_str_replace(
    text: str, replacements: list[tuple[str, str]], stop: list[str]
) -> None:
    ids = BYTE_LEVEL.encode(text)
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=stop, replacements=replacements)
    pieces = []
    for token in ids:
        if detok.stopped:
            break
        pieces.append(detok.add_tokens([token]))
    pieces.append(detok.flush())
    expected = text
    for old, new in replacements:
        expected = expected.replace(old, new)
    cuts = [i for i in (expected.find(s) for s in stop) if i >= 0]
    assert "".join(pieces) == (expected[: min(cuts)] if cuts else expected)


def test_text_filter_replaces_across_chunks_and_stops() -> None:
    """The public filter (for engines that get text, not tokens): replacements first, then stop strings."""
    f = TextFilter(stop=("STOP",), replacements=(("ab", "X"),))
    pieces = [f.push(p) for p in ("xa", "bya", "bS", "TO", "P tail")]
    assert "".join(pieces) == "xXyX" and f.stopped and f.push("more", final=True) == ""
    held = TextFilter(stop=("END",))
    assert held.push("abcE") == "abc" and held.push("N", final=True) == "EN" and not held.stopped
