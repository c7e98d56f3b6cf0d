"""Fixtures of the server tests.

Stores for the tests that run the HTTP layer on each of them: the real redis-server of tests/sessions, SQLite on a
temp file, memory; on the real clock (the HTTP layer stamps new conversations with it too).

The engine the server tests run on: the mock or the tiny model in-process (the default), or, with
``CHATSTREAM_TEST_ENGINE=upstream``, an upstream engine in front of a second real server process.

Under ``upstream`` every ChatStream a test builds for the mock or the tiny model gets an ``OpenAIUpstreamEngine``
instead, pointed at ``chatstream serve`` running that same mock (chat mode: the mock answers from the user's message
and the turn) or that same tiny model (completions mode: our prompt classes render the prompt). One upstream process
serves each distinct configuration for the whole session; a scripted mock gets a process of its own
(tests/server/scripted_upstream.py). Tests that need what an upstream cannot know carry
``@pytest.mark.local_engine("why")`` and are skipped with that reason; ``-rs`` lists them.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.engine.upstream_server import UpstreamServer
from tests.sessions.conftest import redis_server, redis_url

from chatstream.config import EngineConfig, MockConfig, MockType
from chatstream.engine.base import Engine
from chatstream.engine.factory import EngineKind, EngineSpec, create_engine
from chatstream.engine.upstream_engine import OpenAIUpstreamEngine
from chatstream.engine.upstream_protocol import UpstreamConfig
from chatstream.sessions import Store, open_store

__all__ = ["redis_server", "redis_url", "store"]

ENGINE_FACTORY_TARGET = "chatstream.engine_choice.create_engine"
"""Where ChatStream looks up the function that builds its engine (``create_engine(spec, model, tokenizer,
config)``): the upstream mode patches it. Change it here when engine construction moves to another module."""

TEST_ENGINE_ENV = "CHATSTREAM_TEST_ENGINE"
UNDER_UPSTREAM = os.environ.get(TEST_ENGINE_ENV, "") == "upstream"
UPSTREAM_LIMITS = ("--max-concurrency", "64", "--max-queue", "256")
"""Room for every test's requests at once: the upstream's own admission must never be what a test measures."""


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each store in turn, opened."""
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/chatstream.db"
    else:
        url = request.getfixturevalue("redis_url")
    async with open_store(url) as made:
        yield made


# ----- CHATSTREAM_TEST_ENGINE=upstream -----


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not UNDER_UPSTREAM:
        return
    for item in items:
        marker = item.get_closest_marker("local_engine")
        if marker is not None:
            reason = marker.args[0] if marker.args else "needs the engine in this process"
            item.add_marker(pytest.mark.skip(reason=f"{TEST_ENGINE_ENV}=upstream: {reason}"))


class UpstreamServers:
    """The upstream processes: one ``chatstream serve`` per distinct configuration, started on first use, and one
    scripted mock per ChatStream (its answers follow a counter that two ChatStreams must not share)."""

    def __init__(self, tiny_model_dir: Path) -> None:
        self.tiny_model_dir = tiny_model_dir
        self.servers: dict[tuple[str, ...], UpstreamServer] = {}
        self.scripted: list[UpstreamServer] = []

    def server(self, argv: list[str]) -> UpstreamServer:
        key = tuple(argv)
        if key not in self.servers:
            self.servers[key] = UpstreamServer([*argv, *UPSTREAM_LIMITS]).start()
        return self.servers[key]

    def engine_for(self, spec: EngineSpec, config: EngineConfig) -> OpenAIUpstreamEngine:
        """The upstream engine in front of a server that runs what ``spec`` would have run here."""
        if spec.kind is EngineKind.MOCK:
            mock = spec.options if isinstance(spec.options, MockConfig) else MockConfig()
            timing = [
                *("--mock-time-per-token", str(mock.time_per_token_sec)),
                *("--mock-initial-wait", str(mock.initial_wait_sec)),
            ]
            if mock.type is MockType.SCRIPT:
                script = ["--script", json.dumps(list(mock.script)), *timing, *UPSTREAM_LIMITS]
                server = UpstreamServer(script, launcher=("-m", "tests.server.scripted_upstream")).start()
                self.scripted.append(server)
                api = "completions"  # its answers ignore the prompt; tool chats are rendered here, as prompts only
            else:
                server = self.server(["--mock", "--mock-type", mock.type.value, *timing])
                api = "chat"  # the mock answers from the user's message and the turn, which only messages carry
        else:
            argv = ["--model", str(self.tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
            server = self.server([*argv, "--context-len", str(config.context_len)])
            api = "completions"
        return OpenAIUpstreamEngine(UpstreamConfig(server.base_url, api=api, read_timeout_sec=30))

    def stop(self) -> None:
        for server in [*self.servers.values(), *self.scripted]:
            server.stop()


@pytest.fixture(scope="session", autouse=True)
def engine_under_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under ``CHATSTREAM_TEST_ENGINE=upstream``: ChatStreams on the mock or the tiny model generate upstream.

    Session-wide, so that ChatStreams built by module-scoped fixtures generate upstream too (tests marked
    ``local_engine`` are skipped before their fixtures run). An engine a test hands over itself (``engine=...``)
    and vLLM stay as they are. Another model than the tiny one fails the test: no upstream process runs it.
    """
    if not UNDER_UPSTREAM:
        yield
        return
    tiny_model = request.getfixturevalue("tiny_model")
    servers = UpstreamServers(request.getfixturevalue("tiny_model_dir"))

    def upstream_engine(spec: EngineSpec, model: Any, tokenizer: Any, config: EngineConfig) -> Engine:
        if spec.kind is EngineKind.TRANSFORMERS and model is not tiny_model:
            pytest.fail(f"only the tiny model runs upstream, not this {type(model).__name__}")
        if spec.kind in (EngineKind.MOCK, EngineKind.TRANSFORMERS):
            return servers.engine_for(spec, config)
        return create_engine(spec, model, tokenizer, config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ENGINE_FACTORY_TARGET, upstream_engine)
        try:
            yield
        finally:
            servers.stop()
