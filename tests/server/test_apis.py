"""append_apis and the original package's extra APIs, end to end through our middlewares and the mock engine."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from tests.server import support
from tests.server.support import Recorder, asgi_client, started

from chatstream import ChatStream
from chatstream.server.apis import API_PATHS, append_apis, select_apis
from chatstream.server.middlewares import append_middlewares

EOS = "<::EOS::>"
SKIP = {"X-FastSession-Skip": "skip"}
OPEN_ROLES = {
    "user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}},
    "agent": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": False}},
}


def mock_chat_stream(**kw: Any) -> ChatStream:
    kw.setdefault("client_roles", OPEN_ROLES)
    return support.mock_chat_stream(**kw)


def build_app(chat_stream: ChatStream, apis: dict[str, Any] | None = None) -> FastAPI:
    app = FastAPI()
    append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "test-secret", "secure": False}})
    append_apis(chat_stream.server_context, app, apis if apis is not None else {"all": True})
    return app


@pytest.fixture
async def chat_stream() -> AsyncIterator[ChatStream]:
    async with started(mock_chat_stream()) as cs:
        yield cs


@pytest.fixture
async def client(chat_stream: ChatStream) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(chat_stream)) as c:
        yield c


async def chat(client: httpx.AsyncClient, text: str) -> httpx.Response:
    response = await client.post("/chat_stream", json={"user_input": text})
    assert response.status_code == 200, response.text
    assert response.text.endswith(EOS)
    return response


# ----- append_apis options -----


def test_select_apis_include_exclude_all() -> None:
    assert select_apis({"include": ["get_load", "chat_stream"]}) == ["chat_stream", "get_load"]
    assert "get_load" not in select_apis({"exclude": ["get_load"]})
    assert len(select_apis({"exclude": []})) == len(select_apis({"all": True}))
    assert select_apis({"all": False}) == []
    assert select_apis({}) == []
    assert select_apis(None) == []


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ({"include": ["get_load"], "all": True}, "only one"),
        ({"include": ["get_lod"]}, "'get_lod'"),
        ({"exclude": ["web_ui_js"]}, "'web_ui_js'"),
        ({"include": "chat_stream"}, "list of API names"),
        ({"all": "yes"}, "'all'"),
    ],
)
def test_select_apis_rejects_bad_options(opts: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        select_apis(opts)


async def test_only_the_selected_routes_are_mounted() -> None:
    cs = mock_chat_stream()
    app = FastAPI()
    mounted = append_apis(cs.server_context, app, {"include": ["get_load", "openai", "health"]})
    paths = {getattr(route, "path", None) for route in app.routes}
    assert mounted == ["get_load", "openai", "health"]
    assert {"/get_load", "/health", "/v1/chat/completions", "/v1/completions", "/v1/models"} <= paths
    assert "/chat_stream" not in paths and "/" not in paths and "/metrics" not in paths


async def test_all_mounts_every_path() -> None:
    app = FastAPI()
    append_apis(mock_chat_stream().server_context, app, {"all": True})
    paths = {getattr(route, "path", None) for route in app.routes}
    assert {path for _, path in API_PATHS.values()} <= paths


# ----- clear_context / get_prompt -----


async def test_get_prompt_before_and_after_a_turn(client: httpx.AsyncClient) -> None:
    first = (await client.get("/get_prompt")).json()
    assert first == {"success": True, "message": "no prompt", "prompt": None}
    await chat(client, "hello & good-bye?")
    body = (await client.get("/get_prompt")).json()
    assert body["success"] is True and body["message"] == "success"
    assert "&" not in body["prompt"] and " " not in body["prompt"]  # URL-encoded
    assert "hello & good-bye?" in urllib.parse.unquote(body["prompt"])


async def test_clear_context(client: httpx.AsyncClient) -> None:
    assert (await client.post("/clear_context")).json() == {"success": False, "message": "no context."}
    await chat(client, "remember me")
    cleared = await client.post("/clear_context")
    assert cleared.status_code == 200
    assert cleared.json() == {"success": True, "message": "Context successfully cleared"}
    assert (await client.get("/get_prompt")).json()["prompt"] is None


async def test_session_apis_without_a_session_answer_without_error(client: httpx.AsyncClient) -> None:
    assert (await client.post("/clear_context", headers=SKIP)).json() == {"success": False, "message": "no context."}
    prompt = await client.get("/get_prompt", headers=SKIP)
    assert prompt.status_code == 200 and prompt.json()["success"] is False
    params = await client.get("/get_generation_params", headers=SKIP)
    assert params.json() == {"success": False, "message": "no session", "generation_params": None}
    feedback = await client.post("/set_feedback", headers=SKIP, json={"message_id": "x", "is_like": True})
    assert feedback.status_code == 200 and feedback.json() == {"success": False, "message": "no session"}


# ----- generation params -----


async def test_generation_params_default_then_merged_and_applied(
    client: httpx.AsyncClient, chat_stream: ChatStream
) -> None:
    defaults = chat_stream.default_sampling
    got = (await client.get("/get_generation_params")).json()
    assert got == {
        "success": True,
        "message": "success",
        "generation_params": {
            "temperature": defaults.temperature,
            "top_k_value": defaults.top_k,
            "top_p_value": defaults.top_p,
        },
    }
    first = (await client.post("/set_generation_params", json={"temperature": 0.25})).json()
    assert first["success"] is True and first["generation_params"]["temperature"] == 0.25
    second = (await client.post("/set_generation_params", json={"top_k_value": 7, "top_p_value": 0.5})).json()
    assert second["generation_params"] == {"temperature": 0.25, "top_k_value": 7, "top_p_value": 0.5}
    assert (await client.get("/get_generation_params")).json()["generation_params"] == second["generation_params"]

    recorder = Recorder(chat_stream)
    await chat(client, "use my params")
    sampling = recorder.requests[-1].sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.25, 7, 0.5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"temperature": 1.5}, "Invalid temperature value. Temperature should be between 0.0 and 1.0."),
        ({"temperature": -0.1}, "Invalid temperature value. Temperature should be between 0.0 and 1.0."),
        ({"top_k_value": 0}, "Invalid top_k value. top_k_value should be between 1 and 500."),
        ({"top_k_value": 501}, "Invalid top_k value. top_k_value should be between 1 and 500."),
        ({"top_p_value": 1.01}, "Invalid top_p value. top_p_value should be between 0.0 and 1.0."),
    ],
)
async def test_out_of_range_generation_params(client: httpx.AsyncClient, body: dict[str, Any], message: str) -> None:
    response = await client.post("/set_generation_params", json=body)
    assert response.status_code == 400
    assert response.json() == {"success": False, "message": message}
    assert (await client.get("/get_generation_params")).json()["generation_params"]["temperature"] == 1.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k_value": 2.5}, "top_k_value"),
        ({"top_p_value": [0.5]}, "top_p_value"),
    ],
)
async def test_non_numbers_are_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/set_generation_params", json=body)
    assert response.status_code == 400
    assert response.json()["success"] is False and field in response.json()["message"]


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b""])
async def test_bodies_that_are_not_objects_are_400(client: httpx.AsyncClient, raw: bytes) -> None:
    for path in ("/set_generation_params", "/set_feedback"):
        response = await client.post(path, content=raw)
        assert response.status_code == 400, path
        assert response.json() == {"success": False, "message": "The request body must be a JSON object."}


# ----- feedback -----


async def test_feedback_reaches_the_hook_with_the_answer_and_its_prompt() -> None:
    received: list[dict[str, Any]] = []
    cs = mock_chat_stream(on_feedback_received=received.append)
    await cs.startup()
    transport = httpx.ASGITransport(app=build_app(cs))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        first = await chat(c, "first question")
        await chat(c, "second question")
        message_id = first.headers["X-ChatStream-Last-Generated-Message-Id"]
        body = {"is_like": True, "message_id": message_id, "form_data": {"comment": "good"}}
        response = await c.post("/set_feedback", json=body)
    await cs.shutdown(1.0)
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "success", "target_message_id": message_id}
    (feedback,) = received
    assert feedback["is_like"] is True and feedback["form_data"] == {"comment": "good"}
    assert feedback["target_message_id"] == message_id
    assert feedback["target_message"] == "first question"  # the echo mock answers with the input
    assert "first question" in feedback["prompt"] and "second question" not in feedback["prompt"]
    assert feedback["generation_params"]["temperature"] == cs.default_sampling.temperature


async def test_feedback_hook_from_append_apis_opts_may_be_async() -> None:
    received: list[dict[str, Any]] = []

    async def hook(feedback: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        received.append(feedback)

    cs = mock_chat_stream(on_feedback_received=lambda f: pytest.fail("the opts hook takes precedence"))
    await cs.startup()
    transport = httpx.ASGITransport(app=build_app(cs, {"all": True, "on_feedback_received": hook}))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        message_id = (await chat(c, "hi")).headers["X-ChatStream-Last-Generated-Message-Id"]
        response = await c.post("/set_feedback", json={"is_like": False, "message_id": message_id})
    await cs.shutdown(1.0)
    assert response.json()["success"] is True
    assert received[0]["is_like"] is False and received[0]["form_data"] == ""


async def test_feedback_errors(client: httpx.AsyncClient) -> None:
    no_history = await client.post("/set_feedback", json={"is_like": True, "message_id": "abc"})
    assert no_history.status_code == 404 and no_history.json()["success"] is False
    await chat(client, "hello")
    unknown = await client.post("/set_feedback", json={"is_like": True, "message_id": "abc"})
    assert unknown.status_code == 404 and "abc" in unknown.json()["message"]
    missing = await client.post("/set_feedback", json={"is_like": True})
    assert missing.status_code == 400 and "message_id" in missing.json()["message"]
    bad_like = await client.post("/set_feedback", json={"is_like": "yes", "message_id": "abc"})
    assert bad_like.status_code == 400 and "is_like" in bad_like.json()["message"]


async def test_a_failing_feedback_hook_is_reported_not_raised() -> None:
    def hook(feedback: dict[str, Any]) -> None:
        raise RuntimeError("database down")

    cs = mock_chat_stream(on_feedback_received=hook)
    await cs.startup()
    transport = httpx.ASGITransport(app=build_app(cs))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        message_id = (await chat(c, "hi")).headers["X-ChatStream-Last-Generated-Message-Id"]
        response = await c.post("/set_feedback", json={"is_like": True, "message_id": message_id})
    await cs.shutdown(1.0)
    assert response.status_code == 500
    assert response.json() == {"success": False, "message": "error occurred"}


# ----- load and resources -----


async def test_get_load_reports_running_and_waiting() -> None:
    cs = mock_chat_stream(
        num_of_concurrent_executions=1, max_queue_size=3, mock_params={"type": "long", "time_per_token_sec": 0.01}
    )
    await cs.startup()
    transport = httpx.ASGITransport(app=build_app(cs))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as c:
        idle = (await c.get("/get_load")).json()
        engine = idle["chatstream_workers"][0].pop("engine")  # what the engine itself reports
        assert (engine["num_running"], engine["num_waiting"]) == (0, 0)
        assert idle == {
            "success": True,
            "message": "success",
            "chatstream_workers": [
                {"name": "node:0", "processing": 0, "waiting": 0, "max_processing": 1, "max_waiting": 3}
            ],
        }
        chats = [asyncio.create_task(c.post("/chat_stream", json={"user_input": f"q{i}"})) for i in range(3)]
        for _ in range(200):
            worker = (await c.get("/get_load")).json()["chatstream_workers"][0]
            if worker["processing"] == 1 and worker["waiting"] == 2:
                break
            await asyncio.sleep(0.01)
        assert (worker["processing"], worker["waiting"]) == (1, 2)
        for task in chats:
            task.cancel()
        await asyncio.gather(*chats, return_exceptions=True)
    await cs.shutdown(0.0)


async def test_get_resource_usage(client: httpx.AsyncClient) -> None:
    body = (await client.get("/get_resource_usage")).json()
    assert body["success"] is True and body["message"] == "success"
    (usage,) = body["memory_usage"]
    assert usage["name"] == "node:0" and usage["num_gpus"] == 0 and usage["gpus"] == []
    assert 0 < usage["cpu"]["used_memory"] < usage["cpu"]["total_memory"]


# ----- the original's per-endpoint methods in the user's own routes -----


async def test_seed_style_methods_mounted_in_own_routes(chat_stream: ChatStream) -> None:
    app = FastAPI()
    append_middlewares(chat_stream.server_context, app, {"session": {"secret_key": "k", "secure": False}})

    @app.post("/chat_stream")
    async def chat_route(request: Request) -> Any:
        return await chat_stream.handle_chat_stream_request(request)

    @app.get("/my_prompt")
    async def prompt_route(request: Request) -> Any:
        return await chat_stream.handle_get_prompt_request(request)

    @app.post("/my_clear")
    async def clear_route(request: Request) -> Any:
        return await chat_stream.handle_clear_context_request(request)

    @app.get("/my_load")
    async def load_route(request: Request) -> Any:
        return await chat_stream.handle_get_load_request(request)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        await chat(c, "seed style")
        assert "seed%20style" in (await c.get("/my_prompt")).json()["prompt"]
        assert (await c.post("/my_clear")).json()["success"] is True
        assert (await c.get("/my_load")).json()["chatstream_workers"][0]["processing"] == 0
