"""Ready-made prompt classes for Japanese models (the original ChatStream's presets)."""

from __future__ import annotations

from chatstream.prompts.base import AbstractChatPrompt, OptsArg, Replacements
from chatstream.prompts.content import ChatContent, PromptTTL
from chatstream.prompts.render import render_concatenated, render_role_turns

__all__ = [
    "ChatPromptCyberAgentOpenCalm",
    "ChatPromptLineCorpJpLargeLmInstSft",
    "ChatPromptMatsuoLabJpGptNeoxInstSft",
    "ChatPromptRinnaJapaneseGPTNeoxInst",
    "ChatPromptRinnaJpGptNeoxInstSft",
    "ChatPromptStabilityAiJpGptNeoxInstSft",
    "ChatPromptStockmarkGptNeoxJp",
]

INSTRUCTION_SYSTEM_JA = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
)


class _NoInitialPrompt(AbstractChatPrompt):
    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """No opening messages."""


class ChatPromptRinnaJapaneseGPTNeoxInst(_NoInitialPrompt):
    """rinna/japanese-gpt-neox-3.6b-instruction-sft: ``"ユーザー: 質問<NL>システム: 答え<NL>"``.

    The model writes line breaks as ``<NL>``: user input gets newline → ``<NL>`` when added, the streamed output
    ``<NL>`` → newline, and earlier answers (stored with newlines) are written back with ``<NL>`` in the prompt.
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("ユーザー")
        self.set_responder("システム")

    def get_stop_strs(self) -> list[str] | None:
        if not self.chat_mode:
            return None
        return []

    def get_replacement_when_input(self) -> Replacements | None:
        return [("\n", "<NL>")]

    def get_replacement_when_output(self) -> Replacements | None:
        return [("<NL>", "\n")]

    def format_system_message(self, text: str) -> str:
        return text.replace("\n", "<NL>") + "<NL>" if text else text

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        turns = render_role_turns(
            self.get_contents(opts), line_end="<NL>", slot=": ", replacements=self.get_replacement_when_input() or ()
        )
        return self.system + turns


ChatPromptRinnaJpGptNeoxInstSft = ChatPromptRinnaJapaneseGPTNeoxInst
"""The original ChatStream's name for :class:`ChatPromptRinnaJapaneseGPTNeoxInst`."""


class ChatPromptLineCorpJpLargeLmInstSft(_NoInitialPrompt):
    """line-corporation/japanese-large-lm-3.6b-instruction-sft: ``"ユーザー: 質問\\nシステム: "``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("ユーザー")
        self.set_responder("システム")
        self.set_prefix_as_stop_str_enabled(True)
        self.set_prompt_ttl(PromptTTL.MULTI_TURN)

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        return self.system + render_role_turns(self.get_contents(opts), line_end="\n", slot=": ")


def _render_instruction_sections(contents: list[ChatContent]) -> str:
    """``### 指示: \\n...\\n\\n`` sections, child messages as a ``### 入力: `` section; the slot is ``### 応答: ``."""
    parts: list[str] = []
    for content in contents:
        role, message = content.get_role(), content.get_message()
        if not role:
            continue
        if not message:
            parts.append(f"### {role}: ")
            continue
        parts.append(f"### {role}: \n{message}\n\n")
        if content.has_child_messages():
            parts.append("### 入力: \n" + "".join(f"{child}\n\n" for child in content.get_child_messages() or ()))
    return "".join(parts)


class ChatPromptStabilityAiJpGptNeoxInstSft(_NoInitialPrompt):
    """stabilityai/japanese-stablelm-instruct: an instruction / input / response format, multi-turn."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(INSTRUCTION_SYSTEM_JA)
        self.set_requester("指示")
        self.set_responder("応答")
        self.set_prefix_as_stop_str_enabled(True)
        self.set_prompt_ttl(PromptTTL.MULTI_TURN)

    def format_system_message(self, text: str) -> str:
        return text.strip()

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        return self.system + "\n\n" + _render_instruction_sections(self.get_contents(opts))


class ChatPromptMatsuoLabJpGptNeoxInstSft(ChatPromptStabilityAiJpGptNeoxInstSft):
    """matsuo-lab/weblab-10b-instruction-sft: the same format, single-turn, also stopping at ``"Q:"``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_prompt_ttl(PromptTTL.SINGLE_TURN)

    def get_stop_strs(self) -> list[str] | None:
        if not self.chat_mode:
            return None
        return ["Q:"]


class ChatPromptCyberAgentOpenCalm(_NoInitialPrompt):
    """cyberagent/open-calm (a base model): plain text continuation, the messages joined with nothing between."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("")
        self.set_responder("")

    def create_prompt(self, opts: OptsArg = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        return self.system + render_concatenated(self.get_contents(opts))


class ChatPromptStockmarkGptNeoxJp(ChatPromptCyberAgentOpenCalm):
    """stockmark/gpt-neox-japanese-1.4b (a base model): plain text continuation."""

    def get_stop_strs(self) -> list[str] | None:
        if not self.chat_mode:
            return None
        return []
