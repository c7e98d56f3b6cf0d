"""The page's files as shipped (no browser needed): placeholders where the server expects them, nothing external."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from chatstream.ui import PARAMS_PLACEHOLDER, STATIC_FILES, TITLE_PLACEHOLDER


def static_text(name: str) -> str:
    return (resources.files("chatstream.ui") / "static" / name).read_text(encoding="utf-8")


def test_index_has_the_placeholders_in_place() -> None:
    page = static_text("index.html")
    assert page.count(PARAMS_PLACEHOLDER) == 1
    assert f'<script id="chatstream-params" type="application/json">{PARAMS_PLACEHOLDER}</script>' in page
    assert f"<title>{TITLE_PLACEHOLDER}</title>" in page
    assert '<script src="chatstream.js"></script>' in page  # relative: works under a path prefix


@pytest.mark.parametrize("name", STATIC_FILES)
def test_nothing_is_loaded_from_elsewhere(name: str) -> None:
    text = static_text(name)
    # no CDN, no web fonts, no absolute asset URLs: the page works offline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text
    assert not re.search(r"""fetch\(\s*["'](https?:)?//""", text)


def test_script_never_assigns_model_text_to_inner_html() -> None:
    script = static_text("chatstream.js")
    assignments = re.findall(r"\.innerHTML\s*=\s*([^;]+);", script)
    # only the Markdown renderer's output (which escapes first) and constant icon markup may be assigned
    assert sorted(assignments) == ["ICONS[name]", "renderMarkdown(text)"]
