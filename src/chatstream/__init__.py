"""ChatStream: a streaming chat service for Hugging Face causal language models.

The names the original package exported keep working (``ChatStream``, ``AbstractChatPrompt``,
``AbstractRequestHandler``, ``SimpleSessionRequestHandler``, ``LoadTime`` and the prompt presets); the rest are ours.
"""

from chatstream import prompts
from chatstream.chat_stream import ChatStream
from chatstream.chat_stream_pool import ChatStreamPool
from chatstream.config import AdmissionConfig, EngineConfig, MockConfig, SamplingParams
from chatstream.engine.base import Delta, FinishReason, GenerationRequest
from chatstream.models.loadtime import LoadTime
from chatstream.prompts import *  # noqa: F403  (every prompt class and preset, as the original exported them)
from chatstream.service import ChatService
from chatstream.sessions.handler import AbstractRequestHandler, SimpleSessionRequestHandler

__all__ = [
    "AbstractRequestHandler",
    "AdmissionConfig",
    "ChatService",
    "ChatStream",
    "ChatStreamPool",
    "Delta",
    "EngineConfig",
    "FinishReason",
    "GenerationRequest",
    "LoadTime",
    "MockConfig",
    "SamplingParams",
    "SimpleSessionRequestHandler",
    *prompts.__all__,
]
