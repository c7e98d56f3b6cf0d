"""Prompt classes: a conversation's history and the rules that render it as one model's prompt text."""

from chatstream.prompts.base import AbstractChatPrompt
from chatstream.prompts.chat_template import ChatTemplatePrompt
from chatstream.prompts.content import ChatContent, PromptOptions, PromptTTL, RoleType
from chatstream.prompts.openai_messages import load_openai_messages
from chatstream.prompts.presets import (
    ChatPromptCyberAgentOpenCalm,
    ChatPromptDatabricksDolly,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptMosaicmlMptChat,
    ChatPromptOpenlmrOpenLlama,
    ChatPromptPlainUserAssistant,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptRinnaJpGptNeoxInstSft,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptStockmarkGptNeoxJp,
    ChatPromptTogetherRedPajamaINCITEChat,
    ChatPromptUserAssistant,
)

__all__ = [
    "AbstractChatPrompt",
    "ChatContent",
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
    "PromptOptions",
    "PromptTTL",
    "RoleType",
    "load_openai_messages",
]
