"""``open_store(url)``: the store a URL names, with its options from the query string or from keyword arguments.

=====================================  ==================================================================
``memory://``                          this process's memory (today's behaviour; lost on restart)
``sqlite:///chatstream.db``            a file relative to the working directory (SQLAlchemy's convention:
``sqlite:////var/lib/cs/chat.db``      three slashes and a relative path, four for an absolute one)
``redis://[:password@]host:6379/0``    Redis (``rediss://`` for TLS); other query options go to redis-py
=====================================  ==================================================================

Options (query string or keyword; a duration is seconds or a number with ``s``, ``m``, ``h`` or ``d``, and
``never`` turns expiry off):

- ``session_ttl``: how long a session lives after its last use (all stores; memory: 12h, SQLite and Redis: 30d);
- ``ttl`` (Redis): a conversation expires this long after its last change (default: never);
- ``prefix`` (Redis): the start of every key (default ``chatstream:``);
- ``synchronous`` (SQLite): ``normal`` (survives a killed process, default) or ``full`` (also a power cut);
- ``max_sessions`` (memory): the most sessions kept (default 10000).
"""

from __future__ import annotations

import re
import urllib.parse

from chatstream.sessions.base import DEFAULT_SESSION_TTL, Store, redacted_url

__all__ = ["open_store", "parse_duration"]

_NEVER = ("never", "none", "0")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_OPTIONS = {
    "memory": ("session_ttl", "max_sessions"),
    "sqlite": ("session_ttl", "synchronous"),
    "redis": ("session_ttl", "ttl", "prefix"),
}


def parse_duration(value: str | float, name: str) -> float | None:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"12h"`` or ``"30d"``; None from ``"never"``, ``"none"``, 0.

    Raises:
        ValueError: anything else (the message names the option).
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return None if value == 0 else float(value)
    text = str(value).strip().lower()
    if text in _NEVER:
        return None
    match = _DURATION.fullmatch(text)
    if match is None or float(match.group(1)) == 0:
        raise ValueError(f"{name} must be a duration like 3600, 90s, 30m, 12h, 30d or never, got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def open_store(
    url: str,
    *,
    session_ttl: str | float | None = None,
    ttl: str | float | None = None,
    prefix: str | None = None,
    synchronous: str | None = None,
    max_sessions: int | None = None,
) -> Store:
    """The store ``url`` names (nothing is opened yet: use ``async with open_store(url) as store`` or ``await
    store.open()``). Keyword options override the URL's query options; None means "not given here".

    Raises:
        ValueError: an unknown scheme, an option the store does not take, or a bad value (the message names it).
    """
    parts = urllib.parse.urlsplit(url)
    kind = {"memory": "memory", "sqlite": "sqlite", "redis": "redis", "rediss": "redis"}.get(parts.scheme)
    if kind is None:
        raise ValueError(
            f"store URL must start with memory://, sqlite:///, redis:// or rediss://, got {redacted_url(url)!r}"
        )
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    given: dict[str, object] = {"session_ttl": session_ttl, "ttl": ttl, "prefix": prefix}
    given.update(synchronous=synchronous, max_sessions=max_sessions)
    options: dict[str, object] = {
        name: values[-1] for name, values in query.items() if name in _OPTIONS[kind] or kind != "redis"
    }
    options.update({name: value for name, value in given.items() if value is not None})
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"{parts.scheme}:// store takes the options {list(_OPTIONS[kind])}, not {unknown}")
    if kind == "memory":
        return _memory(parts, options)
    if kind == "sqlite":
        return _sqlite(parts, options)
    return _redis(parts, query, options)


def _memory(parts: urllib.parse.SplitResult, options: dict[str, object]) -> Store:
    from chatstream.sessions.store import MemoryStore

    if parts.netloc or parts.path.strip("/"):
        raise ValueError(f"memory:// takes no host or path, got {urllib.parse.urlunsplit(parts)!r}")
    kwargs: dict[str, object] = {}
    if "session_ttl" in options:
        kwargs["ttl_seconds"] = _duration(options, "session_ttl", None)
    if "max_sessions" in options:
        kwargs["max_sessions"] = _positive_int(options["max_sessions"], "max_sessions")
    return MemoryStore(**kwargs)  # type: ignore[arg-type]


def _sqlite(parts: urllib.parse.SplitResult, options: dict[str, object]) -> Store:
    from chatstream.sessions.sqlite import SQLiteStore

    if parts.netloc:
        raise ValueError(
            f"a SQLite URL has no host (sqlite:///relative.db, sqlite:////absolute.db), got {parts.netloc!r}"
        )
    path = urllib.parse.unquote(parts.path[1:])
    if not path or path.endswith("/"):
        raise ValueError("a SQLite URL needs a file name: sqlite:///relative.db or sqlite:////absolute/path.db")
    return SQLiteStore(
        path,
        session_ttl=_duration(options, "session_ttl", DEFAULT_SESSION_TTL),
        synchronous=str(options.get("synchronous", "normal")).lower(),
    )


def _redis(parts: urllib.parse.SplitResult, query: dict[str, list[str]], options: dict[str, object]) -> Store:
    from chatstream.sessions.redis_store import DEFAULT_PREFIX, RedisStore

    rest = [(name, value) for name, values in query.items() if name not in _OPTIONS["redis"] for value in values]
    client_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return RedisStore(
        client_url,
        ttl=_duration(options, "ttl", None),
        session_ttl=_duration(options, "session_ttl", DEFAULT_SESSION_TTL),
        prefix=str(options.get("prefix", DEFAULT_PREFIX)),
    )


def _duration(options: dict[str, object], name: str, default: float | None) -> float | None:
    value = options.get(name)
    if value is None:
        return default
    return parse_duration(value if isinstance(value, int | float) else str(value), name)


def _positive_int(value: object, name: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number
