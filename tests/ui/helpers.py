"""Small helpers shared by the browser tests: send a message, wait for an answer's state."""

from __future__ import annotations

from typing import Any

from tests.ui.serve_ui import DEV_PASS_PHRASE

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

ANSWER_STATE_JS = """(states) => {
  const answers = document.querySelectorAll('.cs-msg-ai:not(.cs-welcome)');
  const last = answers[answers.length - 1];
  return Boolean(last) && states.includes(last.dataset.state);
}"""


def send(page: Any, text: str) -> None:
    """Type ``text`` into the message box and press Enter."""
    page.fill("#cs-input", text)
    page.press("#cs-input", "Enter")


def wait_answer(page: Any, *states: str) -> Any:
    """Wait until the latest answer reaches one of ``states`` (default "done"); return a locator pinned to it."""
    page.wait_for_function(ANSWER_STATE_JS, arg=list(states or ("done",)))
    answers = page.locator(".cs-msg-ai:not(.cs-welcome)")
    return answers.nth(answers.count() - 1)


def words(count: int) -> str:
    """``count`` distinct words: the echo mock streams them one by one."""
    return " ".join(f"w{i}" for i in range(count))


def promote(page: Any) -> Any:
    """Type the developer pass phrase of serve_ui.py; return the answer that grants the role."""
    send(page, DEV_PASS_PHRASE)
    return wait_answer(page, "promotion")
