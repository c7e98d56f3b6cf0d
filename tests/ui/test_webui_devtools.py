"""The developer panel after a pass-phrase promotion, and the page options from ``web_ui_params``."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.ui.helpers import promote, send, wait_answer, words
from tests.ui.serve_ui import DEV_PASS_PHRASE

pytestmark = pytest.mark.browser

FETCH_JSON_JS = "async (path) => (await fetch(path, {credentials: 'same-origin'})).json()"


def test_web_ui_params_shape_the_page(open_page: Any, dev_server: Any) -> None:
    page = open_page(dev_server).page
    assert page.title() == "Dev <Chat>"
    assert page.locator("#cs-title").inner_text() == "Dev <Chat>"
    welcome = page.locator(".cs-welcome .cs-bubble")
    assert welcome.inner_text() == "Welcome to the dev server."
    assert welcome.locator("strong").inner_text() == "the dev server"
    assert page.get_attribute("#cs-input", "placeholder") == "Ask the mock"
    assert page.locator("#cs-stop-label").text_content() == "Halt"
    send(page, "hello")
    answer = wait_answer(page)
    assert answer.locator('[data-action="regenerate"]').inner_text() == "Try again"
    assert page.locator(".cs-msg-user .cs-avatar").count() == 1  # show_human_icon
    assert answer.locator(".cs-avatar").count() == 1  # show_ai_icon defaults to true


def test_developer_panel_after_pass_phrase(open_page: Any, dev_server: Any) -> None:
    page = open_page(dev_server).page
    assert page.is_hidden("#cs-dev-toggle")
    assert page.evaluate(FETCH_JSON_JS, "get_prompt")["message"] == "Forbidden"  # the default user may not
    send(page, "hello developer")
    wait_answer(page)
    with page.expect_response(lambda r: r.url.endswith("/chat_stream")) as granted:
        answer = promote(page)
    assert granted.value.headers.get("x-chatstream-api-devtool-enabled") == "enabled"
    assert answer.locator(".cs-bubble").inner_text() == "New role: 'developer' has been granted"
    assert DEV_PASS_PHRASE not in page.locator("#cs-messages").inner_text()  # the phrase is masked on screen
    assert answer.locator(".cs-actions button").count() == 0
    page.wait_for_selector("#cs-dev-toggle:not([hidden])")

    page.click("#cs-dev-toggle")
    assert page.get_attribute("#cs-dev-toggle", "aria-expanded") == "true"
    assert page.evaluate("document.activeElement.id") == "cs-dev-title"
    page.wait_for_selector("[data-load=running] .cs-load-value")
    assert page.locator("[data-load=running] .cs-load-value").inner_text() == "0 / 2"
    assert page.locator("[data-load=waiting] .cs-load-value").inner_text() == "0 / 5"
    prompt = page.locator("#cs-prompt")
    page.wait_for_function("document.getElementById('cs-prompt').textContent.includes('hello developer')")
    assert DEV_PASS_PHRASE not in prompt.inner_text()

    _check_generation_params(page)
    _check_live_load(page)

    page.focus("#cs-top-p")
    page.keyboard.press("Escape")
    assert page.is_hidden("#cs-dev")
    assert page.evaluate("document.activeElement.id") == "cs-dev-toggle"
    page.reload()
    page.wait_for_selector("#cs-dev-toggle:not([hidden])")  # remembered for this browser session


def _check_generation_params(page: Any) -> None:
    server = page.evaluate(FETCH_JSON_JS, "get_generation_params")["generation_params"]
    page.wait_for_function(
        "(t) => document.getElementById('cs-temperature').value !== '' && "
        "Number(document.getElementById('cs-temperature').value) === t",
        arg=server["temperature"],
    )
    page.fill("#cs-temperature", "0.5")
    page.fill("#cs-top-k", "20")
    page.click("#cs-params-apply")
    page.wait_for_function("document.getElementById('cs-params-msg').textContent === 'Saved'")
    stored = page.evaluate(FETCH_JSON_JS, "get_generation_params")["generation_params"]
    assert stored["temperature"] == 0.5 and stored["top_k_value"] == 20
    page.fill("#cs-temperature", "3")
    page.click("#cs-params-apply")
    page.wait_for_function("document.getElementById('cs-params-msg').textContent.startsWith('Invalid temperature')")
    assert "cs-bad" in (page.get_attribute("#cs-params-msg", "class") or "")
    page.click("#cs-params-reload")
    page.wait_for_function("document.getElementById('cs-temperature').value === '0.5'")


def _check_live_load(page: Any) -> None:
    send(page, words(80))
    page.wait_for_function("document.querySelector('[data-load=running] .cs-load-value').textContent === '1 / 2'")
    page.click("#cs-stop")
    wait_answer(page, "stopped")
    page.wait_for_function("document.querySelector('[data-load=running] .cs-load-value').textContent === '0 / 2'")


def _with_params(page: Any, server: Any, params: dict[str, Any]) -> None:
    """Serve the real page with other ``web_ui_params`` (the script tag's JSON replaced on the way)."""

    def handle(route: Any) -> None:
        response = route.fetch()
        body = re.sub(
            r'(<script id="chatstream-params" type="application/json">).*?(</script>)',
            lambda m: m.group(1) + json.dumps(params).replace("<", "\\u003c") + m.group(2),
            response.text(),
            flags=re.S,
        )
        route.fulfill(response=response, body=body)

    page.route(server.url, handle)


def test_regenerate_can_be_disabled_and_icons_hidden(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    _with_params(page, echo_server, {"style_opts": {"regenerate_enabled": False, "show_ai_icon": False}})
    page.reload()
    send(page, "no regenerate")
    answer = wait_answer(page)
    assert answer.locator('[data-action="regenerate"]').count() == 0
    assert answer.locator('[data-action="like"]').count() == 1
    assert answer.locator(".cs-avatar").count() == 0


def test_clear_context_on_reload_and_develop_mode(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    _with_params(page, echo_server, {"clearContextOnReload": True, "developMode": True})
    with page.expect_request(lambda r: r.url.endswith("/clear_context") and r.method == "POST"):
        page.reload()
    assert page.is_visible("#cs-dev-toggle")
    page.click("#cs-dev-toggle")
    # the default role may not read the load: the panel says so instead of failing silently
    page.wait_for_function("document.getElementById('cs-load-msg').textContent.length > 0")
    assert page.locator("#cs-load-msg").inner_text() == "This action is not allowed for your session (403)."
