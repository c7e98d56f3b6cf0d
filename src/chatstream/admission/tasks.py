"""Waiting on a request's work without outliving it: a wait the client may abandon, and several streams merged.

Both cancel what is left of the work when they end early (the client gone, the caller cancelled, a stream failed),
so that an admission wait leaves the line and a generation is aborted in its engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

T = TypeVar("T")

DISCONNECT_POLL_SEC = 0.25
"""How often a request that waits (for a slot, or for a whole answer) checks whether its client is still there."""

IsDisconnected = Callable[[], Awaitable[bool]]
"""Answers whether the client has gone (Starlette's ``request.is_disconnected``)."""


async def merge_streams(streams: Sequence[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """The items of several async generators as they come, each with its generator's index. Every generator is
    closed (its request aborted) when the merge ends or is closed; the first exception of one is raised."""
    queue: asyncio.Queue[tuple[int, T] | asyncio.Task[None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        async with aclosing(stream):
            async for item in stream:
                queue.put_nowait((index, item))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    for task in tasks:
        task.add_done_callback(queue.put_nowait)
    try:
        for _ in tasks:
            while not isinstance(entry := await queue.get(), asyncio.Task):
                yield entry
            error = None if entry.cancelled() else entry.exception()
            if error is not None:
                raise error
    finally:
        for task in tasks:
            await _cancel_quietly(task)


async def run_unless_disconnected(
    work: Awaitable[T], is_disconnected: IsDisconnected, on_abandoned: Callable[[T], object] | None = None
) -> T | None:
    """``work``'s result, or None once the client has gone (then ``work`` is cancelled, and a result it produced in
    that same instant is handed to ``on_abandoned``). Checks every ``DISCONNECT_POLL_SEC``; exceptions propagate."""
    task = asyncio.ensure_future(work)
    finished = False
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SEC)
            if done:
                finished = True
                return task.result()
            if await is_disconnected():
                return None
    finally:
        if not finished:  # the client left, or our caller was cancelled
            await _cancel_quietly(task)
            if on_abandoned is not None and task.done() and not task.cancelled() and task.exception() is None:
                on_abandoned(task.result())


async def await_unless_disconnected(work: Awaitable[T], is_disconnected: IsDisconnected) -> T | None:
    """``work``'s result, awaited in the calling task, or None once the client has gone (``work`` is cancelled then).

    Unlike :func:`run_unless_disconnected`, ``work`` gets no task of its own: a side task checks the client every
    ``DISCONNECT_POLL_SEC`` and cancels the caller's wait when it has gone. The result is in the caller's hands as
    soon as it is there, without waiting for the caller's turn after the task that made it (a burst of requests
    whose first tokens come from one engine step). For work whose cancellation loses nothing, such as a
    generation's first delta (cancelling it aborts the request); exceptions propagate.
    """
    caller = asyncio.current_task()
    assert caller is not None, "await_unless_disconnected must run in a task"
    left = False

    async def watch() -> None:
        nonlocal left
        while True:
            await asyncio.sleep(DISCONNECT_POLL_SEC)
            if await is_disconnected():
                left = True
                caller.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if left and caller.uncancel() == 0:  # our own cancellation, nobody else's
            return None
        raise
    finally:
        watcher.cancel()


async def _cancel_quietly(future: asyncio.Future[Any]) -> None:
    """Cancel ``future`` and wait for it, swallowing what it raises."""
    future.cancel()
    try:
        await future
    except (asyncio.CancelledError, Exception):
        pass
