"""Building the engine requests of one OpenAI request: the prompt (with the model's chat template, tools and tool
traffic included), the grammar that constrains the output (``response_format``, a forced tool call), logprobs, and
one request per choice (``n``).

Every check that can fail on the request's content runs here, before an admission slot is taken: a bad schema, a
malformed tool, a ``tool_choice`` this model cannot honour are 400s that name the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatstream.config import SamplingParams
from chatstream.engine.base import GenerationRequest
from chatstream.engine.grammar import GrammarSpec, response_format_grammar
from chatstream.server.errors import BadRequest
from chatstream.server.openai_schemas import ChatCompletionRequest, CompletionRequest
from chatstream.server.tool_calls import (
    TOOLS_IGNORED_HEADER,
    ToolFormat,
    ToolPlan,
    detect_format,
    fold_tool_traffic,
    get_format,
    marker_token_ids,
    plan_tools,
    render_chat,
    supports_tools,
)
from chatstream.service import ChatService

if TYPE_CHECKING:
    from chatstream.prompts.base import AbstractChatPrompt

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for the legacy completions endpoint."""

_PARAM = re.compile(r"[A-Za-z_][\w.\[\]]*")


@dataclass(frozen=True)
class OpenAIJob:
    """What one OpenAI request runs and how its output is read.

    Attributes:
        requests: one engine request per choice (``n``), in choice order.
        tool_format: parses tool calls out of the output (None: plain text).
        tool_names: the functions the request offered (a call to another one stays text).
        logprobs: the response shows logprobs.
        headers: extra response headers (``X-ChatStream-Tools-Ignored``).
    """

    requests: tuple[GenerationRequest, ...]
    tool_format: ToolFormat | None = None
    tool_names: tuple[str, ...] = ()
    logprobs: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.requests[0].request_id


def bad_request(exc: Exception, default_param: str) -> BadRequest:
    """A ValueError from a check as a 400; its message starts with the field it names."""
    message = str(exc)
    match = _PARAM.match(message)
    param = match.group(0) if match and match.group(0).split(".")[0].split("[")[0] in _FIELDS else default_param
    return BadRequest(message, param=param)


_FIELDS = frozenset({"tools", "tool_choice", "response_format", "messages", "text", "input", "instructions"})


# ----- tools -----


def tool_format_of(service: ChatService) -> ToolFormat | None:
    """The call format of the served model: the configured one, else detected from its chat template (None: the
    template has no tool support)."""
    template = getattr(service.prompts.tokenizer, "chat_template", None)
    if service.config.tool_call_format:
        return get_format(service.config.tool_call_format) if supports_tools(template) else None
    return detect_format(template if isinstance(template, str) else None, service.config.model_type)


