"""ChatStream: a streaming chat service for Hugging Face causal language models.

The names the original package exported keep working (``ChatStream``, ``AbstractChatPrompt``,
``AbstractRequestHandler``, ``SimpleSessionRequestHandler``, ``LoadTime`` and the prompt presets); the rest are ours.
"""

from chatstream.chat_stream import ChatStream
from chatstream.config import AdmissionConfig, EngineConfig, MockConfig, SamplingParams
from chatstream.engine.base import Delta, FinishReason, GenerationRequest
from chatstream.loadtime_compat import LoadTime
from chatstream.prompts.base import AbstractChatPrompt
from chatstream.prompts.chat_template import ChatTemplatePrompt
from chatstream.prompts.content import ChatContent, PromptTTL, RoleType
from chatstream.prompts.presets import (
    ChatPromptDatabricksDolly,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptMosaicmlMptChat,
    ChatPromptOpenlmrOpenLlama,
    ChatPromptPlainUserAssistant,
    ChatPromptTogetherRedPajamaINCITEChat,
)
from chatstream.prompts.presets_ja import (
    ChatPromptCyberAgentOpenCalm,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptRinnaJapaneseGPTNeoxInst,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptStockmarkGptNeoxJp,
)
from chatstream.sessions.handler import AbstractRequestHandler, SimpleSessionRequestHandler

ChatPromptRinnaJpGptNeoxInstSft = ChatPromptRinnaJapaneseGPTNeoxInst
"""The original package's name for the Rinna preset."""

__all__ = [
    "AbstractChatPrompt",
    "AbstractRequestHandler",
    "AdmissionConfig",
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
    "ChatStream",
    "ChatTemplatePrompt",
    "Delta",
    "EngineConfig",
    "FinishReason",
    "GenerationRequest",
    "LoadTime",
    "MockConfig",
    "PromptTTL",
    "RoleType",
    "SamplingParams",
    "SimpleSessionRequestHandler",
]
