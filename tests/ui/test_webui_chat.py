"""The chat page against a real ``chatstream serve --mock`` (echo): streaming, turns, stop, regenerate, clear, like."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ui.helpers import send, wait_answer, words

pytestmark = pytest.mark.browser

# Records every text the last answer shows while it streams.
RECORD_STREAM_JS = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('.cs-msg-ai:not(.cs-welcome) .cs-bubble');
    const last = answers[answers.length - 1];
    if (last) window.__seen.push(last.textContent);
  }).observe(document.getElementById('cs-messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_message_streams_into_the_page(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    page.evaluate(RECORD_STREAM_JS)
    text = words(30)
    send(page, text)
    page.wait_for_selector("#cs-stop:not([hidden])")
    assert page.get_attribute("#cs-messages", "aria-busy") == "true"
    assert page.is_hidden("#cs-send")
    answer = wait_answer(page)
    assert answer.locator(".cs-bubble").inner_text() == text
    assert page.locator(".cs-msg-user .cs-bubble").inner_text() == text
    seen = [s for s in page.evaluate("window.__seen") if s]
    partial = {s for s in seen if text.startswith(s) and s != text}
    assert len(partial) >= 3, f"expected the answer to grow in steps, saw {seen}"
    assert page.is_hidden("#cs-stop") and page.is_visible("#cs-send")
    assert page.get_attribute("#cs-messages", "aria-busy") == "false"
    assert page.input_value("#cs-input") == ""


def test_shift_enter_inserts_a_newline_and_ime_enter_does_not_send(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    page.fill("#cs-input", "first line")
    page.press("#cs-input", "Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#cs-input") == "first line\nsecond line"
    # An Enter that confirms an IME conversion arrives with isComposing (or keyCode 229): it must not send.
    for init in ({"key": "Enter", "isComposing": True}, {"key": "Enter", "keyCode": 229}):
        page.evaluate(
            "(init) => document.getElementById('cs-input').dispatchEvent("
            "new KeyboardEvent('keydown', {...init, bubbles: true, cancelable: true}))",
            init,
        )
    page.wait_for_timeout(200)
    assert page.locator(".cs-msg-user").count() == 0
    page.press("#cs-input", "Enter")
    wait_answer(page)
    assert page.locator(".cs-msg-user .cs-bubble").inner_text() == "first line\nsecond line"


def test_multi_turn_conversation(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    send(page, "first question")
    first = wait_answer(page)
    send(page, "second question")
    page.wait_for_function("document.querySelectorAll('.cs-msg-ai:not(.cs-welcome)').length === 2")
    second = wait_answer(page)
    roles = page.eval_on_selector_all(".cs-msg", "nodes => nodes.map(n => n.dataset.role)")
    assert roles[-4:] == ["user", "assistant", "user", "assistant"]
    assert first.locator(".cs-bubble").inner_text() == "first question"
    assert second.locator(".cs-bubble").inner_text() == "second question"
    first_id, second_id = first.get_attribute("data-message-id"), second.get_attribute("data-message-id")
    assert first_id and second_id and first_id != second_id
    # only the latest answer can be regenerated
    assert first.locator('[data-action="regenerate"]').count() == 0
    assert second.locator('[data-action="regenerate"]').count() == 1


def test_stop_keeps_the_partial_answer(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    text = words(120)
    send(page, text)
    page.wait_for_function(
        "() => { const b = document.querySelector('.cs-msg-ai:not(.cs-welcome) .cs-bubble');"
        " return b && b.textContent.split(' ').length >= 5; }"
    )
    page.click("#cs-stop")
    answer = wait_answer(page, "stopped")
    partial = answer.locator(".cs-bubble").inner_text()
    assert text.startswith(partial) and 5 <= len(partial.split(" ")) < 120
    assert answer.locator(".cs-status-note").inner_text() == "Stopped"
    page.wait_for_timeout(400)
    assert answer.locator(".cs-bubble").inner_text() == partial, "the answer kept growing after stop"
    assert page.is_visible("#cs-send") and page.is_hidden("#cs-stop")
    # the server is free again: the next turn works
    send(page, "after stop")
    assert wait_answer(page).locator(".cs-bubble").inner_text() == "after stop"


def test_escape_stops_generation(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    send(page, words(120))
    page.wait_for_selector(".cs-msg-ai[data-state=streaming] .cs-bubble p")
    page.press("#cs-input", "Escape")
    assert wait_answer(page, "stopped").locator(".cs-status-note").inner_text() == "Stopped"


def test_regenerate_replaces_the_last_answer(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    bodies: list[Any] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat_stream") else None)
    send(page, "tell me again")
    answer = wait_answer(page)
    first_id = answer.get_attribute("data-message-id")
    answer.locator('[data-action="regenerate"]').click()
    page.wait_for_function(
        "(old) => { const a = document.querySelector('.cs-msg-ai:not(.cs-welcome)');"
        " return a.dataset.state === 'done' && a.dataset.messageId && a.dataset.messageId !== old; }",
        arg=first_id,
    )
    assert bodies == [{"user_input": "tell me again"}, {"user_input": None, "regenerate": True}]
    assert page.locator(".cs-msg-ai:not(.cs-welcome)").count() == 1
    assert page.locator(".cs-msg-user").count() == 1
    assert answer.locator(".cs-bubble").inner_text() == "tell me again"


def test_clear_conversation(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    send(page, "remember this")
    wait_answer(page)
    with page.expect_response(lambda r: r.url.endswith("/clear_context")) as cleared:
        page.click("#cs-clear")
    assert cleared.value.json() == {"success": True, "message": "Context successfully cleared"}
    page.wait_for_function("document.querySelectorAll('.cs-msg-user').length === 0")
    assert page.locator(".cs-msg-ai:not(.cs-welcome)").count() == 0
    assert page.evaluate("document.activeElement.id") == "cs-input"
    # a second clear finds no context on the server, and the page still works
    with page.expect_response(lambda r: r.url.endswith("/clear_context")) as again:
        page.click("#cs-clear")
    assert again.value.json()["success"] is False
    send(page, "fresh start")
    assert wait_answer(page).locator(".cs-bubble").inner_text() == "fresh start"


def test_like_and_dislike_send_feedback(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    send(page, "rate me")
    answer = wait_answer(page)
    message_id = answer.get_attribute("data-message-id")
    like, dislike = answer.locator('[data-action="like"]'), answer.locator('[data-action="dislike"]')
    with page.expect_request(lambda r: r.url.endswith("/set_feedback")) as sent:
        like.click()
    assert sent.value.post_data_json == {"is_like": True, "message_id": message_id, "form_data": None}
    assert sent.value.response().json()["success"] is True
    page.wait_for_function("(el) => el.getAttribute('aria-pressed') === 'true'", arg=like.element_handle())
    assert dislike.get_attribute("aria-pressed") == "false"
    with page.expect_request(lambda r: r.url.endswith("/set_feedback")) as sent_again:
        dislike.click()
    assert sent_again.value.post_data_json["is_like"] is False
    page.wait_for_function("(el) => el.getAttribute('aria-pressed') === 'true'", arg=dislike.element_handle())
    assert like.get_attribute("aria-pressed") == "false"


def test_japanese_round_trip(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server, locale="ja-JP").page
    assert page.get_attribute("html", "lang") == "ja"
    assert page.get_attribute("#cs-input", "placeholder") == "メッセージを入力…"
    assert page.get_attribute("#cs-clear", "aria-label") == "会話をクリア"
    text = "こんにちは、世界。日本語の応答を確かめます。"
    page.click("#cs-input")
    page.keyboard.insert_text(text)
    page.press("#cs-input", "Enter")
    answer = wait_answer(page)
    assert answer.locator(".cs-bubble").inner_text() == text
    assert answer.locator('[data-action="regenerate"]').inner_text() == "再生成"


def test_script_in_an_answer_is_shown_as_text(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    text = (
        '<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> **bold** [x](javascript:alert(1))'
    )
    send(page, text)
    answer = wait_answer(page)
    bubble = answer.locator(".cs-bubble")
    shown = bubble.inner_text()
    assert "<script>window.__pwned = 1</script>" in shown
    assert '<img src=x onerror="window.__pwned = 2">' in shown
    assert "[x](javascript:alert(1))" in shown
    assert bubble.locator("script, img, a").count() == 0
    assert bubble.locator("strong").inner_text() == "bold"
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
