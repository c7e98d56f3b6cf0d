"""ChatHistory: the message list of one conversation, the part of a prompt class that is not about rendering.

:class:`~chatstream.prompts.base.AbstractChatPrompt` builds on it; the methods keep the names and behaviour of the
original ChatStream 0.3 prompt API.
"""

from __future__ import annotations

from chatstream.prompts.content import ChatContent, RoleType


class ChatHistory:
    """The messages of one conversation in order (``chat_contents``), and the same objects split by side
    (``requester_messages`` = the user's, ``responder_messages`` = the model's).

    ``requester`` and ``responder`` are the role names given to new messages.
    """

    def __init__(self) -> None:
        self.chat_contents: list[ChatContent] = []
        self.responder_messages: list[ChatContent] = []
        self.requester_messages: list[ChatContent] = []
        self.requester: str = ""
        self.responder: str = ""

    def _prepare_requester_text(self, text: str) -> str:
        """The text stored for a new user message (a prompt class applies its input replacements here)."""
        return text

    def clear_history(self) -> None:
        """Forget every message (system text and settings stay)."""
        self.chat_contents = []
        self.responder_messages = []
        self.requester_messages = []

    def find_chat_content_by_message_id(self, message_id: str) -> ChatContent | None:
        """The message with this id, or None."""
        if message_id is None:
            return None
        for content in self.chat_contents:
            if content.get_message_id() == message_id:
                return content
        return None

    def get_turn(self) -> int:
        """The number of turns so far (one requester message and its answer count as one)."""
        return len(self.requester_messages)

    def add_requester_msg(
        self,
        message: str | None,
        child_message: str | None = None,
        child_messages: list[str] | None = None,
    ) -> ChatContent:
        """Append the user's message (input replacements applied) and return it.

        Args:
            message: the text.
            child_message: one extra input attached to the message.
            child_messages: several extra inputs (a non-empty list of str); not together with ``child_message``.

        Raises:
            ValueError: both child arguments given, or ``child_messages`` not a non-empty list of str.
        """
        if child_message is not None and child_messages is not None:
            raise ValueError("give child_message or child_messages, not both")
        child_msgs: list[str] | None = None
        if child_message is not None:
            child_msgs = [child_message]
        elif child_messages is not None:
            if not (
                isinstance(child_messages, list) and child_messages and all(isinstance(m, str) for m in child_messages)
            ):
                raise ValueError(f"child_messages must be a non-empty list of str, got {child_messages!r}")
            child_msgs = list(child_messages)
        content = ChatContent(role=self.requester, msg=message, role_type=RoleType.REQUESTER, child_msgs=child_msgs)
        self._add_msg(content)
        return content

    def add_responder_msg(self, message: str | None) -> ChatContent:
        """Append the model's message and return it; None adds the empty slot the next generation fills."""
        content = ChatContent(role=self.responder, msg=message, role_type=RoleType.RESPONDER)
        self._add_msg(content)
        return content

    def _add_msg(self, chat_content_obj: ChatContent) -> None:
        """Append a message to the history (and to its side's list); requester text gets the input replacements."""
        if chat_content_obj.get_role_type() is RoleType.REQUESTER:
            text = chat_content_obj.get_message()
            if text is not None:
                chat_content_obj.set_message(self._prepare_requester_text(text))
        self._append_content(chat_content_obj)

    def _append_content(self, content: ChatContent) -> None:
        self.chat_contents.append(content)
        if content.get_role_type() is RoleType.RESPONDER:
            self.responder_messages.append(content)
        elif content.get_role_type() is RoleType.REQUESTER:
            self.requester_messages.append(content)

    def get_responder_last_msg(self) -> str | None:
        """The model's latest message, or None."""
        return self.responder_messages[-1].get_message() if self.responder_messages else None

    def get_requester_last_msg(self) -> str | None:
        """The user's latest message (after input replacements), or None."""
        return self.requester_messages[-1].get_message() if self.requester_messages else None

    def clear_last_responder_message(self) -> None:
        """Empty the model's last message (for "regenerate"); does nothing unless the history ends with one."""
        if self.chat_contents and self.chat_contents[-1].get_role_type() is RoleType.RESPONDER:
            self.chat_contents[-1].set_message(None)

    def remove_last_requester_msg(self) -> None:
        """Remove the user's last message; does nothing on an empty history.

        Raises:
            ValueError: the history ends with a responder message.
        """
        if not self.chat_contents:
            return
        last = self.chat_contents[-1]
        if last.get_role_type() is RoleType.RESPONDER:
            raise ValueError("the last message is the responder's, not the requester's")
        if last.get_role_type() is RoleType.REQUESTER:
            self.chat_contents.pop()
            _remove_identical(self.requester_messages, last)

    def remove_last_responder_msg(self) -> None:
        """Remove the model's last message.

        Raises:
            ValueError: the history is empty or does not end with a responder message.
        """
        if not self.chat_contents or self.chat_contents[-1].get_role_type() is not RoleType.RESPONDER:
            raise ValueError("the last message must be the responder's")
        last = self.chat_contents.pop()
        _remove_identical(self.responder_messages, last)

    def set_responder_last_msg(self, message: str | None) -> None:
        """Set the text of the model's latest message (the server calls this as the answer streams)."""
        self._last_responder().set_message(message)

    def set_responder_last_msg_id(self, message_id: str | None) -> None:
        """Set the id of the model's latest message."""
        self._last_responder().set_message_id(message_id)

    def _last_responder(self) -> ChatContent:
        if not self.responder_messages:
            raise ValueError("there is no responder message yet; call add_responder_msg first")
        return self.responder_messages[-1]

    def is_requester_role(self, role: str) -> bool:
        """True when ``role`` is the requester's role name."""
        return self.requester == role

    def is_empty(self) -> bool:
        """True when the conversation has no message yet."""
        return not self.requester_messages and not self.responder_messages


def _remove_identical(items: list[ChatContent], target: ChatContent) -> None:
    for index in range(len(items) - 1, -1, -1):
        if items[index] is target:
            del items[index]
            return
