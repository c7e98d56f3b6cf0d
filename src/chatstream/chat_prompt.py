"""The original package's module path for prompt classes, kept so that ``from chatstream.chat_prompt import ...``
in existing prompt classes keeps working. New code imports from :mod:`chatstream.prompts`."""

from chatstream.prompts.base import AbstractChatPrompt
from chatstream.prompts.content import ChatContent, PromptTTL, RoleType

__all__ = ["AbstractChatPrompt", "ChatContent", "PromptTTL", "RoleType"]
