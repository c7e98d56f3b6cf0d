"""SessionMiddleware (ours) and the fastsession middleware the original package's users run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import fastsession
import itsdangerous
import pytest
from fastapi import FastAPI
from itsdangerous import URLSafeTimedSerializer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message

from chatstream.prompts import ChatPromptTogetherRedPajamaINCITEChat
from chatstream.sessions.middleware import SessionMiddleware
from chatstream.sessions.store import FastSessionStoreAdapter, MemoryStore

SECRET = "test-secret"
SKIP = {"header_name": "X-FastSession-Skip", "header_value": "skip"}


async def count(request: Request) -> Response:
    session = request.state.session.get_session()
    session["n"] = session.get("n", 0) + 1
    return PlainTextResponse(f"{session['n']} {request.state.session.get_session_id()}")


async def has_session(request: Request) -> Response:
    return PlainTextResponse(str(hasattr(request.state, "session")))


async def untouched(request: Request) -> Response:
    return PlainTextResponse("ok")


async def own_cookie(request: Request) -> Response:
    request.state.session.get_session()
    response = PlainTextResponse("ok")
    response.set_cookie("theme", "dark")
    return response


async def clear(request: Request) -> Response:
    request.state.session.clear_session()
    return PlainTextResponse(request.state.session.get_session_id())


def make_app(store: MemoryStore | None = None, **options: Any) -> tuple[Starlette, MemoryStore]:
    store = store if store is not None else MemoryStore()
    routes = [
        Route("/count", count),
        Route("/has_session", has_session),
        Route("/untouched", untouched),
        Route("/own_cookie", own_cookie),
        Route("/clear", clear),
    ]
    app = Starlette(routes=routes)
    options.setdefault("secure", False)
    app.add_middleware(SessionMiddleware, secret_key=SECRET, store=store, **options)
    return app, store


def test_state_is_kept_across_requests_of_one_client() -> None:
    app, _ = make_app()
    client = TestClient(app)
    first = client.get("/count")
    n1, sid1 = first.text.split()
    cookie = first.headers["set-cookie"]
    assert cookie.startswith("sid=") and "; HttpOnly" in cookie and "; Path=/" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie and "Max-Age" not in cookie
    second = client.get("/count")
    assert second.text == f"2 {sid1}" and n1 == "1"
    assert "set-cookie" not in second.headers  # only a new session sets the cookie


def test_a_fastsession_store_works_through_the_adapter() -> None:
    app = Starlette(routes=[Route("/count", count)])
    app.add_middleware(
        SessionMiddleware, secret_key=SECRET, secure=False, store=FastSessionStoreAdapter(fastsession.MemoryStore())
    )
    client = TestClient(app)
    _, sid = client.get("/count").text.split()
    assert client.get("/count").text == f"2 {sid}"  # the increment made without save_session() is kept


def test_clients_are_isolated() -> None:
    app, store = make_app()
    alice, bob = TestClient(app), TestClient(app)
    assert alice.get("/count").text.startswith("1 ")
    assert alice.get("/count").text.startswith("2 ")
    assert bob.get("/count").text.startswith("1 ")
    assert len(store) == 2


@pytest.mark.parametrize("bad_value", ["garbage", "InNlc3Npb24i.ZxYw.forged-signature", ""])
def test_tampered_cookie_gets_a_new_session(bad_value: str) -> None:
    app, _ = make_app()
    client = TestClient(app)
    _, sid = client.get("/count").text.split()
    signed = client.cookies["sid"]
    client.cookies.clear()
    client.cookies.set("sid", bad_value or signed[:-2] + "xx")
    response = client.get("/count")
    assert response.status_code == 200
    n, new_sid = response.text.split()
    assert n == "1" and new_sid != sid
    assert "set-cookie" in response.headers


def test_cookie_signed_with_another_key_is_rejected() -> None:
    app, store = make_app()
    store.save("victim", {"n": 41})
    client = TestClient(app)
    client.cookies.set("sid", URLSafeTimedSerializer("other-key", salt="chatstream.session").dumps("victim"))
    assert client.get("/count").text.startswith("1 ")
    client.cookies.clear()
    client.cookies.set("sid", URLSafeTimedSerializer(SECRET, salt="chatstream.session").dumps("victim"))
    assert client.get("/count").text == "42 victim"  # the same id, correctly signed, is accepted


def test_skip_header_means_no_session() -> None:
    app, store = make_app(skip_session_header=SKIP)
    client = TestClient(app)
    response = client.get("/has_session", headers={"x-fastsession-skip": "skip"})
    assert response.text == "False" and "set-cookie" not in response.headers
    assert client.get("/has_session", headers={"x-fastsession-skip": "other"}).text == "True"
    assert len(store) == 0


def test_skip_header_wildcard_and_list() -> None:
    app, _ = make_app(
        skip_session_header=[{"header_name": "X-A", "header_value": "1"}, {"header_name": "X-B", "header_value": "*"}]
    )
    client = TestClient(app)
    assert client.get("/has_session", headers={"X-B": "anything"}).text == "False"
    assert client.get("/has_session", headers={"X-A": "1"}).text == "False"
    assert client.get("/has_session", headers={"X-A": "2"}).text == "True"


def test_untouched_session_leaves_no_trace() -> None:
    app, store = make_app()
    response = TestClient(app).get("/untouched")
    assert "set-cookie" not in response.headers
    assert len(store) == 0


def test_the_apps_own_cookies_are_kept() -> None:
    app, _ = make_app()
    cookies = TestClient(app).get("/own_cookie").headers.get_list("set-cookie")
    assert any(c.startswith("theme=dark") for c in cookies) and any(c.startswith("sid=") for c in cookies)


def test_clear_session_keeps_the_id() -> None:
    app, store = make_app()
    client = TestClient(app)
    _, sid = client.get("/count").text.split()
    assert client.get("/clear").text == sid
    assert store.get(sid) == {}
    assert client.get("/count").text == f"1 {sid}"


def test_session_expires_in_the_store() -> None:
    now = [0.0]
    app, _ = make_app(store=MemoryStore(ttl_seconds=60, clock=lambda: now[0]))
    client = TestClient(app)
    _, sid = client.get("/count").text.split()
    now[0] += 59
    assert client.get("/count").text == f"2 {sid}"
    now[0] += 61
    response = client.get("/count")
    assert response.text.startswith("1 ") and sid not in response.text
    assert "set-cookie" in response.headers


def test_signature_expires_after_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = make_app(max_age=30, same_site="strict", secure=True, http_only=False)
    client = TestClient(app, base_url="https://testserver")
    first = client.get("/count")
    cookie = first.headers["set-cookie"]
    assert (
        "; Max-Age=30" in cookie and "; Secure" in cookie and "SameSite=Strict" in cookie and "HttpOnly" not in cookie
    )
    _, sid = first.text.split()
    assert client.get("/count").text == f"2 {sid}"
    real = itsdangerous.TimestampSigner.get_timestamp
    monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp", lambda self: real(self) + 31)
    assert client.get("/count").text.startswith("1 ")


def test_a_prompt_object_lives_in_the_session() -> None:
    async def chat(request: Request) -> Response:
        session = request.state.session.get_session()
        prompt = session.setdefault("chat_prompt", ChatPromptTogetherRedPajamaINCITEChat())
        prompt.add_requester_msg((await request.body()).decode())
        prompt.add_responder_msg("ok")
        request.state.session.save_session()
        return PlainTextResponse(prompt.create_prompt())

    app = Starlette(routes=[Route("/chat", chat, methods=["POST"])])
    app.add_middleware(SessionMiddleware, secret_key=SECRET, secure=False)
    client = TestClient(app)
    client.post("/chat", content="hi")
    assert client.post("/chat", content="again").text == "<human>: hi\n<bot>: ok\n<human>: again\n<bot>: ok\n"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"secret_key": ""}, "secret_key"),
        ({"same_site": "sometimes"}, "same_site"),
        ({"max_age": -1}, "max_age"),
        ({"skip_session_header": {"header_name": "X"}}, "skip_session_header"),
    ],
)
def test_bad_options_are_rejected(options: dict[str, Any], match: str) -> None:
    kwargs: dict[str, Any] = {"secret_key": SECRET, **options}
    with pytest.raises(ValueError, match=match):
        SessionMiddleware(Starlette(), **kwargs)


def test_lifespan_passes_through() -> None:
    started: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    app = Starlette(routes=[Route("/count", count)], lifespan=lifespan)
    app.add_middleware(SessionMiddleware, secret_key=SECRET, secure=False)
    with TestClient(app) as client:
        assert client.get("/count").text.startswith("1 ")
    assert started == [True]


def test_first_use_after_the_response_started_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    async def late(request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            yield "x"
            request.state.session.get_session()["late"] = True

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/late", late)])
    app.add_middleware(SessionMiddleware, secret_key=SECRET, secure=False)
    with caplog.at_level(logging.WARNING, logger="chatstream.sessions.middleware"):
        response = TestClient(app).get("/late")
    assert "set-cookie" not in response.headers
    assert "cookie was not sent" in caplog.text


# ---------------------------------------------------------------- streaming, driven at the ASGI level


def _streaming_app(middleware: type, **options: Any) -> tuple[FastAPI, asyncio.Event]:
    """A FastAPI app whose response yields "a", then waits until the client has received "a", then yields "b"."""
    client_got_first_chunk = asyncio.Event()
    app = FastAPI()

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        request.state.session.get_session()

        async def body() -> AsyncIterator[str]:
            yield "a"
            await client_got_first_chunk.wait()
            yield "b"

        return StreamingResponse(body())

    app.add_middleware(middleware, secret_key=SECRET, secure=False, **options)
    return app, client_got_first_chunk


async def _drive(app: ASGIApp, first_chunk_seen: asyncio.Event) -> list[Message]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent: list[Message] = []
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
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body") == b"a":
            first_chunk_seen.set()  # only now may the app produce "b": a buffering middleware would deadlock here
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize(
    ("middleware", "options"),
    [(SessionMiddleware, {}), (fastsession.FastSessionMiddleware, {"store": fastsession.MemoryStore()})],
    ids=["chatstream", "fastsession"],
)
async def test_streaming_response_passes_through_unbuffered(middleware: type, options: dict[str, Any]) -> None:
    app, first_chunk_seen = _streaming_app(middleware, **options)
    sent = await _drive(app, first_chunk_seen)
    start = sent[0]
    assert start["type"] == "http.response.start"
    assert any(name == b"set-cookie" for name, _ in start["headers"])
    chunks = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert chunks == [b"a", b"b"]


# ---------------------------------------------------------------- the original package's setup: fastsession


def _fastsession_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        fastsession.FastSessionMiddleware,
        secret_key=SECRET,
        store=fastsession.MemoryStore(),
        http_only=True,
        secure=False,
    )

    @app.post("/chat")
    async def chat(request: Request) -> Response:
        session_mgr = request.state.session
        session = session_mgr.get_session()
        if session.get("chat_prompt") is None:
            session["chat_prompt"] = ChatPromptTogetherRedPajamaINCITEChat()
            session_mgr.save_session()
        prompt = session["chat_prompt"]
        prompt.add_requester_msg((await request.body()).decode())
        prompt.add_responder_msg("ok")
        session_mgr.save_session()
        return PlainTextResponse(f"{id(prompt)}|{session_mgr.get_session_id()}|{prompt.create_prompt()}")

    @app.get("/theme")
    async def theme(request: Request) -> Response:
        request.state.session.get_session()
        response = PlainTextResponse("ok")
        response.set_cookie("theme", "dark")
        return response

    return app


def test_fastsession_keeps_a_prompt_object_across_requests() -> None:
    client = TestClient(_fastsession_app())
    first_id, first_sid, _ = client.post("/chat", content="hi").text.split("|")
    second_id, second_sid, rendered = client.post("/chat", content="again").text.split("|")
    assert (second_id, second_sid) == (first_id, first_sid)  # the very same object, kept in process memory
    assert rendered == "<human>: hi\n<bot>: ok\n<human>: again\n<bot>: ok\n"
    _, other_sid, other_rendered = TestClient(_fastsession_app()).post("/chat", content="x").text.split("|")
    assert other_sid != first_sid and other_rendered == "<human>: x\n<bot>: ok\n"


def test_fastsession_quirks_that_our_middleware_fixes() -> None:
    """Documents fastsession 0.3.0's behaviour (see docs/sessions.md); a fixed release makes this test fail."""
    app = _fastsession_app()
    client = TestClient(app, raise_server_exceptions=False)
    client.cookies.set("sid", "garbage")  # a cookie without itsdangerous's separator
    assert client.post("/chat", content="hi").status_code == 500
    cookies = TestClient(app).get("/theme").headers.get_list("set-cookie")
    assert len(cookies) == 1 and cookies[0].startswith("sid=")  # the app's own "theme" cookie was dropped
    assert "path=" not in cookies[0].lower()  # no Path: browsers scope the cookie to the request's directory