def plan_for(service: ChatService, tools: Sequence[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan:
    """The tool plan of a request on this model; BadRequest naming ``tools`` or ``tool_choice``."""
    fmt = tool_format_of(service)
    special = marker_token_ids(service.prompts.tokenizer, fmt) if fmt is not None else {}
    try:
        plan = plan_tools(tools, tool_choice, fmt, special, parallel=parallel is not False)
    except ValueError as exc:
        raise bad_request(exc, "tools") from None
    if plan.ignored:
        logger.debug("tools ignored: %s", plan.ignored)
    return plan


def response_format_spec(response_format: Any) -> GrammarSpec | None:
    """The grammar of a chat request's ``response_format``; BadRequest naming the field."""
    try:
        return response_format_grammar(response_format, "response_format")
    except ValueError as exc:
        raise bad_request(exc, "response_format") from None


def output_grammar(plan: ToolPlan, spec: GrammarSpec | None) -> GrammarSpec | None:
    """The grammar the output must follow: the format's (``spec``), or the forced tool call's."""
    if plan.grammar is None:
        return spec
    if spec is not None:
        raise BadRequest(f"{spec.field} can not be combined with a required tool call", param=spec.field)
    return GrammarSpec.lark(plan.grammar, "tool_choice")


async def checked_grammar(service: ChatService, spec: GrammarSpec | None) -> GrammarSpec | None:
    """``spec`` once the engine compiled it (a 400 naming its field when it can not)."""
    if spec is not None:
        try:
            await service.validate_grammar(spec)
        except ValueError as exc:
            raise BadRequest(str(exc), param=spec.field) from None
    return spec


# ----- prompts -----


def prompt_request(
    service: ChatService, messages: list[dict[str, Any]], plan: ToolPlan, tool_traffic: bool
) -> GenerationRequest:
    """The engine request for chat ``messages``: through :func:`render_chat` when tools or tool traffic need the
    chat template, else through the service's prompt class (tool traffic folded into plain turns)."""
    tokenizer = service.prompts.tokenizer
    if getattr(tokenizer, "chat_template", None) and (plan.tools or tool_traffic):
        try:
            prompt = render_chat(tokenizer, messages, plan)
        except Exception as exc:  # jinja2 raises TemplateError (or ValueError) for messages it rejects
            raise BadRequest(f"the chat template rejects these messages: {exc}", param="messages") from None
        return service.requests.build_rendered_request(prompt, user_input=_last_user_text(messages))
    if tool_traffic:
        messages = fold_tool_traffic(messages)
    return _prompt_class_request(service, messages)


def _prompt_class_request(service: ChatService, messages: list[dict[str, Any]]) -> GenerationRequest:
    from chatstream.prompts import ChatTemplatePrompt, load_openai_messages

    tokenizer = service.prompts.tokenizer
    if getattr(tokenizer, "chat_template", None):
        chat_prompt: AbstractChatPrompt = ChatTemplatePrompt(tokenizer)
    else:
        chat_prompt = service.new_chat_prompt()
    try:
        load_openai_messages(chat_prompt, messages)
        return service.requests.build_request(chat_prompt)
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from None


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str | None:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            return content if isinstance(content, str) else None
    return None


def conversation_key(messages: list[dict[str, Any]], user: str | None) -> str:
    """A stable id for the conversation a stateless OpenAI request continues: its messages up to the first user
    message (and the ``user`` field). The next turn of the same chat has the same opening, so the engine's
    per-conversation KV cache serves it; two chats with the same opening only share (or replace) a cache entry,
    which is safe because reuse covers only the token prefix they actually have in common."""
    opening: list[dict[str, Any]] = []
    for message in messages:
        opening.append(message)
        if message.get("role") == "user":
            break
    digest = hashlib.sha256(json.dumps([user, opening], sort_keys=True, default=str).encode()).hexdigest()
    return f"openai-{digest[:32]}"


# ----- the job -----


def sampling_of(
    body: ChatCompletionRequest | CompletionRequest, defaults: SamplingParams, default_max_tokens: int | None = None
) -> SamplingParams:
    """The request's sampling over ``defaults``; BadRequest naming the field."""
    try:
        return body.sampling(defaults, default_max_tokens=default_max_tokens)
    except ValueError as exc:
        param = str(exc).split("=", 1)[0] if "=" in str(exc) else None
        raise BadRequest(str(exc), param=param) from None


def choices(request: GenerationRequest, n: int) -> tuple[GenerationRequest, ...]:
    """``n`` copies of ``request`` with their own ids (and seeds ``seed + i``, so that seeded copies differ). They
    rely on the engine's prefix cache to share the prompt's KV (see docs/api.md, ``n``)."""
    copies = [request]
    for index in range(1, n):
        seed = request.sampling.seed
        sampling = request.sampling if seed is None else request.sampling.with_updates(seed=seed + index)
        copies.append(dataclasses.replace(request, request_id=f"{request.request_id}-{index}", sampling=sampling))
    return tuple(copies)


@dataclass(frozen=True)
class ChatSpec:
    """What a chat-shaped job needs besides the messages: the engine request's id and conversation, the request's
    sampling over the prompt's own, the number of choices and of logprobs."""

    request_id: str
    conversation_id: str | None
    sampling: Callable[[SamplingParams], SamplingParams]
    n: int = 1
    logprobs: int | None = None


async def chat_job(
    service: ChatService, messages: list[dict[str, Any]], plan: ToolPlan, spec: GrammarSpec | None, chat: ChatSpec
) -> OpenAIJob:
    """The job for chat ``messages`` with a tool plan and an output format (shared by /v1/chat/completions and
    /v1/responses); the grammar is compiled before anything else, so a bad one is a 400 before admission."""
    grammar = await checked_grammar(service, output_grammar(plan, spec))
    tool_traffic = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    base = prompt_request(service, messages, plan, tool_traffic)
    request = dataclasses.replace(
        base,
        request_id=chat.request_id,
        sampling=chat.sampling(base.sampling),
        conversation_id=chat.conversation_id,
        grammar=grammar,
        logprobs=chat.logprobs,
        skip_special_tokens=not (plan.format and marker_token_ids(service.prompts.tokenizer, plan.format)),
    )
    headers = {TOOLS_IGNORED_HEADER: plan.ignored} if plan.ignored else {}
    names = tuple(tool["function"]["name"] for tool in plan.tools)
    return OpenAIJob(choices(request, chat.n), plan.format, names, chat.logprobs is not None, headers)


async def prepare_chat(service: ChatService, body: ChatCompletionRequest) -> OpenAIJob:
    """The job of a /v1/chat/completions request (every check done; no slot taken yet)."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    plan = plan_for(service, body.tools, body.tool_choice, body.parallel_tool_calls)
    spec = response_format_spec(body.response_format)
    chat = ChatSpec(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        conversation_id=conversation_key(messages, body.user),
        sampling=lambda prompt_sampling: sampling_of(body, prompt_sampling),
        n=body.n or 1,
        logprobs=body.num_logprobs,
    )
    return await chat_job(service, messages, plan, spec, chat)


async def prepare_completion(service: ChatService, body: CompletionRequest) -> OpenAIJob:
    """The job of a /v1/completions request."""
    sampling = sampling_of(body, service.default_sampling, COMPLETIONS_DEFAULT_MAX_TOKENS)
    request = service.requests.build_text_request(f"cmpl-{uuid.uuid4().hex}", body.prompt_text, sampling)
    request = dataclasses.replace(request, logprobs=body.num_logprobs)
    return OpenAIJob(choices(request, body.n or 1), logprobs=body.logprobs is not None)
