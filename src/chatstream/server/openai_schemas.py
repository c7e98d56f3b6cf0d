"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic (strict types, OpenAI's ranges).

Unknown fields are ignored (clients send many optional ones); fields we cannot honour with a value other than their
default (``functions``, ``echo``, ``suffix``, ``best_of`` ...) are rejected by :func:`check_unsupported` with a 400
that names them, instead of being silently ignored. ``tools``, ``tool_choice`` and ``response_format`` are checked
where the request is built (server/openai_chat.py), against the model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatstream.config import SamplingParams
from chatstream.server.errors import BadRequest

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16
"""The most choices (``n``) one request may ask for."""
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_STOP_TOKEN_IDS = 64


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token usage."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None
    """An extension (as in vLLM): keep generating past EOS, up to the token limit. For benchmarks."""
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    """An extension (as in vLLM): token ids that end the answer, besides EOS."""
    add_special_tokens: bool | None = None
    """An extension (as in vLLM): whether the tokenizer adds its special tokens (BOS) to the prompt; default: the
    prompt format's own choice (a chat template's text already holds them)."""
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(token_id < 0 for token_id in value):
            raise ValueError("token ids must be >= 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def new_token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, defaults: SamplingParams, *, default_max_tokens: int | None = None) -> SamplingParams:
        """``defaults`` with this request's values over them (stop strings are added to the defaults' stops)."""
        changes: dict[str, Any] = {}
        limit = self.new_token_limit()
        if limit is not None:
            changes["max_new_tokens"] = limit
        elif default_max_tokens is not None:
            changes["max_new_tokens"] = default_max_tokens
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "seed", "ignore_eos"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        if self.top_k is not None:
            changes["top_k"] = None if self.top_k <= 0 else self.top_k
        if self.repetition_penalty is not None:
            changes["repetition_penalty"] = self.repetition_penalty
        if self.stop:
            changes["stop"] = tuple(dict.fromkeys([*defaults.stop, *self.stop]))
        if self.stop_token_ids:
            changes["stop_token_ids"] = tuple(dict.fromkeys([*defaults.stop_token_ids, *self.stop_token_ids]))
        return defaults.with_updates(**changes)


class ToolCallFunction(BaseModel):
    """``function`` of an assistant's tool call: the name and the arguments as JSON text."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str = "{}"


class AssistantToolCall(BaseModel):
    """One call in an assistant message's ``tool_calls``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of text parts (checked when the prompt is built). Assistant
    messages may carry ``tool_calls``, ``tool`` messages answer one with ``tool_call_id``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token for the engine (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def has_tool_traffic(self) -> bool:
        """The history holds tool calls or tool results."""
        return any(m.role == "tool" or m.tool_calls for m in self.messages)

    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationFields):
    """POST /v1/completions (a raw prompt, no chat formatting)."""

    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported (a string or a list of one string)")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def check_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Raise BadRequest naming the first field set to a value this server cannot honour."""
    if isinstance(body, ChatCompletionRequest):
        if body.functions or body.function_call is not None:
            raise BadRequest("'functions' and 'function_call' are deprecated: use 'tools'", param="functions")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return
    if body.echo:
        raise BadRequest("'echo' is not supported", param="echo")
    if body.suffix:
        raise BadRequest("'suffix' is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise BadRequest("'best_of' must be 1", param="best_of")
