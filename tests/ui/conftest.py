"""Browser-test fixtures: real mock ChatStream servers on 127.0.0.1 and Debian's chromium driven by Playwright.

Servers are subprocesses (``python -m chatstream serve --mock ...``, or ``tests/ui/serve_ui.py`` where a client role
with a pass phrase is needed), started on a free port, polled until GET / answers, and killed in teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import free_port
from tests.ui.helpers import DESKTOP

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = REPO_ROOT / "artifacts" / "screenshots"
CHROMIUM = os.environ.get("CHATSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_TIMEOUT_SEC = 90.0

DEV_WEB_UI_PARAMS = (
    '{"title": "Dev <Chat>", "welcomeMessage": "Welcome to **the dev server**.", '
    '"style_opts": {"show_human_icon": true, "button_label_regenerate": "Try again", '
    '"button_label_stop_generating": "Halt", "label_input_placeholder": "Ask the mock"}}'
)


@dataclass
class LiveServer:
    """A server subprocess listening on ``url``."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _wait_until_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    pytest.fail(f"server did not answer GET / within {STARTUP_TIMEOUT_SEC} s:\n{server.log()}")


@contextlib.contextmanager
def run_server(args: list[str], log_path: Path) -> Iterator[LiveServer]:
    """Start ``python <args> --port N`` on a free port; stop it (terminate, then kill) when the block ends."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args, "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = LiveServer(url=f"http://127.0.0.1:{port}/", process=process, log_path=log_path)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _cli(*options: str) -> list[str]:
    return ["-m", "chatstream", "serve", "--mock", *options]


@pytest.fixture(scope="session")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``chatstream serve --mock`` echoing the user's message, a few tokens per 100 ms."""
    log = tmp_path_factory.mktemp("echo_server") / "server.log"
    with run_server(_cli("--mock-type", "echo", "--mock-time-per-token", "0.03"), log) as server:
        yield server


@pytest.fixture(scope="session")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``chatstream serve --mock`` with one slot, no waiting queue and a slow, long answer."""
    log = tmp_path_factory.mktemp("busy_server") / "server.log"
    options = ("--mock-type", "long", "--mock-time-per-token", "0.05", "--max-concurrency", "1", "--max-queue", "0")
    with run_server(_cli(*options), log) as server:
        yield server


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The mock server of serve_ui.py: a developer role reached by a pass phrase, and custom web_ui_params."""
    log = tmp_path_factory.mktemp("dev_server") / "server.log"
    script = str(Path(__file__).with_name("serve_ui.py"))
    args = [script, "--mock-type", "echo", "--mock-time-per-token", "0.05", "--web-ui-params", DEV_WEB_UI_PARAMS]
    with run_server(args, log) as server:
        yield server


@pytest.fixture(scope="package")
def chromium() -> Iterator[Any]:
    """Debian's chromium, headless, through Playwright (Playwright's own browser download is not used).

    One per package (tests/ui, and tests/reliability, whose conftest imports it), stopped when the package's tests
    are done: while Playwright's sync API is started, it marks its event loop as running in the main thread between
    calls, and every asyncio test after it would fail ("Runner.run() cannot be called from a running event loop").
    A session-scoped browser leaked that loop from tests/reliability into tests/server and all that follows.
    """
    if not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None:
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or set CHATSTREAM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageSession:
    """One browser context (its own cookies, so its own server session) and its page, with JS errors recorded."""

    context: Any
    page: Any
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def open_page(chromium: Any) -> Iterator[Callable[..., PageSession]]:
    """``open_page(server, locale="en-US", viewport=DESKTOP)``: a fresh page on the chat (new cookies, new session).

    The test fails if the page raised a JavaScript error.
    """
    sessions: list[PageSession] = []

    def _open(server: LiveServer, locale: str = "en-US", viewport: dict[str, int] | None = None) -> PageSession:
        context = chromium.new_context(locale=locale, viewport=viewport or DESKTOP)
        context.set_default_timeout(15_000)
        page = context.new_page()
        session = PageSession(context=context, page=page)
        page.on("pageerror", lambda error: session.errors.append(str(error)))
        page.goto(server.url)
        page.wait_for_selector("#cs-input")
        sessions.append(session)
        return session

    yield _open
    for session in sessions:
        session.context.close()
    errors = [error for session in sessions for error in session.errors]
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    """Where the tests save screenshots (CI keeps them as artifacts)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR
