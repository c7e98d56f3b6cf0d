"""AbstractChatPrompt: a conversation history plus the rules that render it as one model's prompt text.

A prompt class keeps the messages of one conversation (requester = user, responder = model) and knows how its
model wants them laid out (:meth:`AbstractChatPrompt.create_prompt`), which strings end an answer
(:meth:`AbstractChatPrompt.get_stop_strs`) and which substitutions apply to input and output. The API is the one of
the original ChatStream 0.3 (``chatstream.chat_prompt``), so prompt classes written for it run unchanged.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from chatstream.prompts.content import ChatContent, PromptOptions, PromptTTL, RoleType
from chatstream.prompts.history import ChatHistory

logger = logging.getLogger(__name__)

OptsArg = PromptOptions | Mapping[str, Any] | None
"""What ``create_prompt`` / ``get_contents`` accept: None, :class:`PromptOptions` or the seed's dict."""

Replacements = list[tuple[str, str]]

PromptT = TypeVar("PromptT", bound="AbstractChatPrompt")

__all__ = [
    "AbstractChatPrompt",
    "ChatContent",
    "OptsArg",
    "PromptOptions",
    "PromptTTL",
    "Replacements",
    "RoleType",
]


class AbstractChatPrompt(ChatHistory, ABC):
    """A builder of chat prompts for one kind of language model, holding one conversation's history.

    Subclasses implement :meth:`create_prompt` (and :meth:`build_initial_prompt`, usually a no-op) and may override
    :meth:`get_stop_strs`, :meth:`get_replacement_when_input`, :meth:`get_replacement_when_output`,
    :meth:`get_custom_skip_echo_len` and :meth:`format_system_message`.

    The server adds a turn with ``add_requester_msg(text)`` followed by ``add_responder_msg(None)``; the empty
    responder slot must render as the generation prefix (e.g. ``"<bot>:"``), so that the model writes the answer.

    ``chat_contents`` holds every message in order; ``requester_messages`` and ``responder_messages`` hold the same
    :class:`ChatContent` objects (not copies) split by side.
    """

    encode_add_special_tokens: bool = True
    """Whether the engine lets the tokenizer add its special tokens (BOS) when encoding ``create_prompt()``'s text;
    False for formats whose text already contains them (chat templates)."""

    def __init__(self) -> None:
        super().__init__()
        self.system: str = ""
        self.chat_mode: bool = True
        self.special_tokens: list[str] | None = None
        self.tokenizer: Any = None
        # For models that do not stop reliably at EOS: the text that opens a requester turn (e.g. "<human>:")
        # becomes a stop string. The attribute name is the seed's, although it holds the requester's prefix.
        self.prefix_as_stop_str_enabled: bool = False
        self.responder_prefix_as_stop_str: str | None = None
        self.final_stop_strs: list[str] | None = None
        self.prompt_ttl_mode: PromptTTL = PromptTTL.MULTI_TURN

    # ------------------------------------------------------------------ settings

    def set_prompt_ttl(self, prompt_ttl: PromptTTL) -> None:
        """Render every turn (``PromptTTL.MULTI_TURN``, the default) or only the latest (``SINGLE_TURN``)."""
        if not isinstance(prompt_ttl, PromptTTL):
            raise ValueError(f"prompt_ttl must be a PromptTTL, got {prompt_ttl!r}")
        self.prompt_ttl_mode = prompt_ttl

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach the model's tokenizer (not serialised; attach it again after :meth:`from_dict`)."""
        self.tokenizer = tokenizer
        self.special_tokens = _special_token_strings(tokenizer) if tokenizer is not None else None

    def set_chat_mode_enabled(self, enabled: bool) -> None:
        """Chat mode off: the prompt is the user's last message alone, no history, no stop strings."""
        self.chat_mode = enabled

    def is_chat_mode_enabled(self) -> bool:
        return self.chat_mode

    def set_system(self, system: str) -> None:
        """Set the text that opens every prompt, already in this model's format (see :meth:`format_system_message`)."""
        self.system = system

    def set_requester(self, requester: str) -> None:
        """Set the role name of the requester (the user)."""
        self.requester = requester
        if self.prefix_as_stop_str_enabled:
            self.responder_prefix_as_stop_str = self._measure_requester_prefix()

    def set_responder(self, responder: str) -> None:
        """Set the role name of the responder (the model)."""
        self.responder = responder

    def set_prefix_as_stop_str_enabled(self, enabled: bool) -> None:
        """Use the text that opens a requester turn (e.g. ``"<human>:"``) as a stop string.

        For models that do not stop reliably at EOS and go on to write the user's next line. The prefix is measured
        by rendering an empty requester turn, so set the role names first. The history is left untouched.

        Raises:
            ValueError: when the requester turn renders as an empty string.
        """
        self.prefix_as_stop_str_enabled = enabled
        self.final_stop_strs = None
        if not enabled:
            return
        prefix = self._measure_requester_prefix()
        if not prefix:
            raise ValueError(
                "an empty requester turn renders as an empty string, so it cannot be a stop string; "
                "call set_requester / set_responder before set_prefix_as_stop_str_enabled(True)"
            )
        self.responder_prefix_as_stop_str = prefix

    def _measure_requester_prefix(self) -> str | None:
        """Render an empty history and then one empty requester turn on a scratch copy; return the difference."""
        scratch = copy.copy(self)
        scratch.chat_contents, scratch.requester_messages, scratch.responder_messages = [], [], []
        scratch.chat_mode = True
        scratch.prompt_ttl_mode = PromptTTL.MULTI_TURN
        before = scratch.create_prompt()
        scratch.add_requester_msg(None)
        after = scratch.create_prompt()
        prefix = after[len(before) :] if after.startswith(before) else after
        return prefix or None

    # ------------------------------------------------------------------ history (the rest is in ChatHistory)

    def get_contents(self, opts: OptsArg = None) -> list[ChatContent]:
        """The messages a prompt is rendered from.

        Args:
            opts: ``omit_last_message`` renders the last message as an empty slot; ``to_message_id`` stops after
                the message with that id. A dict (the seed's form) or :class:`PromptOptions`.

        In ``PromptTTL.SINGLE_TURN`` mode only the latest turn (from the last requester message on) is returned.
        """
        options = PromptOptions.coerce(opts)
        contents: list[ChatContent] = []
        last_index = len(self.chat_contents) - 1
        for index, content in enumerate(self.chat_contents):
            if options.omit_last_message and index == last_index:
                contents.append(_empty_copy(content))
            else:
                contents.append(content)
            if options.to_message_id is not None and content.get_message_id() == options.to_message_id:
                break
        if self.prompt_ttl_mode is PromptTTL.SINGLE_TURN:
            contents = _latest_turn(contents)
        return contents

    def _prepare_requester_text(self, text: str) -> str:
        replacements = self.get_replacement_when_input()
        return self.replace_string(text, replacements) if replacements is not None else text

    # ------------------------------------------------------------------ rendering helpers

    def replace_string(self, original_string: str, replace_list: Iterable[tuple[str, str]] | None) -> str:
        """Apply each ``(old, new)`` pair of ``replace_list`` in order."""
        if replace_list is None:
            return original_string
        for old, new in replace_list:
            original_string = original_string.replace(old, new)
        return original_string

    def format_system_message(self, text: str) -> str:
        """Turn a plain system instruction (e.g. an OpenAI ``system`` message) into this model's ``system`` text.

        The default puts the text on a line of its own; presets whose format wraps the system text override this.
        """
        if not text or text[-1].isspace():
            return text
        return text + "\n"

    def get_skip_len(self, omit_last_message: bool = False) -> int:
        """The length of the rendered prompt without special tokens (the seed cut this much off decoded output)."""
        prompt = self.create_prompt({"omit_last_message": omit_last_message})
        for token in self.special_tokens or ():
            prompt = prompt.replace(token, "")
        return self.get_custom_skip_echo_len(len(prompt))

    def get_custom_skip_echo_len(self, skip_echo_len: int) -> int:
        """Adjust :meth:`get_skip_len` for models whose decoded output does not echo the prompt exactly."""
        return skip_echo_len

    # ------------------------------------------------------------------ stop strings and replacements

    def get_stop_strs(self) -> list[str] | None:
        """Strings that end an answer (never sent to the client). Override to return e.g. ``["\\n<"]``."""
        return None

    def _get_final_stop_strs(self) -> list[str]:
        """The requester prefix (when enabled) followed by :meth:`get_stop_strs`, without duplicates."""
        stop_strs: list[str] = []
        if self.prefix_as_stop_str_enabled and self.responder_prefix_as_stop_str:
            stop_strs.append(self.responder_prefix_as_stop_str)
        for stop_str in self.get_stop_strs() or ():
            if stop_str and stop_str not in stop_strs:
                stop_strs.append(stop_str)
        self.final_stop_strs = stop_strs
        return stop_strs

    def get_final_stop_strs(self) -> list[str]:
        """The stop strings for the next generation: none when chat mode is off, else :meth:`_get_final_stop_strs`."""
        if not self.chat_mode:
            return []
        return self._get_final_stop_strs()

    def get_replacement_when_input(self) -> Replacements | None:
        """``(old, new)`` pairs applied to the user's messages as they are added (e.g. newline → ``<NL>``)."""
        return None

    def get_replacement_when_output(self) -> Replacements | None:
        """``(old, new)`` pairs applied to the model's streamed output (e.g. ``<NL>`` → newline)."""
        return None

    # ------------------------------------------------------------------ subclass contract

    @abstractmethod
    def create_prompt(self, opts: OptsArg = None) -> str:
        """Render the history (see :meth:`get_contents` for ``opts``) as this model's prompt text.

        When chat mode is off, return the user's last message alone. An empty responder slot at the end must render
        as the generation prefix.
        """

    @abstractmethod
    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """Fill a new conversation with opening messages (a few-shot example); most presets do nothing."""

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the conversation and its settings (the seed's keys plus a few of ours)."""
        return {
            "system": self.system,
            "chat_contents": [content.to_dict() for content in self.chat_contents],
            "responder_messages": [content.to_dict() for content in self.responder_messages],
            "requester_messages": [content.to_dict() for content in self.requester_messages],
            "requester": self.requester,
            "responder": self.responder,
            "chat_mode": self.chat_mode,
            "prompt_ttl": self.prompt_ttl_mode.name,
            "prefix_as_stop_str_enabled": self.prefix_as_stop_str_enabled,
            "responder_prefix_as_stop_str": self.responder_prefix_as_stop_str,
            "prompt_class": f"{type(self).__module__}.{type(self).__qualname__}",
        }

    @classmethod
    def from_dict(cls: type[PromptT], data: Mapping[str, Any], tokenizer: Any = None) -> PromptT:
        """Rebuild a prompt saved by :meth:`to_dict` (also the seed's dicts).

        ``requester_messages`` / ``responder_messages`` are rebuilt from ``chat_contents`` so that they hold the same
        objects. The tokenizer is not part of the dict: pass it here or call :meth:`set_tokenizer`.
        """
        chat_prompt = cls()
        chat_prompt.system = data.get("system", chat_prompt.system)
        chat_prompt.requester = data.get("requester", chat_prompt.requester)
        chat_prompt.responder = data.get("responder", chat_prompt.responder)
        chat_prompt.chat_mode = data.get("chat_mode", chat_prompt.chat_mode)
        if "prompt_ttl" in data:
            chat_prompt.prompt_ttl_mode = PromptTTL[data["prompt_ttl"]]
        if "prefix_as_stop_str_enabled" in data:
            chat_prompt.prefix_as_stop_str_enabled = bool(data["prefix_as_stop_str_enabled"])
            chat_prompt.responder_prefix_as_stop_str = data.get("responder_prefix_as_stop_str")
        chat_prompt.clear_history()
        for content_data in data.get("chat_contents", ()):
            chat_prompt._append_content(ChatContent.from_dict(content_data))
        if tokenizer is not None:
            chat_prompt.set_tokenizer(tokenizer)
        return chat_prompt


def _special_token_strings(tokenizer: Any) -> list[str]:
    """Every special token string of the tokenizer (its ``special_tokens_map`` values, lists flattened)."""
    token_map = getattr(tokenizer, "special_tokens_map", None) or {}
    strings: list[str] = []
    for value in token_map.values():
        values = value if isinstance(value, list | tuple) else [value]
        strings.extend(str(v) for v in values if v)
    return strings


def _empty_copy(content: ChatContent) -> ChatContent:
    return ChatContent(
        role=content.get_role(),
        msg=None,
        msg_id=content.get_message_id(),
        role_type=content.get_role_type(),
        child_msgs=content.get_child_messages(),
    )


def _latest_turn(contents: list[ChatContent]) -> list[ChatContent]:
    for index in range(len(contents) - 1, -1, -1):
        if contents[index].get_role_type() is RoleType.REQUESTER:
            return contents[index:]
    return contents
