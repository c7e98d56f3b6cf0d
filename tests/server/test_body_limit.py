"""Body limits: the middleware on every endpoint (413 in each protocol's shape) and the endpoints' own reader."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from tests.server.support import asgi_client, mock_chat_stream, started

from chatstream import ChatStream
from chatstream.server.app import create_app
from chatstream.server.errors import format_bytes
from chatstream.server.http import read_body
from chatstream.sessions.middleware import SessionMiddleware

LIMIT = 2048


@pytest.fixture
async def chat_stream() -> AsyncIterator[ChatStream]:
    async with started(mock_chat_stream(max_body_bytes=LIMIT)) as cs:
        yield cs


@pytest.fixture
async def client(chat_stream: ChatStream) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(chat_stream, middleware_opts={"session": {"secret_key": "k"}})
    async with asgi_client(app) as c:
        yield c


async def chunks(total: int, size: int = 512) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"x" * size
        sent += size


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/chat_stream", {"error": "payload_too_large"}),
        ("/v1/chat/completions", {"code": "payload_too_large", "type": "invalid_request_error"}),
        ("/set_generation_params", {"success": False}),
        ("/clear_context", {"success": False}),
    ],
)
async def test_declared_length_over_the_limit_is_refused_in_the_endpoints_shape(
    client: httpx.AsyncClient, path: str, shape: dict[str, object]
) -> None:
    response = await client.post(path, content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    body = response.json()
    error = body["error"] if path.startswith("/v1/") else body
    assert shape.items() <= error.items()
    text = error.get("detail") or error["message"]
    assert f"{LIMIT} bytes" in text and "2 KiB" in text


async def test_chunked_bodies_are_cut_off_and_bodies_within_the_limit_pass(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat_stream", content=chunks(10 * LIMIT))
    assert response.status_code == 413
    response = await client.request(
        "GET", "/get_load", content=chunks(10 * LIMIT)
    )  # an endpoint that never reads its body
    assert response.status_code == 413 and response.json()["success"] is False
    response = await client.post("/chat_stream", json={"user_input": "a b"})
    assert response.status_code == 200 and "a b" in response.text


async def test_the_reader_bounds_bodies_without_the_middleware() -> None:
    limits: list[int] = []

    async def echo(request: Request) -> Response:
        try:
            body = await read_body(request, 100)
        except Exception as exc:
            limits.append(getattr(exc, "limit", -1))
            return Response(status_code=413)
        assert await request.body() == body  # still readable by code written for the original
        return Response(body)

    app = FastAPI()
    app.add_api_route("/echo", echo, methods=["POST"])
    async with asgi_client(app) as c:
        assert (await c.post("/echo", content=b"y" * 100)).content == b"y" * 100
        assert (await c.post("/echo", content=b"y" * 101)).status_code == 413
        assert (await c.post("/echo", content=chunks(1000, 30))).status_code == 413
    assert limits == [100, 100]


def seed_style_app(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()

    async def chat(request: Request) -> Response:
        return await chat_stream.handle_chat_stream_request(request)

    app.add_api_route("/chat_stream", chat, methods=["POST"])
    app.add_middleware(SessionMiddleware, secret_key="k")
    return app


async def test_seed_style_route_gets_413_from_handle_chat_stream_request(chat_stream: ChatStream) -> None:
    padded = b'{"user_input": "hi"}' + b" " * (5 * LIMIT)
    async with asgi_client(seed_style_app(chat_stream)) as c:  # no append_middlewares: the endpoint's limit holds
        response = await c.post("/chat_stream", content=padded)
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"
    app = seed_style_app(chat_stream)
    chat_stream.append_middlewares(app, {"session": False, "max_body_bytes": 10 * LIMIT})
    async with asgi_client(app) as c:
        response = await c.post("/chat_stream", content=padded)  # the app's limit wins over the endpoint's
    assert response.status_code == 200, response.text


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 1536, 1024 * 1024, 20 * 1024**3)] == [
        "512 bytes",
        "1.5 KiB",
        "1 MiB",
        "20 GiB",
    ]
