"""The page's Markdown renderer, run in the browser: the HTML it builds, and that model text can never become markup."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.browser

CASES = [
    ("plain <b>text</b> & more", "<p>plain &lt;b&gt;text&lt;/b&gt; &amp; more</p>"),
    ("line one\nline two\n\nnext paragraph", "<p>line one<br>line two</p><p>next paragraph</p>"),
    (
        "**bold** and *italic* and _under_ and ~~gone~~",
        "<p><strong>bold</strong> and <em>italic</em> and <em>under</em> and <del>gone</del></p>",
    ),
    ("snake_case_name stays", "<p>snake_case_name stays</p>"),
    ("use `a < b` here", "<p>use <code>a &lt; b</code> here</p>"),
    ("`**not bold**`", "<p><code>**not bold**</code></p>"),
    ("- one\n- **two**\n* three", "<ul><li>one</li><li><strong>two</strong></li><li>three</li></ul>"),
    ("3. c\n4. d", '<ol start="3"><li>c</li><li>d</li></ol>'),
    ("1. a\n   continued\n2. b", "<ol><li>a<br>continued</li><li>b</li></ol>"),
    ("# Title\n### Small", "<h3>Title</h3><h5>Small</h5>"),
    ("> quoted *text*\n> more", "<blockquote><p>quoted <em>text</em><br>more</p></blockquote>"),
    ("a\n\n---\n\nb", "<p>a</p><hr><p>b</p>"),
    (
        "```python\nif a < b:\n    print('<x>')\n```",
        '<pre data-lang="python"><code>if a &lt; b:\n    print(&#39;&lt;x&gt;&#39;)</code></pre>',
    ),
    ("```\nunterminated **code", "<pre><code>unterminated **code</code></pre>"),
    ("~~~\n```\n~~~", "<pre><code>```</code></pre>"),
    (
        "[site](https://example.com/a?b=1&c=2)",
        '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">site</a></p>',
    ),
    ("[bad](javascript:alert(1))", "<p>[bad](javascript:alert(1))</p>"),
    ("[bad](data:text/html,x)", "<p>[bad](data:text/html,x)</p>"),
    (
        '[q](https://x.test/"onmouseover="alert)',
        '<p><a href="https://x.test/&quot;onmouseover=&quot;alert" target="_blank" rel="noopener noreferrer">q</a></p>',
    ),
    ("\u0000code\u00000\u0000", "<p>code0</p>"),
]


@pytest.fixture
def page(open_page: Any, echo_server: Any) -> Any:
    return open_page(echo_server).page


@pytest.mark.parametrize(("source", "html"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_render(page: Any, source: str, html: str) -> None:
    assert page.evaluate("(s) => window.ChatStreamUI.renderMarkdown(s)", source) == html


HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    '<a href="javascript:window.__pwned = 3">x</a>',
    "```\n</code></pre><img src=x onerror=window.__pwned=4>\n```",
    "`</code><img src=x onerror=window.__pwned=5>`",
    "**<svg onload=window.__pwned=6>**",
    "- <iframe src=javascript:window.__pwned=7>",
    "[<img src=x onerror=window.__pwned=8>](https://example.com)",
]


def test_hostile_text_never_becomes_markup(page: Any) -> None:
    rendered = page.evaluate(
        """(inputs) => inputs.map((s) => {
             const box = document.createElement('div');
             box.innerHTML = window.ChatStreamUI.renderMarkdown(s);
             document.body.appendChild(box);
             const tags = [...box.querySelectorAll('*')].map((n) => n.tagName.toLowerCase());
             const attrs = [...box.querySelectorAll('*')].flatMap((n) => [...n.attributes].map((a) => a.name));
             box.remove();
             return {tags, attrs};
           })""",
        HOSTILE,
    )
    allowed_tags = {"p", "pre", "code", "strong", "em", "ul", "li", "a", "br"}
    for source, found in zip(HOSTILE, rendered, strict=True):
        assert set(found["tags"]) <= allowed_tags, (source, found)
        assert set(found["attrs"]) <= {"href", "target", "rel"}, (source, found)
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
