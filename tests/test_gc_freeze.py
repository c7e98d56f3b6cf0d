"""The service freezes the startup heap out of the garbage collector once the engine has started (once per process).

Each case runs in a fresh interpreter: the test process itself has long since frozen its heap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, sys
    from chatstream import ChatStream
    from chatstream.service import freeze_gc_heap

    async def main(freeze):
        before = gc.get_freeze_count()
        first = ChatStream(use_mock_response=True, freeze_gc_heap=freeze)
        await first.startup()
        after_first = gc.get_freeze_count()
        second = ChatStream(use_mock_response=True, freeze_gc_heap=freeze)
        await second.startup()
        await first.shutdown()
        await second.shutdown()
        print(json.dumps({
            "before": before,
            "after_first": after_first,
            "after_second": gc.get_freeze_count(),
            "again": freeze_gc_heap(),
        }))

    asyncio.run(main(sys.argv[1] == "on"))
    """
)


def _run(mode: str) -> dict[str, int | bool]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_startup_freezes_the_heap_once_per_process() -> None:
    counts = _run("on")
    assert counts["before"] == 0
    assert counts["after_first"] > 10_000  # the libraries imported by then, at least
    # the second service found it frozen: nothing was added (frozen objects freed since only lower the count)
    assert counts["after_second"] <= counts["after_first"]
    assert counts["again"] is False


def test_freeze_gc_heap_false_leaves_the_collector_alone() -> None:
    counts = _run("off")
    assert counts["after_first"] == counts["after_second"] == 0
    assert counts["again"] is True  # the helper itself still freezes when called
