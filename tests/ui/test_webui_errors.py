"""Busy and error states: a real server with one slot and no queue, plus replies injected with Playwright routes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.ui.helpers import send, wait_answer, words

pytestmark = pytest.mark.browser


def alert_of(answer: Any) -> Any:
    return answer.locator(".cs-alert")


def test_too_many_requests_shows_a_message_and_a_retry_button(open_page: Any, busy_server: Any) -> None:
    first = open_page(busy_server).page
    second = open_page(busy_server).page  # another browser: its own session
    send(first, "tell me a long story")
    first.wait_for_selector(".cs-msg-ai[data-state=streaming] .cs-bubble p")
    with second.expect_response(lambda r: r.url.endswith("/chat_stream")) as rejected:
        send(second, "me too")
    assert rejected.value.status in (200, 429)
    assert rejected.value.json() == {"error": "too_many_requests"}
    answer = wait_answer(second, "busy")
    assert alert_of(answer).get_attribute("role") == "alert"
    assert alert_of(answer).locator(".cs-alert-text").inner_text().startswith("The server is busy right now.")
    shown = answer.inner_text()
    assert "too_many_requests" not in shown and "{" not in shown
    # the slot frees up once the first user stops; retry then streams the answer
    first.click("#cs-stop")
    wait_answer(first, "stopped")
    with second.expect_request(lambda r: r.url.endswith("/chat_stream")) as retried:
        answer.locator(".cs-retry").click()
    assert retried.value.post_data_json == {"user_input": "me too"}
    second.wait_for_selector(".cs-msg-ai[data-state=streaming] .cs-bubble p")
    assert second.locator(".cs-msg-user").count() == 1
    second.click("#cs-stop")
    wait_answer(second, "stopped")


def _route_chat(page: Any, **reply: Any) -> None:
    page.route("**/chat_stream", lambda route: route.fulfill(**reply))


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            {"status": 200, "content_type": "application/json", "body": '{"error": "too_many_requests"}'},
            "The server is busy right now. Please try again in a moment.",
        ),
        (
            {
                "status": 429,
                "content_type": "application/json",
                "headers": {"Retry-After": "7"},
                "body": '{"error": "too_many_requests"}',
            },
            "The server is busy right now. Please try again in 7 seconds.",
        ),
        (
            {"status": 500, "content_type": "text/plain", "body": "Internal Server Error"},
            "The server ran into an error (HTTP 500). Please try again.",
        ),
        (
            {
                "status": 400,
                "content_type": "application/json",
                "body": json.dumps({"error": "bad_request", "detail": "user_input must be a string"}),
            },
            "The server rejected the request: user_input must be a string",
        ),
        (
            {
                "status": 403,
                "content_type": "application/json",
                "body": '{"success": false, "message": "Forbidden", "detail": "Denied on role layer."}',
            },
            "This action is not allowed for your session (403).",
        ),
    ],
    ids=["busy-200", "busy-429", "server-500", "bad-request-400", "forbidden-403"],
)
def test_error_replies_are_shown_as_errors(
    open_page: Any, echo_server: Any, reply: dict[str, Any], expected: str
) -> None:
    page = open_page(echo_server).page
    _route_chat(page, **reply)
    send(page, "hello")
    answer = wait_answer(page, "busy", "error")
    assert alert_of(answer).locator(".cs-alert-text").inner_text() == expected
    assert answer.locator(".cs-retry").is_visible()
    assert answer.locator('[data-action="like"]').count() == 0


def test_network_error_then_retry_succeeds(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    page.route("**/chat_stream", lambda route: route.abort("connectionrefused"))
    send(page, "are you there")
    answer = wait_answer(page, "error")
    assert alert_of(answer).inner_text().startswith("Could not reach the server.")
    page.unroute("**/chat_stream")
    answer.locator(".cs-retry").click()
    assert wait_answer(page).locator(".cs-bubble").inner_text() == "are you there"


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        ("Hel<::EOS::>Hello wor<::EOS::>Hello world<::EOS::>", "Hello world"),
        ("A<::EOS::>AB", "A"),  # the incomplete last segment is not shown
        ("", ""),
    ],
    ids=["merged-segments", "incomplete-tail", "empty"],
)
def test_native_stream_segments(open_page: Any, echo_server: Any, body: str, shown: str) -> None:
    page = open_page(echo_server).page
    _route_chat(page, status=200, content_type="text/plain; charset=utf-8", body=body)
    send(page, "x")
    answer = wait_answer(page)
    bubble_text = answer.locator(".cs-bubble").inner_text()
    assert bubble_text == shown
    if not shown:
        assert answer.locator(".cs-status-note").inner_text() == "(empty answer)"


def test_long_answer_under_chunked_transfer(open_page: Any, echo_server: Any) -> None:
    page = open_page(echo_server).page
    text = words(80)
    send(page, text)
    answer = wait_answer(page)
    assert answer.locator(".cs-bubble").inner_text() == text
