"""SessionMiddleware on the async stores: sessions survive a restart, and are written before the response starts
and before a streaming response's last chunk."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from chatstream.sessions.base import Store
from chatstream.sessions.middleware import HttpSession, SessionMiddleware, commit_session
from chatstream.sessions.sqlite import SQLiteStore

SECRET = "test-secret"


def _app(store: Store, *routes: Route) -> SessionMiddleware:
    return SessionMiddleware(Starlette(routes=list(routes)), secret_key=SECRET, store=store, secure=False)


async def count(request: Request) -> Response:
    session = request.state.session.get_session()
    session["n"] = session.get("n", 0) + 1  # no save_session(): a serialising store notices the change anyway
    return PlainTextResponse(str(session["n"]))


def _client(app: Any, cookies: httpx.Cookies | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", cookies=cookies)


async def test_state_is_kept_and_unchanged_sessions_are_not_rewritten(store: Store) -> None:
    async with _client(_app(store, Route("/count", count), Route("/peek", peek))) as client:
        assert [(await client.get("/count")).text for _ in range(3)] == ["1", "2", "3"]
        writes: list[str] = []
        original_save = store.sessions.save

        async def counting_save(session_id: str, data: dict[str, Any]) -> None:
            writes.append(session_id)
            await original_save(session_id, data)

        store.sessions.save = counting_save  # type: ignore[method-assign]
        assert (await client.get("/peek")).text == "3"
        assert writes == []


async def peek(request: Request) -> Response:
    return PlainTextResponse(str(request.state.session.get_session().get("n")))


async def test_sessions_survive_a_restart(tmp_path: Any) -> None:
    path = tmp_path / "chatstream.db"
    async with SQLiteStore(path) as first, _client(_app(first, Route("/count", count))) as client:
        assert (await client.get("/count")).text == "1"
        cookies = client.cookies
    async with SQLiteStore(path) as second, _client(_app(second, Route("/count", count)), cookies) as client:
        assert (await client.get("/count")).text == "2"  # a new process, the same browser


async def _call(app: Any, path: str, on_send: Callable[[Message], Any]) -> None:
    """Drive the app at the ASGI level; the client stays until the last body message has been sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http"}
    scope |= {"path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": []}
    request_read = False
    finished = asyncio.Event()

    async def receive() -> Message:
        nonlocal request_read
        if not request_read:
            request_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await on_send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=10)


async def test_writes_happen_before_the_response_starts_and_before_its_last_chunk(store: Store) -> None:
    managers: list[HttpSession] = []

    async def stream(request: Request) -> Response:
        managers.append(request.state.session)
        request.state.session.get_session()["phase"] = "before start"

        async def body() -> AsyncIterator[str]:
            yield "a"
            request.state.session.get_session()["phase"] = "while streaming"
            request.state.session.save_session()
            yield "b"

        return StreamingResponse(body())

    seen: list[tuple[str, Any]] = []

    async def on_send(message: Message) -> None:
        stored = await store.sessions.get(managers[0].get_session_id())
        phase = stored.get("phase") if stored is not None else None
        seen.append((message["type"], phase))

    await _call(_app(store, Route("/stream", stream)), "/stream", on_send)
    assert seen[0] == ("http.response.start", "before start")
    assert seen[-1] == ("http.response.body", "while streaming")  # the final, empty body message


async def test_commit_writes_at_once(store: Store) -> None:
    async def commit(request: Request) -> Response:
        session = request.state.session.get_session()
        session["current"] = "conv_1"
        await commit_session(request.state.session)
        stored = await store.sessions.get(request.state.session.get_session_id())
        return PlainTextResponse(str(stored == {"current": "conv_1"}))

    async with _client(_app(store, Route("/commit", commit))) as client:
        assert (await client.get("/commit")).text == "True"


async def test_a_value_that_is_not_json_fails_the_request_with_a_clear_error(store: Store) -> None:
    if store.sessions.live_objects:
        pytest.skip("the memory store keeps live objects")

    async def bad(request: Request) -> Response:
        request.state.session.get_session()["chat_prompt"] = object()
        return PlainTextResponse("never sent")

    async with _client(_app(store, Route("/bad", bad))) as client:
        with pytest.raises(TypeError, match=r"not JSON under \['chat_prompt'\]"):
            await client.get("/bad")


async def test_untouched_and_late_sessions_are_not_stored(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def untouched(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def late(request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            yield "x"
            request.state.session.get_session()["late"] = True

        return StreamingResponse(body())

    path = tmp_path / "s.db"
    async with SQLiteStore(path) as store, _client(_app(store, Route("/u", untouched), Route("/late", late))) as client:
        assert "set-cookie" not in (await client.get("/u")).headers
        with caplog.at_level(logging.WARNING, logger="chatstream.sessions.middleware"):
            assert "set-cookie" not in (await client.get("/late")).headers
        assert "not stored" in caplog.text
        async with store.db.connection() as conn:
            assert list(await conn.execute_fetchall("SELECT count(*) FROM sessions")) == [(0,)]


async def test_a_damaged_session_starts_a_new_one(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store, _client(_app(store, Route("/count", count))) as client:
        assert (await client.get("/count")).text == "1"
        async with store.db.connection() as conn:
            await conn.execute("UPDATE sessions SET data = 'garbage'")
        with caplog.at_level(logging.WARNING, logger="chatstream.sessions.middleware"):
            response = await client.get("/count")
        assert response.text == "1" and "set-cookie" in response.headers
        assert "cannot be read" in caplog.text


async def test_a_change_made_while_a_cut_off_stream_unwinds_is_still_written(store: Store) -> None:
    managers: list[HttpSession] = []

    async def stream(request: Request) -> Response:
        managers.append(request.state.session)
        request.state.session.get_session()["answer"] = ""

        async def body() -> AsyncIterator[str]:
            try:
                yield "partial"
                await asyncio.Event().wait()  # the client leaves here
            finally:
                request.state.session.get_session()["answer"] = "partial"
                request.state.session.save_session()

        return StreamingResponse(body())

    first_chunk_sent = asyncio.Event()

    async def receive() -> Message:
        if not first_chunk_sent.is_set():
            first_chunk_sent.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http"}
    scope |= {"path": "/stream", "raw_path": b"/stream", "query_string": b"", "root_path": "", "headers": []}
    await asyncio.wait_for(_app(store, Route("/stream", stream))(scope, receive, send), timeout=10)
    assert await store.sessions.get(managers[0].get_session_id()) == {"answer": "partial"}


async def test_commit_session_also_works_with_fastsession() -> None:
    import fastsession

    async def commit(request: Request) -> Response:
        request.state.session.get_session()["current"] = "conv_1"
        await commit_session(request.state.session)
        return PlainTextResponse(request.state.session.get_session()["current"])

    app = Starlette(routes=[Route("/commit", commit)])
    app.add_middleware(
        fastsession.FastSessionMiddleware, secret_key=SECRET, store=fastsession.MemoryStore(), secure=False
    )
    async with _client(app) as client:
        assert (await client.get("/commit")).text == "conv_1"
