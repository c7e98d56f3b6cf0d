"""Acceptance: conversations survive ``kill -9`` (SQLite in the data dir) and follow a user across two server
processes that share one redis-server; both with real ``chatstream serve --mock`` processes and an httpx client
whose cookie jar is the browser."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
from tests.serve_process import serving, start_serve

from chatstream.engine.mock_engine import ROUND_ANSWERS

EOS = "<::EOS::>"


def turn(client: httpx.Client, url: str, text: str) -> str:
    """One /chat_stream turn; the final answer."""
    response = client.post(f"{url}/chat_stream", json={"user_input": text})
    assert response.status_code == 200 and response.text.endswith(EOS), response.text
    return response.text.split(EOS)[-2]


def history(client: httpx.Client, url: str) -> tuple[dict[str, Any], list[str]]:
    """The user's conversations and the texts of the current one."""
    page = client.get(f"{url}/conversations").json()
    items = client.get(f"{url}/conversations/{page['current_id']}/items").json()["data"]
    return page, [item["content"][0]["text"] for item in items]


def test_kill_9_loses_no_completed_turn(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    with httpx.Client(timeout=30) as browser:
        first = start_serve("--data-dir", data_dir, "--mock-time-per-token", "0.001")
        try:
            assert f"SQLite file {tmp_path / 'data' / 'chatstream.db'}" in first.text  # printed at start
            assert turn(browser, first.url, "first question") == ROUND_ANSWERS[0]
            assert turn(browser, first.url, "second question") == ROUND_ANSWERS[1]
        finally:
            first.kill_9()
        with serving("--data-dir", data_dir, "--mock-time-per-token", "0.001") as second:
            page, texts = history(browser, second.url)  # the same cookie jar: the same user
            assert len(page["data"]) == 1 and page["data"][0]["title"] == "first question"
            assert texts == ["first question", ROUND_ANSWERS[0], "second question", ROUND_ANSWERS[1]]
            assert turn(browser, second.url, "third question") == ROUND_ANSWERS[2]  # the history goes on
            assert history(browser, second.url)[1][-2:] == ["third question", ROUND_ANSWERS[2]]
    assert (tmp_path / "data" / "session_secret").stat().st_mode & 0o777 == 0o600


def test_two_servers_sharing_redis_serve_one_conversation(tmp_path: Path, redis_url: str) -> None:
    options = ("--store", redis_url, "--data-dir", str(tmp_path), "--mock-time-per-token", "0.001")
    with serving(*options) as one, serving(*options) as two, httpx.Client(timeout=30) as browser:
        assert "Redis redis://127.0.0.1" in one.text
        assert turn(browser, one.url, "started on one") == ROUND_ANSWERS[0]
        assert turn(browser, two.url, "continued on two") == ROUND_ANSWERS[1]  # the whole history was there
        assert turn(browser, one.url, "back on one") == ROUND_ANSWERS[2]
        page, texts = history(browser, two.url)
    assert len(page["data"]) == 1
    assert texts[::2] == ["started on one", "continued on two", "back on one"]


def test_another_users_id_and_a_damaged_record_fail_alone(tmp_path: Path) -> None:
    server_options = ("--data-dir", str(tmp_path), "--mock-time-per-token", "0.001")
    with serving(*server_options) as server, httpx.Client(timeout=30) as alice, httpx.Client(timeout=30) as bob:
        turn(alice, server.url, "alice's question")
        theirs = alice.get(f"{server.url}/conversations").json()["current_id"]
        stolen = bob.post(f"{server.url}/chat_stream", json={"user_input": "hi", "conversation_id": theirs})
        assert stolen.status_code == 404 and stolen.json()["error"] == "not_found"
        assert bob.get(f"{server.url}/conversations/{theirs}/items").status_code == 404
        with sqlite3.connect(tmp_path / "chatstream.db") as conn:  # damage alice's record behind the server
            conn.execute("UPDATE messages SET children = '[not json' WHERE conversation_id = ?", (theirs,))
        broken = alice.post(f"{server.url}/chat_stream", json={"user_input": "again"})
        assert broken.status_code == 500 and theirs in broken.json()["detail"]
        items = alice.get(f"{server.url}/conversations/{theirs}/items")
        assert items.status_code == 500 and items.json()["error"]["code"] == "corrupt_record"
        assert turn(bob, server.url, "bob is still served") == ROUND_ANSWERS[0]
        alice.post(f"{server.url}/clear_context")
        assert turn(alice, server.url, "a new conversation works") == ROUND_ANSWERS[0]
        assert httpx.get(f"{server.url}/health").status_code == 200
