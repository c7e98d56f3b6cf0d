"""Fitting a prompt into the model's context: whole turns are dropped, oldest first; the system prompt stays.

A conversation that has grown past the context would otherwise be cut by the engine from the left, token by token:
that removes the system prompt first and can start the prompt in the middle of a message. Instead,
:func:`fit_turns` renders the history without its oldest turns (a turn: a user message and the answer to it) until
the prompt fits, always keeping the system text and the latest turn. The stored history is not changed: only the
prompt sent to the model is shorter.

For the OpenAI API, whose client sends the whole conversation each time, nothing is dropped silently: a prompt that
does not fit is refused with :class:`ContextLengthExceeded` (as vLLM does).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chatstream.prompts.content import RoleType

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

TokenCounter = Callable[[str], int]
"""Counts the tokens the engine will see for a prompt text."""

_SAFE_MARGIN_TOKENS = 8
"""Special tokens (BOS, EOS, a leading-space marker) a tokenizer may add beyond one token per UTF-8 byte."""


class ContextLengthExceeded(ValueError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""

    def __init__(self, context_len: int, num_prompt_tokens: int, num_completion_tokens: int | None) -> None:
        self.context_len = context_len
        self.num_prompt_tokens = num_prompt_tokens
        self.num_completion_tokens = num_completion_tokens
        if num_completion_tokens is None:
            detail = f"However, your request has {num_prompt_tokens} input tokens."
        else:
            total = num_prompt_tokens + num_completion_tokens
            detail = (
                f"However, you requested {total} tokens ({num_prompt_tokens} in the messages, "
                f"{num_completion_tokens} in the completion)."
            )
        super().__init__(
            f"This model's maximum context length is {context_len} tokens. {detail} "
            "Please reduce the length of the messages or completion."
        )


def token_counter(tokenizer: Any, add_special_tokens: bool | None) -> TokenCounter:
    """Count tokens as the engine encodes prompts (``tokenizer.encode`` with the same ``add_special_tokens``)."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}

    def count(text: str) -> int:
        return len(tokenizer.encode(text, **kwargs))

    return count


def surely_fits(text: str, budget: int) -> bool:
    """True when ``text`` cannot exceed ``budget`` tokens whatever the tokenizer (no token is shorter than a byte,
    apart from a few special ones): most prompts are checked without tokenizing them."""
    return len(text.encode()) + _SAFE_MARGIN_TOKENS <= budget


def fit_turns(chat_prompt: AbstractChatPrompt, count: TokenCounter, budget: int) -> tuple[str, int]:
    """The prompt text of ``chat_prompt`` without as few of its oldest turns as needed to fit ``budget`` tokens,
    and how many turns were dropped. The system text and the latest turn always stay (a latest turn that alone does
    not fit is left for the engine to cut)."""
    text = chat_prompt.create_prompt()
    starts = turn_starts(chat_prompt)
    if surely_fits(text, budget) or len(starts) < 2 or count(text) <= budget:
        return text, 0
    low, high = 1, len(starts) - 1  # drop `high` turns: only the latest one stays
    best = without_turns(chat_prompt, starts, high).create_prompt()
    while low < high:
        middle = (low + high) // 2
        candidate = without_turns(chat_prompt, starts, middle).create_prompt()
        if count(candidate) <= budget:
            best, high = candidate, middle
        else:
            low = middle + 1
    return best, high


def turn_starts(chat_prompt: AbstractChatPrompt) -> list[int]:
    """Indexes in ``chat_contents`` where a turn begins (a requester message; leading answers belong to turn 0)."""
    starts = [i for i, c in enumerate(chat_prompt.chat_contents) if c.get_role_type() is RoleType.REQUESTER]
    if starts and starts[0] != 0:
        starts[0] = 0
    return starts


def without_turns(chat_prompt: AbstractChatPrompt, starts: list[int], num_dropped: int) -> AbstractChatPrompt:
    """A shallow copy of ``chat_prompt`` whose history begins at turn ``num_dropped`` (the original is untouched)."""
    trimmed = copy.copy(chat_prompt)
    trimmed.chat_contents = []
    trimmed.requester_messages = []
    trimmed.responder_messages = []
    for content in chat_prompt.chat_contents[starts[num_dropped] :]:
        trimmed._append_content(content)
    return trimmed


class ContextWindow:
    """The context of one model, and how prompts are measured against it.

    Args:
        context_len: the most tokens a sequence may hold (prompt + generated).
        tokenizer: the model's tokenizer (prompts are counted as the engine encodes them).
        add_special_tokens: the engine's default for prompts that do not say (None: the tokenizer's default).
    """

    def __init__(self, context_len: int, tokenizer: Any, add_special_tokens: bool | None = None) -> None:
        self.context_len = context_len
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens

    def counter(self, add_special_tokens: bool | None) -> TokenCounter:
        """A token counter for prompts encoded with ``add_special_tokens`` (None: the engine's default)."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return token_counter(self.tokenizer, special)

    def chat_prompt_text(
        self, chat_prompt: AbstractChatPrompt, max_new_tokens: int, add_special_tokens: bool | None
    ) -> tuple[str, int]:
        """The prompt of ``chat_prompt`` with room for ``max_new_tokens``, and how many oldest turns it leaves out."""
        if not chat_prompt.is_chat_mode_enabled():
            return chat_prompt.create_prompt(), 0
        budget = max(1, self.context_len - max_new_tokens)
        return fit_turns(chat_prompt, self.counter(add_special_tokens), budget)

    def needs_counting(self, prompt: str, max_new_tokens: int) -> bool:
        """False when ``prompt`` surely leaves room for ``max_new_tokens`` (no tokenizing needed)."""
        return not surely_fits(prompt, self.context_len - max_new_tokens)

    def max_new_tokens_for(
        self, prompt: str, max_new_tokens: int, max_tokens_given: bool, add_special_tokens: bool | None
    ) -> int:
        """``max_new_tokens`` when it fits with ``prompt``; otherwise what fits, unless the client asked for that
        many (``max_tokens_given``) or the prompt alone fills the context: then ContextLengthExceeded."""
        num_prompt = self.counter(add_special_tokens)(prompt)
        if num_prompt + max_new_tokens <= self.context_len:
            return max_new_tokens
        if max_tokens_given or num_prompt >= self.context_len:
            raise ContextLengthExceeded(self.context_len, num_prompt, max_new_tokens if max_tokens_given else None)
        return self.context_len - num_prompt
