"""The shapes of the conversations REST API and of the Responses API, as pydantic models for /openapi.json.

As in ``openapi_models.py``, the endpoints parse and render their bodies themselves (server/conversations.py and
conversations_render.py; server/responses.py and responses_render.py); these models only describe them. The request
body of POST /v1/responses is the validating ``ResponsesRequest`` of ``responses_schemas.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, RootModel

# ----- the conversations API: requests -----

_TITLE = "At most 200 characters once its whitespace is collapsed; an empty title derives it from the first message."


class ConversationMetadata(BaseModel):
    """OpenAI's place for the title: ``{"metadata": {"title": "..."}}`` (``title`` wins when both are given)."""

    title: str | None = Field(None, description=_TITLE)


class ConversationCreateRequest(BaseModel):
    """POST /conversations: both fields optional (an empty body or none at all is fine)."""

    title: str | None = Field(None, description=_TITLE)
    metadata: ConversationMetadata | None = None
    make_current: bool = Field(True, description="Make it the conversation /chat_stream continues.")


class ConversationUpdateRequest(BaseModel):
    """POST /conversations/{id}: the new title, as ``title`` or ``metadata.title`` (one of them is required)."""

    title: str | None = Field(None, description=_TITLE)
    metadata: ConversationMetadata | None = None


# ----- the conversations API: responses -----


class ConversationObject(BaseModel):
    """One conversation without its messages (OpenAI's conversation object plus ChatStream's fields)."""

    id: str
    object: Literal["conversation"]
    created_at: int = Field(description="Unix seconds")
    updated_at: int = Field(description="Unix seconds")
    title: str
    message_count: int
    version: int = Field(description="Counts changes to the messages (renames leave it alone).")
    current: bool = Field(description="It is the session's current conversation (the one /chat_stream continues).")
    metadata: ConversationMetadata


class ConversationList(BaseModel):
    """GET /conversations: a page of the user's conversations, most recently updated first."""

    object: Literal["list"]
    data: list[ConversationObject]
    first_id: str | None
    last_id: str | None = Field(description="Pass it as `after` for the next page.")
    has_more: bool
    current_id: str | None = Field(description="The session's current conversation.")


class ItemContent(BaseModel):
    type: Literal["input_text", "output_text"] = Field(description="input_text for the user, else output_text.")
    text: str


class ItemFeedback(BaseModel):
    is_like: bool
    created_at: float = Field(description="Unix seconds")


class ConversationItem(BaseModel):
    """One message as an OpenAI message item; an answer that was never filled is ``incomplete``."""

    type: Literal["message"]
    id: str
    status: Literal["completed", "incomplete"]
    role: Literal["user", "assistant", "other"]
    content: list[ItemContent]
    created_at: float = Field(description="Unix seconds")
    feedback: ItemFeedback | None


class ConversationItemList(BaseModel):
    """GET /conversations/{id}/items: every message, oldest first."""

    object: Literal["list"]
    data: list[ConversationItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ConversationDeleted(BaseModel):
    """DELETE /conversations/{id}."""

    id: str
    object: Literal["conversation.deleted"]
    deleted: Literal[True]


class ExportedFeedback(BaseModel):
    is_like: bool
    form_data: Any = Field(description="What the feedback form sent.")
    created_at: float


class ExportedMessage(BaseModel):
    id: str
    role: Literal["user", "assistant", "other"]
    name: str = Field(description="The prompt format's role label.")
    text: str | None
    children: list[str] | None
    created_at: float
    feedback: ExportedFeedback | None
    generation_params: dict[str, Any] | None


class ConversationExport(BaseModel):
    """GET /conversations/{id}/export?format=json: the record (readable back with ``conversation_from_json``)."""

    object: Literal["chatstream.conversation"]
    schema_version: int
    id: str
    owner: str
    title: str
    created_at: float
    updated_at: float
    version: int
    message_count: int
    prompt_class: str = Field(description="A name only, never imported.")
    prompt_settings: dict[str, Any]
    messages: list[ExportedMessage]


# ----- the Responses API -----


class ResponseOutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class ResponseOutputMessage(BaseModel):
    """The answer's text."""

    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[ResponseOutputText]


class ResponseFunctionCall(BaseModel):
    """A call of one of the request's function tools."""

    type: Literal["function_call"]
    id: str
    call_id: str = Field(description="Answer it with a function_call_output input item of this call_id.")
    name: str
    arguments: str = Field(description="JSON text")
    status: Literal["in_progress", "completed"]


ResponseOutputItem = Annotated[ResponseOutputMessage | ResponseFunctionCall, Field(discriminator="type")]


class ResponseInputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the KV the chain's previous turn left.")


class ResponseOutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails
    total_tokens: int


class ResponseFailure(BaseModel):
    code: str
    message: str


class ResponseIncompleteDetails(BaseModel):
    reason: str = Field(description="max_output_tokens")


class ResponseObject(BaseModel):
    """A response: its status, output items and usage, and the request's settings echoed."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[ResponseOutputItem]
    usage: ResponseUsage | None
    error: ResponseFailure | None
    incomplete_details: ResponseIncompleteDetails | None
    instructions: str | None
    previous_response_id: str | None
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    text: dict[str, Any]
    truncation: Literal["auto", "disabled"]
    metadata: dict[str, str]
    store: bool
    user: str | None


class ResponseDeleted(BaseModel):
    """DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]


class ResponseLifecycleEvent(BaseModel):
    """The first two events (in_progress) and the last (completed, incomplete or failed), with the response."""

    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
    ]
    sequence_number: int
    response: ResponseObject


class ResponseOutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: ResponseOutputItem


class ResponseContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: ResponseOutputText


class ResponseTextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any]


class ResponseTextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any]


class ResponseArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ResponseArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"]
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str


class ResponseStreamEvent(
    RootModel[
        Annotated[
            ResponseLifecycleEvent
            | ResponseOutputItemEvent
            | ResponseContentPartEvent
            | ResponseTextDeltaEvent
            | ResponseTextDoneEvent
            | ResponseArgumentsDeltaEvent
            | ResponseArgumentsDoneEvent,
            Field(discriminator="type"),
        ]
    ]
):
    """One event of a streamed response (``event: <type>`` + ``data: <this>``), numbered by ``sequence_number``."""
