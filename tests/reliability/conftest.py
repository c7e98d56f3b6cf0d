"""The reliability suite: real servers on 127.0.0.1 under overload, disconnects, fuzzing, oversized bodies, SIGTERM.

Every test bounds its own waits, so the suite ends in bounded time; each module is marked ``reliability``
(``-m "not reliability"`` leaves it out). The browser fixtures come from the web UI tests.
"""

from __future__ import annotations

from tests.ui.conftest import chromium, open_page  # noqa: F401  (fixtures of the queue-position UI test)
