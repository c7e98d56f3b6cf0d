"""Stores for the server tests that run the HTTP layer on each of them: the real redis-server of tests/sessions,
SQLite on a temp file, memory; on the real clock (the HTTP layer stamps new conversations with it too)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.sessions.conftest import redis_server, redis_url

from chatstream.sessions import Store, open_store

__all__ = ["redis_server", "redis_url", "store"]


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
