"""Between a conversation record and a live prompt-class object (:class:`~chatstream.prompts.base.AbstractChatPrompt`).

The request handler works on prompt objects (``add_requester_msg``, ``create_prompt``, message ids, regenerate);
the stores hold :class:`~chatstream.sessions.records.Conversation` records. :func:`conversation_to_prompt` rebuilds
the object through the prompt class's own ``from_dict``, :func:`merge_prompt` turns the object back into a record
(keeping each message's time, feedback and generation params), and :func:`save_prompt` writes the difference: an
atomic append for a new turn, a version-checked update for anything else (regenerate).

The prompt class is always the one the application passes in; the class name in a record is only compared with it.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from chatstream.prompts.base import AbstractChatPrompt
from chatstream.prompts.content import ChatContent, RoleType
from chatstream.sessions.base import ConversationStore
from chatstream.sessions.errors import CorruptRecord, ForeignRecord
from chatstream.sessions.records import (
    Conversation,
    ConversationSummary,
    Message,
    new_conversation_id,
    new_message_id,
)

__all__ = [
    "conversation_to_prompt",
    "merge_prompt",
    "new_conversation",
    "prompt_class_name",
    "prompt_settings",
    "save_prompt",
]

PromptT = TypeVar("PromptT", bound=AbstractChatPrompt)

_HISTORY_KEYS = ("chat_contents", "requester_messages", "responder_messages", "prompt_class")
_ROLE_OF = {RoleType.REQUESTER: "user", RoleType.RESPONDER: "assistant", RoleType.UNKNOWN: "other"}
_ROLE_TYPE_OF = {role: role_type for role_type, role in _ROLE_OF.items()}


def prompt_class_name(prompt_class: type[AbstractChatPrompt]) -> str:
    return f"{prompt_class.__module__}.{prompt_class.__qualname__}"


def prompt_settings(prompt: AbstractChatPrompt) -> dict[str, Any]:
    """What the prompt object holds besides its history: its ``to_dict()`` without the messages."""
    return {key: value for key, value in prompt.to_dict().items() if key not in _HISTORY_KEYS}


def new_conversation(
    owner: str,
    prompt: AbstractChatPrompt,
    *,
    conversation_id: str | None = None,
    generation_params: dict[str, Any] | None = None,
    now: float | None = None,
) -> Conversation:
    """A record for a new conversation held by ``prompt`` (usually still empty); store it with ``create``."""
    now = time.time() if now is None else now
    empty = Conversation(
        id=conversation_id or new_conversation_id(),
        owner=owner,
        title="",
        created_at=now,
        updated_at=now,
        version=0,
        prompt_class=prompt_class_name(type(prompt)),
    )
    return merge_prompt(empty, prompt, generation_params=generation_params, now=now)


def conversation_to_prompt(
    conversation: Conversation,
    prompt_class: type[PromptT],
    tokenizer: Any = None,
    *,
    allow_other_class: bool = False,
) -> PromptT:
    """A prompt object of ``prompt_class`` holding the conversation, as it was when the record was written.

    Args:
        conversation: the record.
        prompt_class: the application's prompt class; the record must name a class of the same name (in any module,
            so that an app started as ``__main__`` or as a module reads its own records).
        tokenizer: attached with ``set_tokenizer`` (records never hold one).
        allow_other_class: load a record of another prompt class anyway: its messages get this class's role labels
            and settings (for a deployment that changed models).

    Raises:
        ForeignRecord: the record is of another prompt class and ``allow_other_class`` is False.
        CorruptRecord: the prompt class rejects the stored settings.
    """
    same_class = _same_class(conversation.prompt_class, prompt_class)
    if not same_class and not allow_other_class:
        raise ForeignRecord(
            conversation.id,
            f"written with prompt class {conversation.prompt_class}, not {prompt_class_name(prompt_class)}",
        )
    data: dict[str, Any] = dict(conversation.prompt_settings) if same_class else {}
    labels = None if same_class else _role_labels(prompt_class)
    data["chat_contents"] = [_content_dict(message, labels) for message in conversation.messages]
    try:
        return prompt_class.from_dict(data, tokenizer=tokenizer)
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptRecord(conversation.id, f"{prompt_class.__name__} rejects the stored prompt: {exc!r}") from None


def merge_prompt(
    conversation: Conversation,
    prompt: AbstractChatPrompt,
    *,
    generation_params: dict[str, Any] | None = None,
    now: float | None = None,
) -> Conversation:
    """The record as ``prompt`` now has it: same id, owner, title and version; messages and settings from the prompt.

    A message whose id is at the same place in the record keeps its time, feedback and generation params; others are
    new (time ``now``; answers get ``generation_params``). A message without an id gets one, on the prompt object as
    well, so that the two stay in step.
    """
    now = time.time() if now is None else now
    old = conversation.messages
    messages = []
    for index, content in enumerate(prompt.chat_contents):
        if content.get_message_id() is None:
            content.set_message_id(new_message_id())
        previous = old[index] if index < len(old) and old[index].id == content.get_message_id() else None
        messages.append(_message_from_content(content, previous, generation_params, now))
    return Conversation(
        id=conversation.id,
        owner=conversation.owner,
        title=conversation.title,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        version=conversation.version,
        prompt_class=prompt_class_name(type(prompt)),
        prompt_settings=prompt_settings(prompt),
        messages=messages,
    )


async def save_prompt(
    store: ConversationStore,
    conversation: Conversation,
    prompt: AbstractChatPrompt,
    *,
    generation_params: dict[str, Any] | None = None,
    now: float | None = None,
) -> ConversationSummary:
    """Write what ``prompt`` changed since ``conversation`` was read.

    New messages at the end only (a turn): one atomic append that never conflicts, so two tabs both keep their
    turns. Anything else (a regenerated answer, changed settings): :meth:`ConversationStore.update`, which raises
    :class:`~chatstream.sessions.errors.Conflict` when someone else wrote the conversation in between.
    """
    merged = merge_prompt(conversation, prompt, generation_params=generation_params, now=now)
    old, new = conversation.messages, merged.messages
    same_start = new[: len(old)] == old and merged.prompt_settings == conversation.prompt_settings
    if same_start and merged.prompt_class == conversation.prompt_class:
        if len(new) == len(old):
            return conversation.summary()
        return await store.append_messages(conversation.owner, conversation.id, new[len(old) :])
    return (await store.update(merged)).summary()


def _same_class(recorded: str, prompt_class: type[AbstractChatPrompt]) -> bool:
    name = prompt_class.__qualname__
    return recorded == name or recorded.endswith("." + name)


def _role_labels(prompt_class: type[AbstractChatPrompt]) -> dict[str, str]:
    fresh = prompt_class()
    return {"user": fresh.requester, "assistant": fresh.responder}


def _content_dict(message: Message, labels: dict[str, str] | None) -> dict[str, Any]:
    name = labels.get(message.role, message.name) if labels is not None else message.name
    content = ChatContent(
        role=name,
        msg=message.text,
        msg_id=message.id,
        role_type=_ROLE_TYPE_OF[message.role],
        child_msgs=list(message.children) if message.children is not None else None,
    )
    return content.to_dict()


def _message_from_content(
    content: ChatContent, previous: Message | None, generation_params: dict[str, Any] | None, now: float
) -> Message:
    role = _ROLE_OF[content.get_role_type()]
    children = content.get_child_messages()
    if previous is None:
        params = dict(generation_params) if generation_params is not None and role == "assistant" else None
        created_at, feedback = now, None
    else:
        params, created_at, feedback = previous.generation_params, previous.created_at, previous.feedback
    return Message(
        id=str(content.get_message_id()),
        role=role,
        text=content.get_message(),
        created_at=created_at,
        name=content.get_role(),
        children=list(children) if children is not None else None,
        feedback=feedback,
        generation_params=params,
    )
