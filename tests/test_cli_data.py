"""Where ``chatstream serve`` keeps its data (cli_data.py) and the options that choose it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from chatstream.cli import build_parser, main
from chatstream.cli_data import (
    SESSION_SECRET_ENV,
    default_data_dir,
    read_or_create_secret,
    resolve_serve_data,
)


def test_the_data_dir_follows_xdg() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/srv/data"}) == Path("/srv/data/chatstream")
    assert default_data_dir({}) == Path.home() / ".local" / "share" / "chatstream"


def test_serve_keeps_data_in_sqlite_with_a_secret_file_by_default(tmp_path: Path) -> None:
    data = resolve_serve_data(None, tmp_path / "my data", None, environ={})
    assert data.store_url == f"sqlite:///{tmp_path}/my%20data/chatstream.db"
    assert data.secret_source == str(tmp_path / "my data" / "session_secret")
    assert data.session_secret and len(data.session_secret) >= 40
    assert (tmp_path / "my data").stat().st_mode & 0o777 == 0o700
    assert resolve_serve_data(None, tmp_path / "my data", None, environ={}).session_secret == data.session_secret


def test_a_given_secret_or_a_memory_store_writes_nothing(tmp_path: Path) -> None:
    given = resolve_serve_data("redis://h:6379/0", tmp_path / "a", "s3cret", environ={})
    assert (given.store_url, given.session_secret, given.secret_source) == ("redis://h:6379/0", "s3cret", "option")
    from_env = resolve_serve_data(None, tmp_path / "b", None, environ={SESSION_SECRET_ENV: "env-secret"})
    assert (from_env.session_secret, from_env.secret_source) == ("env-secret", f"${SESSION_SECRET_ENV}")
    memory = resolve_serve_data("memory://", tmp_path / "c", None, environ={})
    assert memory.session_secret is None  # a random one per process, as before
    assert not any((tmp_path / name).exists() for name in "abc")


def test_servers_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "data" / "session_secret"
    secrets: list[str] = []
    threads = [threading.Thread(target=lambda: secrets.append(read_or_create_secret(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(secrets)) == 1 and path.read_text().strip() == secrets[0]
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["session_secret"]  # no drafts left behind


def test_an_empty_secret_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = tmp_path / "session_secret"
    path.write_text("\n")
    with pytest.raises(OSError, match="session_secret is empty"):
        read_or_create_secret(path)


def test_conversation_options_are_parsed() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--store",
            "redis://h/0",
            "--data-dir",
            "/d",
            "--session-secret",
            "s",
            "--max-conversation-age",
            "90d",
            "--max-conversations-per-user",
            "50",
        ]
    )
    assert (args.store, args.data_dir, args.session_secret) == ("redis://h/0", Path("/d"), "s")
    assert (args.max_conversation_age, args.max_conversations_per_user) == ("90d", 50)
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.store, defaults.data_dir, defaults.max_conversation_age) == (None, None, None)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-conversation-age", "soon"], "--max-conversation-age"),
        (["--max-conversations-per-user", "0"], "--max-conversations-per-user"),
        (["--store", "mongodb://x"], "--store"),
        (["--store", "sqlite:///x.db?colour=blue"], "--store"),
    ],
)
def test_bad_conversation_options_exit_2_naming_them(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--mock", "--data-dir", str(tmp_path), *argv])
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err
