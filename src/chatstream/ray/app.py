"""``build_app``: ChatStream as a Ray Serve application (a front deployment and an engine deployment).

The front runs our FastAPI app (``chatstream.server.app.create_app``: sessions, roles, web UI, native and OpenAI
protocols, admission) around a ChatStream whose engine is a :class:`~chatstream.ray.client.RayEngine`; the engine
deployment runs N :class:`~chatstream.ray.engine_replica.EngineReplica` copies of the model behind the
conversation-sticky :class:`~chatstream.ray.router.ConversationRouter`.

Conversations live in the front's session store. With one front replica the default memory store works; with
more, every front must reach the same store (the Redis store), or a user's next turn may land on a front that does
not know the conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from chatstream.chat_stream import ChatStream
from chatstream.engine.base import Engine
from chatstream.ray.client import RayEngine
from chatstream.ray.engine_replica import EngineReplica
from chatstream.ray.router import ROUTER_CLASS_PATH
from chatstream.ray.spec import EngineSpec, ReplicaSettings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

logger = logging.getLogger(__name__)

FRONT_DEPLOYMENT = "ChatStreamFront"
ENGINE_DEPLOYMENT = "ChatStreamEngine"


@dataclass(frozen=True)
class FrontSettings:
    """The front deployment: our HTTP app and the ChatStream behind it.

    Attributes:
        chat_stream_options: keyword arguments of ``ChatStream`` (name, prompt class, sampling defaults, roles,
            locale, ...) except model, tokenizer and the engine, which the application provides. Unless given,
            ``num_of_concurrent_executions`` is the replicas' total batch slots, ``max_queue_size`` the engine
            deployment's ``max_queued_requests`` and ``too_many_request_as_http_error`` is True.
        web_ui_params, api_keys, drain_timeout, middleware_opts: as for ``create_app`` (``middleware_opts`` holds
            the session store: a shared one when ``num_replicas`` > 1).
        num_replicas: front replicas (Serve's HTTP proxy spreads requests over them).
        num_cpus: CPUs each front replica reserves.
    """

    chat_stream_options: Mapping[str, Any] = field(default_factory=dict)
    web_ui_params: Mapping[str, Any] = field(default_factory=dict)
    api_keys: tuple[str, ...] = ()
    drain_timeout: float = 30.0
    middleware_opts: Mapping[str, Any] | None = None
    num_replicas: int = 1
    num_cpus: float = 0.5

    def __post_init__(self) -> None:
        reserved = {"model", "tokenizer", "use_mock_response", "mock_params"} & set(self.chat_stream_options)
        if reserved:
            raise ValueError(f"chat_stream_options must not set {sorted(reserved)!r}: the application provides them")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas={self.num_replicas!r} must be >= 1")


def front_chat_stream(engine: Engine, spec: EngineSpec, replicas: ReplicaSettings, front: FrontSettings) -> ChatStream:
    """The front's ChatStream on ``engine``, with the tokenizer (no weights) of ``spec`` for prompt rendering."""
    options: dict[str, Any] = {
        "num_of_concurrent_executions": replicas.peak_replicas * spec.max_batch_size,
        "max_queue_size": max(replicas.max_queued_requests, 0),
        "too_many_request_as_http_error": True,
        "context_len": spec.engine_config.context_len,
        "model_name": Path(spec.model_path).name if spec.model_path else "chatstream-mock",
    }
    options.update(front.chat_stream_options)
    return ChatStream(engine=engine, tokenizer=spec.load_tokenizer(), **options)


class ChatStreamFront:
    """The front deployment's replica: a RayEngine on the engine deployment's handle and our FastAPI app."""

    def __init__(self, engine_handle: Any, spec: EngineSpec, replicas: ReplicaSettings, front: FrontSettings) -> None:
        self.front = front
        self.engine = RayEngine(
            engine_handle,
            retry_after=replicas.retry_after_s,
            first_delta_timeout_s=replicas.first_delta_timeout_s,
            max_running_per_replica=spec.max_batch_size,
            wants_chat_context=spec.mock is not None,
        )
        self.chat_stream = front_chat_stream(self.engine, spec, replicas, front)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from chatstream.ray.routes import add_ray_routes
        from chatstream.server.app import create_app

        app = create_app(
            self.chat_stream,
            web_ui_params=self.front.web_ui_params,
            api_keys=self.front.api_keys,
            drain_timeout=self.front.drain_timeout,
            middleware_opts=self.front.middleware_opts,
        )
        add_ray_routes(app, self.chat_stream, self.engine)
        return app


def build_app(
    spec: EngineSpec,
    replicas: ReplicaSettings | None = None,
    front: FrontSettings | None = None,
) -> Application:
    """A Serve application: ``serve.run(build_app(spec, ReplicaSettings(num_replicas=2)), route_prefix="/")``.

    Every node needs chatstream installed and ``spec.model_path`` readable at the same path.
    """
    replicas = replicas or ReplicaSettings()
    front = front or FrontSettings()
    engine_deployment = serve.deployment(
        name=ENGINE_DEPLOYMENT, **replicas.deployment_options(spec.max_batch_size), **_router_options(replicas)
    )(EngineReplica)
    front_deployment = serve.deployment(
        name=FRONT_DEPLOYMENT,
        num_replicas=front.num_replicas,
        ray_actor_options={"num_cpus": front.num_cpus},
        # The front only relays; its admission (and Ray's queue) bounds what it holds.
        max_ongoing_requests=10_000,
    )(serve.ingress()(ChatStreamFront))
    return front_deployment.bind(engine_deployment.bind(spec), spec, replicas, front)


def _router_options(replicas: ReplicaSettings) -> dict[str, Any]:
    if not replicas.sticky:
        return {}
    return {"request_router_config": {"request_router_class": ROUTER_CLASS_PATH}}
