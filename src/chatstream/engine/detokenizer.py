"""Incremental detokenization with stop strings and output replacements.

Three stages, each streaming:

1. window decoding (vLLM's prefix/read offsets): each call decodes only the tokens since the last released point plus
   the few before them, and holds text back while it ends with U+FFFD (a multi-byte character split across tokens);
2. output replacements, applied in order like chained ``str.replace``, holding back a tail that may still become
   an ``old`` string;
3. stop strings, matched on the generated text after replacements, holding back a tail that may still become a stop
   string; from the first stop string on nothing is ever released.

The text released over a whole request equals ``apply_replacements(decode(output_ids))`` cut at the first stop
string, where ``decode`` continues the prompt: the last few prompt tokens are decoded as context and the text they
produce is not part of the output. For byte-level BPE tokenizers this is exactly ``tokenizer.decode(output_ids)``;
for tokenizers that drop the space before the first word of a decode (Llama-2 style SentencePiece, word-level
tokenizers) it keeps the space that separates the first output word from the prompt. Pass no prompt tokens to get
``tokenizer.decode(output_ids)`` for those too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the first output token, so that its leading space comes out as in the full text."""


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text that is safe to send, a few tokens at a time.

    Call :meth:`add_tokens` after every step and send what it returns; call :meth:`flush` once when the request
    finishes to release what was held back. Once :attr:`stopped` is True the request should end: later tokens are
    ignored.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        replacements: Sequence[tuple[str, str]] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = [int(t) for t in prompt_token_ids[max(0, len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS) :]]
        if context and self._decode(context).endswith(REPLACEMENT_CHARACTER):
            context = []  # the prompt ends inside a character: its tail is no usable context
        self._token_ids = context  # only the decoding window: tokens from the prefix offset on
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None
        self._filter = TextFilter(stop, replacements)
        self._flushed = False

    @property
    def stopped(self) -> bool:
        """A stop string appeared in the output; nothing from it onward is ever returned."""
        return self._filter.stopped

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Take newly generated tokens; return the text that may be sent now (possibly empty)."""
        if self.stopped or self._flushed:
            return ""
        self._token_ids.extend(int(t) for t in token_ids)
        return self._release(self._decode_window(final=False), final=False)

    def flush(self) -> str:
        """At the end of the request: return everything still held back (a partial stop string included)."""
        if self.stopped or self._flushed:
            return ""
        self._flushed = True
        return self._release(self._decode_window(final=True), final=True)

    def _decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens))

    def _decode_window(self, final: bool) -> str:
        """New text of the tokens after the read offset, decoded together with those since the prefix offset."""
        if self._read_offset == len(self._token_ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text):
            return ""  # e.g. only skipped special tokens so far
        if window_text.endswith(REPLACEMENT_CHARACTER) and not final:
            return ""  # a multi-byte character is not complete yet
        new_text = window_text[len(self._prefix_text) :]
        self._advance()
        return new_text

    def _advance(self) -> None:
        # the next window starts at the current read offset; tokens before it are never decoded again
        del self._token_ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._token_ids)
        self._prefix_text = None

    def _release(self, text: str, final: bool) -> str:
        return self._filter.push(text, final)


class TextFilter:
    """Stages 2 and 3 on streamed text alone: output replacements, then stop strings.

    For engines that receive text instead of token ids (an upstream server). Feed each new piece to :meth:`push`
    and send what it returns; the last call passes ``final=True`` to release what was held back. Once
    :attr:`stopped` is True, a stop string has ended the output and nothing more is ever returned.
    """

    def __init__(self, stop: Sequence[str] = (), replacements: Sequence[tuple[str, str]] = ()) -> None:
        self._replacers = [_Replacer(old, new) for old, new in replacements]
        self._stop = _StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        """A stop string appeared; nothing from it onward is returned."""
        return self._stop.stopped

    def push(self, text: str, final: bool = False) -> str:
        """The text that may be sent now; ``final`` releases everything held back (a partial stop string too)."""
        if self._stop.stopped:
            return ""
        for replacer in self._replacers:
            text = replacer.push(text, final)
        return self._stop.push(text, final)


class _Replacer:
    """Streaming ``str.replace(old, new)``: the concatenated output equals the replaced concatenated input."""

    def __init__(self, old: str, new: str) -> None:
        if not old:
            raise ValueError(f"output replacement ({old!r}, {new!r}) must have a non-empty old string")
        self._old = old
        self._new = new
        self._pending = ""

    def push(self, text: str, final: bool) -> str:
        pending = self._pending + text
        if final:
            self._pending = ""
            return pending.replace(self._old, self._new)
        parts, start = [], 0
        while (found := pending.find(self._old, start)) >= 0:
            parts.append(pending[start:found])
            parts.append(self._new)
            start = found + len(self._old)
        rest = pending[start:]
        held = _partial_match_length(rest, (self._old,))
        self._pending = rest[len(rest) - held :]
        parts.append(rest[: len(rest) - held])
        return "".join(parts)


class _StopMatcher:
    """Cuts the stream at the first stop string; holds back a tail that may still become one."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._stop = tuple(stop)
        self._pending = ""
        self.stopped = False

    def push(self, text: str, final: bool) -> str:
        if not self._stop:
            return text
        pending = self._pending + text
        found = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            self._pending = ""
            return pending[: min(found)]
        held = 0 if final else _partial_match_length(pending, self._stop)
        self._pending = pending[len(pending) - held :]
        return pending[: len(pending) - held]


def _partial_match_length(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``patterns``."""
    longest = 0
    for pattern in patterns:
        for length in range(min(len(text), len(pattern) - 1), longest, -1):
            if text.endswith(pattern[:length]):
                longest = length
                break
    return longest
