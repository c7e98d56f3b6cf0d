"""Acceptance: the conversations sidebar in Debian's chromium against a real ``chatstream serve --mock`` whose data
lives in a temp dir (SQLite): create two conversations, switch, rename one, delete one, reload, restart the server,
and everything is as the user left it. Also the drawer on a phone and the exports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import LiveServer, run_server
from tests.ui.helpers import DESKTOP, PHONE, send, wait_answer

pytestmark = pytest.mark.browser

SIDEBAR_TITLES_JS = "() => [...document.querySelectorAll('#cs-conv-list .cs-conv-open')].map((b) => b.textContent)"
USER_TEXTS_JS = "() => [...document.querySelectorAll('.cs-msg-user .cs-bubble')].map((b) => b.textContent)"


def _serve(data_dir: Path, log: Path) -> Any:
    args = ["-m", "chatstream", "serve", "--mock", "--mock-type", "echo", "--mock-time-per-token", "0.01"]
    return run_server([*args, "--data-dir", str(data_dir)], log)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    with _serve(data_dir, tmp_path / "first.log") as live:
        yield live


@pytest.fixture
def browser_context(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(locale="en-US", viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(15_000)
    errors: list[str] = []
    context.on("weberror", lambda error: errors.append(str(error.error)))
    yield context
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def titles(page: Any) -> list[str]:
    return list(page.evaluate(SIDEBAR_TITLES_JS))


def wait_titles(page: Any, expected: list[str]) -> None:
    page.wait_for_function(f"(want) => JSON.stringify(({SIDEBAR_TITLES_JS})()) === JSON.stringify(want)", arg=expected)


def open_chat(context: Any, url: str) -> Any:
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#cs-side:not([hidden])")
    return page


def conversation_item(page: Any, title: str) -> Any:
    return page.locator("#cs-conv-list .cs-conv", has=page.locator(".cs-conv-open", has_text=title))


def test_conversations_survive_a_reload_and_a_restart(
    browser_context: Any, server: LiveServer, data_dir: Path, tmp_path: Path
) -> None:
    page = open_chat(browser_context, server.url)
    assert titles(page) == []
    send(page, "alpha question")
    wait_answer(page)
    wait_titles(page, ["alpha question"])
    page.click("#cs-new-chat")
    page.wait_for_function("document.querySelectorAll('.cs-msg-user').length === 0")
    send(page, "beta question")
    wait_answer(page)
    wait_titles(page, ["beta question", "alpha question"])  # newest first
    assert page.get_attribute("#cs-conv-list .cs-conv:first-child", "data-current") == "true"

    conversation_item(page, "alpha question").locator(".cs-conv-open").click()  # switch
    page.wait_for_function(f"JSON.stringify(({USER_TEXTS_JS})()) === JSON.stringify(['alpha question'])")
    assert wait_answer(page).locator(".cs-bubble").inner_text() == "alpha question"
    assert conversation_item(page, "alpha question").get_attribute("data-current") == "true"

    _rename(page, "alpha question", "Renamed alpha")
    wait_titles(page, ["beta question", "Renamed alpha"])
    _delete(page, "beta question", confirm=False)
    assert titles(page) == ["beta question", "Renamed alpha"]  # cancelled: nothing happened
    _delete(page, "beta question", confirm=True)
    wait_titles(page, ["Renamed alpha"])

    page.reload()
    _expect_as_left(page)
    page.close()
    server.process.terminate()
    server.process.wait(timeout=15)
    with _serve(data_dir, tmp_path / "second.log") as restarted:
        page = open_chat(browser_context, restarted.url)  # another port, the same cookie: the same user
        _expect_as_left(page)
        send(page, "gamma question")  # the conversation goes on
        wait_answer(page)
        page.wait_for_function(f"({USER_TEXTS_JS})().length === 2")
        page.reload()
        page.wait_for_function(f'JSON.stringify(({USER_TEXTS_JS})()) === \'["alpha question","gamma question"]\'')


def _expect_as_left(page: Any) -> None:
    wait_titles(page, ["Renamed alpha"])
    page.wait_for_function(f"JSON.stringify(({USER_TEXTS_JS})()) === JSON.stringify(['alpha question'])")
    assert page.get_attribute("#cs-conv-list .cs-conv", "data-current") == "true"
    answer = wait_answer(page)
    assert answer.locator(".cs-bubble").inner_text() == "alpha question"
    assert answer.locator('[data-action="regenerate"]').count() == 1  # the restored answer can be regenerated


def _rename(page: Any, title: str, new_title: str) -> None:
    conversation_item(page, title).locator('[data-action="more"]').click()
    page.click('.cs-conv-menu [data-action="rename"]')
    page.fill(".cs-conv-rename", new_title)
    page.press(".cs-conv-rename", "Enter")


def _delete(page: Any, title: str, *, confirm: bool) -> None:
    conversation_item(page, title).locator('[data-action="more"]').click()
    page.click('.cs-conv-menu [data-action="delete"]')
    page.wait_for_selector("#cs-confirm[open]")
    assert title in page.locator("#cs-confirm-text").inner_text()
    page.click("#cs-confirm-ok" if confirm else "#cs-confirm-cancel")
    page.wait_for_selector("#cs-confirm:not([open])", state="attached")


def test_exports_download_markdown_and_json(browser_context: Any, server: LiveServer) -> None:
    page = open_chat(browser_context, server.url)
    send(page, "export this chat")
    wait_answer(page)
    wait_titles(page, ["export this chat"])
    for action, suffix, needle in (("export-markdown", ".md", "# export this chat"), ("export-json", ".json", '"id"')):
        conversation_item(page, "export this chat").locator('[data-action="more"]').click()
        with page.expect_download() as download:
            page.click(f'.cs-conv-menu [data-action="{action}"]')
        assert download.value.suggested_filename == f"export this chat{suffix}"  # filename*: the title
        assert needle in Path(download.value.path()).read_text(encoding="utf-8")


def test_the_sidebar_is_a_drawer_on_phones(browser_context: Any, server: LiveServer) -> None:
    page = browser_context.new_page()
    page.set_viewport_size(PHONE)
    page.goto(server.url)
    page.wait_for_selector("#cs-side-toggle:not([hidden])")
    send(page, "first on the phone")
    wait_answer(page)
    assert page.is_hidden("#cs-conv-list")
    page.click("#cs-side-toggle")
    assert page.get_attribute("#cs-side-toggle", "aria-expanded") == "true"
    assert page.evaluate("document.activeElement.id") == "cs-new-chat"
    page.click("#cs-new-chat")  # closes the drawer and starts over
    page.wait_for_function("document.querySelectorAll('.cs-msg-user').length === 0")
    assert page.is_hidden("#cs-conv-list")
    page.click("#cs-side-toggle")
    page.wait_for_selector("#cs-conv-list .cs-conv-open")
    page.keyboard.press("Escape")
    assert page.is_hidden("#cs-side") and page.evaluate("document.activeElement.id") == "cs-side-toggle"
    page.click("#cs-side-toggle")
    page.click("#cs-conv-list .cs-conv-open")  # switching closes the drawer too
    page.wait_for_function(f"({USER_TEXTS_JS})().length === 1")
    assert page.is_hidden("#cs-scrim")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
