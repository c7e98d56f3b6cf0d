"""ChatTemplatePrompt: the prompt format comes from the tokenizer's own ``chat_template``."""

from __future__ import annotations

import logging
from typing import Any

try:
    from jinja2 import TemplateError
except ImportError:  # pragma: no cover - jinja2 comes with torch, and apply_chat_template needs it anyway
    TemplateError = RuntimeError  # type: ignore[misc,assignment]

from chatstream.prompts.base import AbstractChatPrompt, OptsArg
from chatstream.prompts.content import ChatContent, RoleType

logger = logging.getLogger(__name__)

__all__ = ["ChatTemplatePrompt"]

_ROLE_NAMES = {RoleType.REQUESTER: "user", RoleType.RESPONDER: "assistant"}


class ChatTemplatePrompt(AbstractChatPrompt):
    """Renders the history with ``tokenizer.apply_chat_template`` (any instruction-tuned model on the Hub).

    The tokenizer is attached with :meth:`set_tokenizer` (or the constructor) and is never serialised: after
    :meth:`from_dict`, attach it again. The system text is sent as a ``system`` message; templates that reject the
    system role get it prepended to the first user message instead. An empty responder slot at the end (or a
    history ending with the user's message) renders with ``add_generation_prompt=True``.

    The rendered text usually starts with the template's BOS token, so encode it without adding special tokens
    (:attr:`encode_add_special_tokens` is False). No stop strings are needed: the model ends its turn with EOS
    (or the template's end-of-turn token, which the engine should treat as EOS).
    """

    encode_add_special_tokens = False

    def __init__(self, tokenizer: Any = None) -> None:
        super().__init__()
        self.set_requester("user")
        self.set_responder("assistant")
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def format_system_message(self, text: str) -> str:
        return text

    def to_messages(self, opts: OptsArg = None) -> list[dict[str, str]]:
        """The history as OpenAI-style messages (system first when set); empty slots are left out."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for content in self.get_contents(opts):
            role = _ROLE_NAMES.get(content.get_role_type())
            message = content.get_message()
            if role is None or message is None:
                continue
            if content.has_child_messages():
                message = "\n\n".join([message, *(content.get_child_messages() or ())])
            messages.append({"role": role, "content": message})
        return messages

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        tokenizer = self._require_template()
        messages = self.to_messages(opts)
        add_generation_prompt = _wants_generation_prompt(self.get_contents(opts))
        try:
            return _render(tokenizer, messages, add_generation_prompt)
        except TemplateError as exc:
            if not (self.system and "system" in str(exc).lower()):
                raise
            logger.debug("chat template rejects the system role (%s); prepending it to the first user message", exc)
            return _render(tokenizer, _fold_system(messages), add_generation_prompt)

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """No opening messages."""

    def _require_template(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("ChatTemplatePrompt has no tokenizer; call set_tokenizer(tokenizer) first")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer {type(self.tokenizer).__name__} has no chat_template; "
                "use a preset prompt class (e.g. ChatPromptPlainUserAssistant) for this model"
            )
        return self.tokenizer


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _wants_generation_prompt(contents: list[ChatContent]) -> bool:
    """False only when the history ends with a complete answer."""
    if not contents:
        return True
    last = contents[-1]
    return not (last.get_role_type() is RoleType.RESPONDER and last.get_message() is not None)


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for message in rest:
        if message["role"] == "user":
            message["content"] = "\n\n".join([*system, message["content"]])
            break
    else:
        rest.insert(0, {"role": "user", "content": "\n\n".join(system)})
    return rest
