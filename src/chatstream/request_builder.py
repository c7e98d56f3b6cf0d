"""RequestBuilder: the engine's ``GenerationRequest`` for a chat history, a raw prompt or a rendered prompt.

One per :class:`~chatstream.service.ChatService` (its ``requests``). It puts the service's default sampling under a
conversation's own values, takes the stop strings and output replacements of the prompt class, fits the prompt into
the model's context (``prompts/window.py``), and checks that the engine can sample as asked
(:class:`UnsupportedSampling`: the protocols answer 400 naming the field).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import TYPE_CHECKING, Any

from chatstream.config import SamplingOverrides, SamplingParams, ServiceConfig
from chatstream.engine.base import Engine, GenerationRequest, SamplingChecker, takes_messages_only, wants_chat_context
from chatstream.engine.mock_engine import MockRequest
from chatstream.prompts.openai_messages import role_messages
from chatstream.prompts.window import ContextWindow

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt


class UnsupportedSampling(ValueError):
    """The engine cannot sample as asked (e.g. vLLM and the subtractive repetition penalty); the protocols answer 400.

    Attributes:
        field: the sampling parameter at fault (``top_k``, ``repetition_penalty_method`` ...).
    """

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedByEngine(UnsupportedSampling):
    """The engine cannot take the request in this form (``field`` names what needs another engine); a 400."""


class RequestBuilder:
    """Builds the engine requests of one service.

    Args:
        config: the service's config (default sampling, ``add_special_tokens``, ``context_len``).
        engine: the engine the requests are for (what it can sample, whether it wants the chat context).
        tokenizer: counts prompt tokens to fit prompts into ``config.context_len`` (None: prompts are not fitted).
        logger: where a conversation shortened to fit the context is reported.
    """

    def __init__(self, config: ServiceConfig, engine: Engine, tokenizer: Any, logger: logging.Logger) -> None:
        self.config = config
        self.engine = engine
        self.logger = logger
        self.context_window: ContextWindow | None = None
        """Set when prompts are fitted into the model's context (``config.context_len`` and a tokenizer)."""
        if config.context_len is not None and tokenizer is not None:
            self.context_window = ContextWindow(config.context_len, tokenizer, config.add_special_tokens)

    def sampling_for(self, overrides: SamplingOverrides | None) -> SamplingParams:
        """The default sampling with a conversation's own values over it."""
        return overrides.apply(self.config.sampling) if overrides is not None else self.config.sampling

    def build_request(
        self,
        chat_prompt: AbstractChatPrompt,
        overrides: SamplingOverrides | None = None,
        conversation_id: str | None = None,
    ) -> GenerationRequest:
        """The engine request for the pending answer of ``chat_prompt`` (prompt text, stops, replacements).

        When the conversation no longer fits the context, its oldest whole turns are left out of the prompt (the
        system text and the latest turn stay; see ``prompts/window.py``); the history itself is not changed.
        """
        stops = tuple(chat_prompt._get_final_stop_strs() or ()) if chat_prompt.is_chat_mode_enabled() else ()
        sampling = self.sampling_for(overrides).with_updates(stop=stops)
        add_special_tokens = self._add_special_tokens_for(chat_prompt)
        request = GenerationRequest(
            request_id=f"chat-{uuid.uuid4().hex}",
            prompt=self._prompt_within_context(chat_prompt, sampling.max_new_tokens, add_special_tokens),
            sampling=sampling,
            output_replacements=tuple(chat_prompt.get_replacement_when_output() or ()),
            conversation_id=conversation_id,
            add_special_tokens=add_special_tokens,
            messages=role_messages(chat_prompt),
        )
        return self._for_engine(request, chat_prompt.get_requester_last_msg(), chat_prompt.get_turn())

    async def prepare_request(
        self,
        chat_prompt: AbstractChatPrompt,
        overrides: SamplingOverrides | None = None,
        conversation_id: str | None = None,
    ) -> GenerationRequest:
        """:meth:`build_request` off the event loop when it may tokenize (a long history measured against the
        context)."""
        if self.context_window is not None:
            return await asyncio.to_thread(self.build_request, chat_prompt, overrides, conversation_id)
        return self.build_request(chat_prompt, overrides, conversation_id)

    def build_text_request(self, request_id: str, prompt: str, sampling: SamplingParams) -> GenerationRequest:
        """The engine request for a raw prompt (no chat formatting, no conversation; an engine that takes messages
        only gets it as one user message)."""
        request = GenerationRequest(
            request_id=request_id, prompt=prompt, sampling=sampling, messages=(("user", prompt),)
        )
        return self._for_engine(request, prompt)

    def build_rendered_request(
        self, prompt: str, *, user_input: str | None, conversation_id: str | None = None
    ) -> GenerationRequest:
        """The engine request for a prompt already rendered by the chat template (tools, tool results): default
        sampling, no stop strings of a prompt class, encoded without adding special tokens unless configured.
        Raises UnsupportedByEngine (``tools``) for an engine that takes messages only (an upstream in chat mode)."""
        if takes_messages_only(self.engine):
            raise UnsupportedByEngine(
                "'tools' and tool messages need the model's chat template, which this server renders only for an "
                "engine that takes a prompt: the upstream is in chat mode (run it with --upstream-api completions)",
                "tools",
            )
        special = self.config.add_special_tokens if self.config.add_special_tokens is not None else False
        request = GenerationRequest(
            request_id=f"chat-{uuid.uuid4().hex}",
            prompt=prompt,
            sampling=self.config.sampling,
            conversation_id=conversation_id,
            add_special_tokens=special,
        )
        return self._for_engine(request, user_input)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise :class:`UnsupportedSampling` when the engine cannot sample as asked (a 400 naming the field)."""
        if not isinstance(self.engine, SamplingChecker):
            return
        try:
            self.engine.check_sampling(sampling)
        except ValueError as exc:
            name = str(exc).split("=", 1)[0]
            raise UnsupportedSampling(str(exc), name if name.isidentifier() else None) from None

    async def check_context(self, request: GenerationRequest, max_tokens_given: bool) -> GenerationRequest:
        """``request`` if its prompt and ``max_new_tokens`` fit the context. When they do not: raise
        ContextLengthExceeded if the client asked for that many new tokens (or the prompt alone fills the
        context), else lower ``max_new_tokens`` to what fits (as vLLM does)."""
        window, max_new = self.context_window, request.sampling.max_new_tokens
        if window is None or not window.needs_counting(request.prompt, max_new):
            return request
        fitted = await asyncio.to_thread(
            window.max_new_tokens_for, request.prompt, max_new, max_tokens_given, request.add_special_tokens
        )
        if fitted == max_new:
            return request
        return dataclasses.replace(request, sampling=request.sampling.with_updates(max_new_tokens=fitted))

    def _prompt_within_context(
        self, chat_prompt: AbstractChatPrompt, max_new_tokens: int, add_special_tokens: bool | None
    ) -> str:
        if self.context_window is None:
            return chat_prompt.create_prompt()
        text, dropped = self.context_window.chat_prompt_text(chat_prompt, max_new_tokens, add_special_tokens)
        if dropped:
            self.logger.info("conversation longer than the context: %d oldest turns left out of the prompt", dropped)
        return text

    def _add_special_tokens_for(self, chat_prompt: AbstractChatPrompt) -> bool | None:
        # The configured add_special_tokens wins; otherwise a prompt class whose text already holds the special
        # tokens (a chat template starts with BOS) says not to add them again.
        if self.config.add_special_tokens is not None:
            return self.config.add_special_tokens
        return None if getattr(chat_prompt, "encode_add_special_tokens", True) else False

    def _for_engine(self, request: GenerationRequest, user_input: str | None, turn: int = 0) -> GenerationRequest:
        self.check_sampling(request.sampling)
        # The mock answers from the user's input and the turn number, which only its own request type carries; the
        # engine says whether it wants them (a pool or a Ray client forwards what its members say).
        if not wants_chat_context(self.engine):
            return request
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        return MockRequest(**fields, user_input=user_input, turn=turn)
