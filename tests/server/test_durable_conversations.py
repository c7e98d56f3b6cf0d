"""Acceptance: conversations survive ``kill -9`` (SQLite in the data dir) and follow a user across two server
processes that share one redis-server; both with real ``chatstream serve --mock`` processes and an httpx client
whose cookie jar is the browser."""

from __future__ import annotations

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
