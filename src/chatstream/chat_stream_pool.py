"""ChatStreamPool: several ChatStream instances (one per GPU, say) served as one, with conversation-sticky routing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatstream.chat_stream import ChatStream
from chatstream.pool.config import PoolConfig, PoolMember
from chatstream.pool.devices import member_names
from chatstream.pool.engine import PoolEngine


class ChatStreamPool(ChatStream):
    """The original package's name for several model copies behind one endpoint: the engines of ``chat_streams``
    form a :class:`~chatstream.pool.PoolEngine` (a conversation stays on the engine that holds its KV cache, new
    ones go to the least-loaded engine, a failed engine is taken out of rotation), served with one admission
    control, one set of endpoints and this instance's settings.

    Args:
        chat_streams: the members, typically one per GPU, each built with its own copy of the model
            (``ChatStream(model=copy, tokenizer=..., device="cuda:N", num_of_concurrent_executions=8)``). Only their
            engines are used: serve the pool, not them. Members are named after theirs (``name``; "#i" is appended
            where names repeat).
        pool_config: routing and failure handling (default: sticky).
        **options: ChatStream's keyword arguments for the pool itself (prompt class, sampling defaults, roles,
            handler, ...). Unless given, ``tokenizer``, ``chat_prompt_clazz``, ``model_name`` and ``context_len``
            are the first member's, ``num_of_concurrent_executions`` and ``max_queue_size`` the members' totals.

    ``ChatStream(model=..., tokenizer=..., devices=["cuda:0", "cuda:1"])`` builds the same from one model.
    """

    def __init__(
        self, chat_streams: Sequence[ChatStream], *, pool_config: PoolConfig | None = None, **options: Any
    ) -> None:
        if not chat_streams:
            raise ValueError("ChatStreamPool needs at least one ChatStream")
        if "engine" in options or "devices" in options:
            raise ValueError("ChatStreamPool takes its engines from chat_streams, not from engine or devices")
        first = chat_streams[0]
        names = member_names([member.name for member in chat_streams])
        members = [
            PoolMember(name, member.engine, member.engine_config.max_batch_size)
            for name, member in zip(names, chat_streams, strict=True)
        ]
        options.setdefault("tokenizer", first.tokenizer)
        options.setdefault("chat_prompt_clazz", first.chat_prompt_clazz)
        options.setdefault("model_name", first.model_name)
        options.setdefault("context_len", first.engine_config.context_len)
        admissions = [member.admission_config for member in chat_streams]
        options.setdefault("num_of_concurrent_executions", sum(a.max_concurrency for a in admissions))
        options.setdefault("max_queue_size", sum(a.max_queue_size for a in admissions))
        super().__init__(engine=PoolEngine(members, pool_config), **options)
        self.members = tuple(chat_streams)

    @property
    def pool(self) -> PoolEngine:
        """The pool of the members' engines (routing report, per-engine stats, health)."""
        engine = self.service.engine
        assert isinstance(engine, PoolEngine)
        return engine
