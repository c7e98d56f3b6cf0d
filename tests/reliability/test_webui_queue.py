"""The web UI tells a waiting user its place in line: with the only slot busy and another request waiting, a message
sent from the page shows "1 ahead of you" until its answer starts (Debian's chromium through Playwright)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.servers import AGENT, REPO_ROOT, ServerProcess, mock_serve, serve
from tests.ui.helpers import send, wait_answer

pytestmark = [pytest.mark.reliability, pytest.mark.browser]

SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
OPTIONS = ("--mock-type", "long", "--mock-time-per-token", "0.05", "--max-concurrency", "1", "--max-queue", "4")


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[ServerProcess]:
    with serve(mock_serve(*OPTIONS), tmp_path) as server:
        yield server


class HeldStream(threading.Thread):
    """A /chat_stream request (no cookie, so it counts by address, as the page's first message) held open."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()

    def run(self) -> None:
        with (
            httpx.Client(base_url=self.url, timeout=60) as client,
            client.stream("POST", "/chat_stream", json={"user_input": "hold"}) as response,
        ):
            for _ in response.iter_raw():
                if self.stop.is_set():
                    return


def load(url: str) -> dict[str, Any]:
    return httpx.get(url + "/get_load", headers=AGENT).json()["chatstream_workers"][0]


def test_a_waiting_message_shows_its_place_in_line(open_page: Any, busy: ServerProcess) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    held = [HeldStream(busy.url), HeldStream(busy.url)]  # one runs, one waits
    for stream in held:
        stream.start()
    try:
        page = open_page(busy).page
        send(page, "am I next?")
        note = page.wait_for_selector(".cs-msg-ai[data-state=streaming] .cs-status-note[data-queue]", timeout=15_000)
        assert note.inner_text() == "Waiting in line: 1 ahead of you"
        assert load(busy.url)["waiting"] == 2
        page.screenshot(path=str(SCREENSHOTS / "queue_position.png"))
    finally:
        for stream in held:
            stream.stop.set()
    page.wait_for_selector(".cs-msg-ai[data-state=streaming] .cs-bubble p", timeout=30_000)  # its answer starts
    assert page.locator(".cs-status-note[data-queue]").count() == 0
    page.click("#cs-stop")
    wait_answer(page, "stopped")
