"""Where ``chatstream serve`` keeps its data: the data directory, the default SQLite store and the session secret.

Without ``--store``, conversations and sessions live in ``<data dir>/chatstream.db`` (SQLite), so that they survive
a restart. The cookie that names a browser's session is signed with a secret that must survive the restart too: it
is ``--session-secret``, else ``$CHATSTREAM_SESSION_SECRET``, else ``<data dir>/session_secret``, made once (mode
0600) by the first server that needs it. ``--store memory://`` keeps the earlier behaviour: nothing is written, the
secret is random per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "DATABASE_FILE",
    "SECRET_FILE",
    "SESSION_SECRET_ENV",
    "ServeData",
    "default_data_dir",
    "read_or_create_secret",
    "resolve_serve_data",
]

SESSION_SECRET_ENV = "CHATSTREAM_SESSION_SECRET"
"""The session secret, when not given with ``--session-secret`` (keeps it out of the process list)."""
DATABASE_FILE = "chatstream.db"
SECRET_FILE = "session_secret"


@dataclass(frozen=True)
class ServeData:
    """Where one ``chatstream serve`` keeps its data.

    Attributes:
        store_url: the store of sessions and conversations.
        session_secret: the key that signs session cookies; None: a random one per process (memory store).
        secret_source: where the secret came from, for the start-up message ("option", "environment", a file path,
            or "random, this process only").
    """

    store_url: str
    session_secret: str | None
    secret_source: str


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/chatstream``, else ``~/.local/share/chatstream``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "chatstream"


def resolve_serve_data(
    store: str | None, data_dir: Path, secret: str | None, environ: Mapping[str, str] | None = None
) -> ServeData:
    """The store and session secret of ``chatstream serve`` from its options (see the module docstring).

    Raises:
        OSError: the data directory or the secret file cannot be made or read.
    """
    env = os.environ if environ is None else environ
    url = store or _sqlite_url(data_dir / DATABASE_FILE)
    if secret:
        return ServeData(url, secret, "option")
    if env.get(SESSION_SECRET_ENV):
        return ServeData(url, env[SESSION_SECRET_ENV], f"${SESSION_SECRET_ENV}")
    if url.startswith("memory:"):
        return ServeData(url, None, "random, this process only")
    path = data_dir / SECRET_FILE
    return ServeData(url, read_or_create_secret(path), str(path))


def read_or_create_secret(path: Path) -> str:
    """The secret in ``path``; made first (random, mode 0600, its directory 0700) when the file does not exist.

    Several servers starting at once on one data directory all end up with the same secret: the file appears
    complete or not at all (written aside, then linked into place; the one that links first wins).
    """
    with contextlib.suppress(FileNotFoundError):
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(48) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise OSError(f"the session secret file {path} is empty; delete it to make a new one")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the session secret file %s can be read by other users; chmod 600 it", path)
    return text


def _sqlite_url(path: Path) -> str:
    return "sqlite:///" + urllib.parse.quote(str(path.expanduser().resolve()))
