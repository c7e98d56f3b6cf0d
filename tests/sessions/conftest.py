"""Store fixtures: a real redis-server on a free port (started once, emptied before each test), SQLite on a temp
file, and ``store``, which runs a test against the memory, SQLite and Redis stores in turn."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from chatstream.sessions.base import Store
from chatstream.sessions.redis_store import RedisStore
from chatstream.sessions.sqlite import SQLiteStore
from chatstream.sessions.store import MemoryStore
from tests.sessions.support import TickingClock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server of our own (no persistence, a temp dir), stopped after the test session."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs Debian's redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with (workdir / "redis.log").open("wb") as log:
        process = subprocess.Popen([*command, "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_redis(url: str, process: subprocess.Popen[bytes]) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit code {process.poll()})") from None
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The test Redis, emptied."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture
def clock() -> TickingClock:
    return TickingClock()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: TickingClock) -> AsyncIterator[Store]:
    """Each store in turn, opened, with the ticking clock."""
    made: Store
    if request.param == "memory":
        made = MemoryStore(wall_clock=clock)
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "chatstream.db", clock=clock)
    else:
        made = RedisStore(request.getfixturevalue("redis_url"), clock=clock)
    async with made:
        yield made
