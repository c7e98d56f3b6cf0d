"""Ready-made prompt classes for English chat models, and the preset of the embedded default model.

Every preset renders an empty responder slot (``add_responder_msg(None)``) as the generation prefix. The Japanese
presets live in :mod:`chatstream.prompts.presets_ja` and the tokenizer-driven one in
:mod:`chatstream.prompts.chat_template`; all are re-exported here.
"""

from __future__ import annotations

from chatstream.prompts.base import AbstractChatPrompt, OptsArg
from chatstream.prompts.chat_template import ChatTemplatePrompt
from chatstream.prompts.content import PromptTTL, RoleType
from chatstream.prompts.presets_ja import (
    ChatPromptCyberAgentOpenCalm,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptRinnaJpGptNeoxInstSft,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptStockmarkGptNeoxJp,
)
from chatstream.prompts.render import render_role_turns

__all__ = [
    "ChatPromptCyberAgentOpenCalm",
    "ChatPromptDatabricksDolly",
    "ChatPromptLineCorpJpLargeLmInstSft",
    "ChatPromptMatsuoLabJpGptNeoxInstSft",
    "ChatPromptMetaLlamaLlama2Chat",
    "ChatPromptMosaicmlMptChat",
    "ChatPromptOpenlmrOpenLlama",
    "ChatPromptPlainUserAssistant",
    "ChatPromptRinnaJapaneseGPTNeoxInst",
    "ChatPromptRinnaJpGptNeoxInstSft",
    "ChatPromptStabilityAiJpGptNeoxInstSft",
    "ChatPromptStockmarkGptNeoxJp",
    "ChatPromptTogetherRedPajamaINCITEChat",
    "ChatPromptUserAssistant",
    "ChatTemplatePrompt",
]


class _RoleTurnsPrompt(AbstractChatPrompt):
    """``system`` followed by ``"role: message\\n"`` lines; the empty slot renders as ``"role:"``."""

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        return self.system + render_role_turns(self.get_contents(opts), line_end="\n", slot=":")

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """No opening messages."""


class ChatPromptTogetherRedPajamaINCITEChat(_RoleTurnsPrompt):
    """togethercomputer/RedPajama-INCITE-Chat: ``"<human>: question\\n<bot>: answer\\n"``.

    Stops at ``"<human>:"`` (the requester prefix), ``"<|endoftext|>"`` and ``"\\n<"`` (the start of any role tag on
    a new line).
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")
        self.set_prefix_as_stop_str_enabled(True)

    def get_stop_strs(self) -> list[str] | None:
        return ["<|endoftext|>", "\n<"]


class ChatPromptMosaicmlMptChat(_RoleTurnsPrompt):
    """The seed's preset for mosaicml/mpt chat models: the ``<human>`` / ``<bot>`` format, stopping at ``<human>:``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")
        self.set_prefix_as_stop_str_enabled(True)


class ChatPromptOpenlmrOpenLlama(_RoleTurnsPrompt):
    """openlm-research/open_llama (a base model) as Q&A: ``"Q: question\\nA: answer\\n"``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("Q")
        self.set_responder("A")

    def get_stop_strs(self) -> list[str] | None:
        if not self.chat_mode:
            return None
        return ["\nQ:", "\nB:", "\nC:"]


DEFAULT_USER_ASSISTANT_SYSTEM = "A conversation between a User and a helpful, friendly Assistant."


class ChatPromptPlainUserAssistant(_RoleTurnsPrompt):
    """A plain ``"User: ...\\nAssistant: ..."`` transcript for base models without a chat template.

    This is the preset of the embedded default model (Gemma-3-270M, base). A base model continues the transcript
    after its answer, so the usual stop strings are the start of the next user turn (``"\\nUser:"``, also without the
    colon after a blank line), a second assistant turn, and Gemma's end tokens (``<eos>``, ``<end_of_turn>``) in
    case they are decoded as text.
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_system(DEFAULT_USER_ASSISTANT_SYSTEM)
        self.set_requester("User")
        self.set_responder("Assistant")

    def format_system_message(self, text: str) -> str:
        return text.strip()

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        head = f"{self.system}\n\n" if self.system else ""
        return head + render_role_turns(self.get_contents(opts), line_end="\n", slot=":")

    def get_stop_strs(self) -> list[str] | None:
        return ["\nUser:", "\n\nUser", "\nAssistant:", "<eos>", "<end_of_turn>"]


ChatPromptUserAssistant = ChatPromptPlainUserAssistant
"""Another name for :class:`ChatPromptPlainUserAssistant`."""


LLAMA2_DEFAULT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)


class ChatPromptMetaLlamaLlama2Chat(AbstractChatPrompt):
    """meta-llama/Llama-2-chat.

    ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nquestion [/INST] answer </s><s>[INST] question [/INST] ``
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_system(self.format_system_message(LLAMA2_DEFAULT_SYSTEM))
        self.set_requester("")
        self.set_responder("")

    def format_system_message(self, text: str) -> str:
        return f"<s>[INST] <<SYS>>\n{text}\n<</SYS>>\n\n"

    def get_stop_strs(self) -> list[str] | None:
        if not self.chat_mode:
            return None
        return []

    def get_custom_skip_echo_len(self, skip_echo_len: int) -> int:
        # Llama-2's tokenizer decodes each "</s><s>[INST]" boundary one character longer than it was written.
        turns = self.get_turn()
        return skip_echo_len + turns if turns >= 2 else skip_echo_len

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        parts = [self.system]
        for content in self.get_contents(opts):
            message = content.get_message()
            if not message:
                continue
            if content.get_role_type() is RoleType.REQUESTER:
                parts.append(f"{message} [/INST] ")
            elif content.get_role_type() is RoleType.RESPONDER:
                parts.append(f"{message} </s><s>[INST] ")
        return "".join(parts)

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """No opening messages."""


class ChatPromptDatabricksDolly(AbstractChatPrompt):
    """databricks/dolly-v2: ``system\\n\\n### Instruction:\\nquestion\\n\\n### Response:\\n``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        )
        self.set_requester("Instruction")
        self.set_responder("Response")
        self.set_prefix_as_stop_str_enabled(True)
        self.set_prompt_ttl(PromptTTL.MULTI_TURN)

    def format_system_message(self, text: str) -> str:
        return text.strip()

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        parts = [self.system + "\n\n"]
        for content in self.get_contents(opts):
            role, message = content.get_role(), content.get_message()
            if not role:
                continue
            parts.append(f"### {role}:\n" + (f"{message}\n\n" if message else ""))
        return "".join(parts)

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """No opening messages."""
