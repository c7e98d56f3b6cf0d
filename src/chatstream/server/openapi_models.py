"""The shapes of ChatStream's request and response bodies, as pydantic models for /openapi.json.

The endpoints keep parsing their bodies themselves (each protocol answers bad input in its own error shape); these
models only describe the bodies, so that /docs is a usable reference and a fuzzer generates useful requests. OpenAI
request bodies are the validating models of ``openai_schemas.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ----- native requests -----


class ChatStreamRequest(BaseModel):
    """POST /chat_stream: the user's next message, or ``regenerate`` to answer the last one again."""

    model_config = ConfigDict(title="ChatStreamRequest")

    user_input: str | None = Field(None, description="The message (required unless regenerate is true).")
    regenerate: bool = Field(False, description="Discard the last answer and generate it again.")


class EmptyRequest(BaseModel):
    """A POST that takes no body (/clear_context, /conversations/{id}/open): no fields (a body, if any, is ignored)."""


class GenerationParams(BaseModel):
    """A conversation's own sampling values (the original's names)."""

    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_k_value: int | None = Field(None, ge=1, le=500)
    top_p_value: float | None = Field(None, ge=0.0, le=1.0)


class FeedbackRequest(BaseModel):
    """POST /set_feedback: a like or dislike of one answer, with optional form data."""

    message_id: str = Field(
        min_length=1, description="The answer's id (header X-ChatStream-Last-Generated-Message-Id)."
    )
    is_like: bool = False
    form_data: Any = Field("", description="Anything the client wants to pass to on_feedback_received.")


# ----- native responses -----


class NativeError(BaseModel):
    """An error of /chat_stream (the original's shape); also its 200 ``too_many_requests`` rejection."""

    error: Literal[
        "bad_request", "too_many_requests", "payload_too_large", "service_unavailable", "internal_server_error"
    ]
    detail: str | None = None


class ApiResult(BaseModel):
    """The original's result shape of the session APIs (``success`` false with a message on failure)."""

    success: bool
    message: str


class RoleDenied(BaseModel):
    """403 from the client-role layer (the original's shape)."""

    success: Literal[False]
    message: Literal["Forbidden"]
    detail: str


class PromptResult(ApiResult):
    """GET /get_prompt: the rendered prompt, URL-encoded (null when the conversation is empty)."""

    prompt: str | None = None


class GenerationParamsResult(ApiResult):
    """The session's sampling values over the defaults (null without a session)."""

    generation_params: GenerationParams | None = None


class FeedbackResult(ApiResult):
    """POST /set_feedback."""

    target_message_id: str | None = None


class Worker(BaseModel):
    """One instance's load."""

    name: str
    processing: int
    waiting: int
    max_processing: int
    max_waiting: int


class LoadResult(ApiResult):
    """GET /get_load."""

    chatstream_workers: list[Worker]


class GpuMemory(BaseModel):
    index: int
    total_memory: float = Field(description="GiB")
    used_memory: float = Field(description="GiB")


class CpuMemory(BaseModel):
    total_memory: float = Field(description="GiB of the machine")
    used_memory: float = Field(description="GiB resident in this process")


class MemoryUsage(BaseModel):
    name: str
    num_gpus: int | None
    gpus: list[GpuMemory]
    cpu: CpuMemory


class ResourceUsageResult(ApiResult):
    """GET /get_resource_usage."""

    memory_usage: list[MemoryUsage]


class Health(BaseModel):
    """GET /health (503 while starting or draining)."""

    status: Literal["ok", "starting", "draining"]


class QueuePosition(ApiResult):
    """GET /chat_stream/queue_position: where a waiting /chat_stream request stands (docs/api.md)."""

    waiting: bool
    position: int | None = Field(description="1: served next; null once it runs, or for an unknown ticket.")
    ahead: int | None = Field(description="Requests ahead of it (position - 1).")


# ----- OpenAI responses -----


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The OpenAI error shape (every error of the /v1 endpoints)."""

    error: OpenAIErrorDetail


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    """A whole chat answer (``stream`` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat answer (``data: <chunk>``); the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    """A text completion (also each SSE event when streamed, with partial ``text``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[Model]
