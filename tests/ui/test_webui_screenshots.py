"""Screenshots of the page at desktop (1280×800) and phone (390×844) width, saved under artifacts/screenshots/.

The page must also stay usable at phone width: nothing wider than the screen, the composer on screen, every control
named for screen readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ui.helpers import DESKTOP, PHONE, promote, send, wait_answer, words

pytestmark = pytest.mark.browser

RICH_ANSWER = """Sure! Here is a small **Python** function that streams words with a delay:

```python
import time

def stream(text, delay=0.05):
    for word in text.split():
        print(word, end=" ", flush=True)
        time.sleep(delay)
```

A few things to note:

- `flush=True` makes each word appear at once.
- The delay is in *seconds*.
- See the [Python docs](https://docs.python.org/3/) for more."""

SIZES = {"desktop": DESKTOP, "phone": PHONE}

UNNAMED_CONTROLS_JS = """() => [...document.querySelectorAll('button, textarea, input, a')]
  .filter((n) => n.offsetParent !== null)
  .filter((n) => {
    const labelled = n.labels && n.labels.length && n.labels[0].textContent.trim();
    const label = n.getAttribute('aria-label') || n.innerText.trim() || labelled;
    return !label;
  })
  .map((n) => n.outerHTML.slice(0, 80))"""


def rich_conversation(page: Any) -> None:
    """One real echo turn, then a Markdown-rich answer served through a route (the echo mock only repeats)."""
    send(page, "Hello! What can you do?")
    wait_answer(page)
    body = "".join(RICH_ANSWER[:end] + "<::EOS::>" for end in range(40, len(RICH_ANSWER), 40)) + RICH_ANSWER
    page.route(
        "**/chat_stream",
        lambda route: route.fulfill(
            status=200,
            content_type="text/plain; charset=utf-8",
            headers={"X-ChatStream-Last-Generated-Message-Id": "screenshot"},
            body=body + "<::EOS::>",
        ),
    )
    send(page, "Show me how to stream words in Python.")
    wait_answer(page)
    page.unroute("**/chat_stream")


def assert_usable(page: Any, width: int) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    box = page.locator("#cs-form").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    assert box["y"] + box["height"] <= page.viewport_size["height"]
    assert page.evaluate(UNNAMED_CONTROLS_JS) == []


@pytest.mark.parametrize("size", list(SIZES))
def test_chat_screenshot(open_page: Any, echo_server: Any, screenshot_dir: Path, size: str) -> None:
    page = open_page(echo_server, viewport=SIZES[size]).page
    rich_conversation(page)
    assert page.locator(".cs-msg-ai pre code").count() == 1
    assert_usable(page, SIZES[size]["width"])
    page.screenshot(path=str(screenshot_dir / f"{size}-chat.png"))
    send(page, words(120))
    page.wait_for_selector(".cs-msg-ai[data-state=streaming] .cs-bubble p")
    assert page.locator("#cs-stop").is_visible()
    page.screenshot(path=str(screenshot_dir / f"{size}-streaming.png"))
    page.click("#cs-stop")
    wait_answer(page, "stopped")


@pytest.mark.parametrize("size", list(SIZES))
def test_developer_panel_screenshot(open_page: Any, dev_server: Any, screenshot_dir: Path, size: str) -> None:
    page = open_page(dev_server, viewport=SIZES[size]).page
    send(page, "What is the capital of France?")
    wait_answer(page)
    promote(page)
    page.click("#cs-dev-toggle")
    page.wait_for_selector("[data-load=running] .cs-load-value")
    page.wait_for_function("document.getElementById('cs-temperature').value !== ''")
    panel = page.locator("#cs-dev").bounding_box()
    assert panel is not None and panel["x"] + panel["width"] <= SIZES[size]["width"] + 0.5
    assert page.evaluate(UNNAMED_CONTROLS_JS) == []
    page.screenshot(path=str(screenshot_dir / f"{size}-developer-panel.png"))


def test_japanese_and_busy_screenshot(open_page: Any, echo_server: Any, screenshot_dir: Path) -> None:
    page = open_page(echo_server, locale="ja-JP", viewport=PHONE).page
    send(page, "日本語で答えてください。")
    wait_answer(page)
    page.route(
        "**/chat_stream",
        lambda route: route.fulfill(status=429, content_type="application/json", body='{"error": "too_many_requests"}'),
    )
    send(page, "もう一度お願いします。")
    answer = wait_answer(page, "busy")
    assert answer.locator(".cs-retry").inner_text() == "再試行"
    assert_usable(page, PHONE["width"])
    page.screenshot(path=str(screenshot_dir / "phone-japanese-busy.png"))
