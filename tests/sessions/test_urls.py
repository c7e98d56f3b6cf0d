"""open_store(url): the store a URL names, its options, and the errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatstream.sessions.base import DEFAULT_SESSION_TTL, redacted_url
from chatstream.sessions.redis_store import RedisStore
from chatstream.sessions.sqlite import SQLiteStore
from chatstream.sessions.store import MemoryStore
from chatstream.sessions.urls import open_store, parse_duration


def test_memory() -> None:
    store = open_store("memory://")
    assert isinstance(store, MemoryStore) and store.ttl_seconds == 12 * 3600
    tuned = open_store("memory://?session_ttl=1h&max_sessions=5")
    assert isinstance(tuned, MemoryStore) and (tuned.ttl_seconds, tuned.max_sessions) == (3600, 5)
    assert isinstance(never := open_store("memory://", session_ttl="never"), MemoryStore) and never.ttl_seconds is None


def test_sqlite_paths_follow_sqlalchemy() -> None:
    relative = open_store("sqlite:///data/chat.db")
    assert isinstance(relative, SQLiteStore) and relative.path == Path("data/chat.db")
    absolute = open_store("sqlite:////var/lib/chatstream/chat%20store.db?synchronous=FULL&session_ttl=7d")
    assert isinstance(absolute, SQLiteStore) and absolute.path == Path("/var/lib/chatstream/chat store.db")
    assert absolute.db.synchronous == "full" and absolute.sessions.ttl_seconds == 7 * 86400
    assert isinstance(home := open_store("sqlite:///~/x.db"), SQLiteStore) and home.path == Path.home() / "x.db"
    assert relative.sessions.ttl_seconds == DEFAULT_SESSION_TTL


def test_redis_options_and_passthrough() -> None:
    store = open_store("redis://:pw@cache:6380/2?ttl=30d&prefix=app:&socket_timeout=3", session_ttl=60)
    assert isinstance(store, RedisStore)
    assert store.url == "redis://:pw@cache:6380/2?socket_timeout=3"
    assert store.describe() == "Redis redis://:***@cache:6380/2?socket_timeout=3"
    assert store.sessions.ttl_seconds == 60 and store.conversations._ttl == str(30 * 86400)
    assert store.client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
    plain = open_store("rediss://cache")
    assert isinstance(plain, RedisStore) and plain.conversations._ttl == "0"


@pytest.mark.parametrize(
    ("url", "options", "needle"),
    [
        ("postgres://db", {}, "must start with"),
        ("memory://somewhere", {}, "no host or path"),
        ("memory://?ttl=1h", {}, "takes the options"),
        ("sqlite://host/x.db", {}, "no host"),
        ("sqlite:///", {}, "file name"),
        ("sqlite:///x.db", {"prefix": "p"}, "takes the options"),
        ("sqlite:///x.db?synchronous=off", {}, "synchronous"),
        ("redis://h?ttl=soon", {}, "ttl must be a duration"),
        ("memory://?max_sessions=lots", {}, "max_sessions"),
        ("postgres://user:secret@db", {}, r"\*\*\*"),
    ],
)
def test_bad_urls_name_the_problem(url: str, options: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as caught:
        open_store(url, **options)  # type: ignore[arg-type]
    assert "secret" not in str(caught.value)


def test_durations() -> None:
    assert [parse_duration(v, "x") for v in ("3600", "90s", "30m", "12h", "2d", "1.5h", 45)] == [
        3600,
        90,
        1800,
        43200,
        172800,
        5400,
        45,
    ]
    assert parse_duration("never", "x") is None and parse_duration(0, "x") is None
    for bad in ("-1", "1w", "", "0s"):
        with pytest.raises(ValueError, match="x must be"):
            parse_duration(bad, "x")


def test_redacted_url() -> None:
    assert redacted_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redacted_url("redis://h:1/0") == "redis://h:1/0"
