"""The session cookie's Secure flag: "auto" follows the request's scheme; True and False force it."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chatstream.sessions.middleware import SecureOption, SessionMiddleware


def app_with(secure: SecureOption) -> Starlette:
    async def touch(request: Request) -> PlainTextResponse:
        request.state.session.get_session()["seen"] = True
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", touch)])
    app.add_middleware(SessionMiddleware, secret_key="k", secure=secure)
    return app


async def cookie_of(app: Starlette, scheme: str) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://testserver") as client:
        return (await client.get("/")).headers["set-cookie"].lower()


@pytest.mark.parametrize(
    ("secure", "scheme", "marked"),
    [("auto", "http", False), ("auto", "https", True), (True, "http", True), (False, "https", False)],
)
async def test_secure_flag(secure: SecureOption, scheme: str, marked: bool) -> None:
    cookie = await cookie_of(app_with(secure), scheme)
    assert ("; secure" in cookie) is marked and "httponly" in cookie


def test_the_default_is_auto_and_bad_values_are_refused() -> None:
    assert SessionMiddleware(Starlette(), secret_key="k").secure == "auto"
    with pytest.raises(ValueError, match="secure must be True, False or 'auto'"):
        SessionMiddleware(Starlette(), secret_key="k", secure="yes")  # type: ignore[arg-type]
