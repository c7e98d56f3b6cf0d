"""/openapi.json describes every endpoint: request bodies, responses with media types, error shapes, security."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from tests.server.support import asgi_client, mock_chat_stream, started

from chatstream.server.app import create_app


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    app = create_app(mock_chat_stream(), middleware_opts={"session": {"secret_key": "k"}})
    return app.openapi()


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in schema["paths"].items() for method, op in ops.items()]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_every_endpoint_is_described(schema: dict[str, Any]) -> None:
    paths = {path for _, path, _ in operations(schema)}
    assert {"/chat_stream", "/chat_stream/queue_position", "/v1/chat/completions", "/v1/models", "/health"} <= paths
    for method, path, op in operations(schema):
        if method == "post":
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"], path
        ok = op["responses"]["200"]["content"]
        assert all("schema" in media or "itemSchema" in media for media in ok.values()), path
        assert "403" in op["responses"], path  # the client-role layer
        assert op["security"] and "Client roles: API name" in op["description"], path


def test_streaming_and_error_shapes(schema: dict[str, Any]) -> None:
    chat = schema["paths"]["/chat_stream"]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"text/plain", "application/json"}
    assert chat["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/NativeError")
    openai = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(openai["200"]["content"]) == {"application/json", "text/event-stream"}
    event = openai["200"]["content"]["text/event-stream"]["itemSchema"]["properties"]["data"]
    assert event["contentSchema"]["$ref"].endswith("/ChatCompletionChunk")
    assert openai["429"]["headers"]["Retry-After"]
    assert {"400", "401", "413", "429"} <= set(openai)


def test_references_resolve_and_security_schemes_exist(schema: dict[str, Any]) -> None:
    components = schema["components"]
    for target in refs(schema["paths"]) + refs(components["schemas"]):
        assert target.removeprefix("#/components/schemas/") in components["schemas"], target
    assert set(components["securitySchemes"]) == {"SessionCookie", "AgentPassPhrase", "ApiKey"}
    assert components["securitySchemes"]["ApiKey"]["scheme"] == "bearer"


def check(schema: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    """The response's body matches what /openapi.json says ``method path`` answers with its status and media type."""
    described = schema["paths"][path][method]["responses"][str(response.status_code)]["content"]
    media = response.headers["content-type"].split(";")[0]
    body = response.text if media.startswith("text/") else response.json()
    jsonschema.validate(body, {**described[media]["schema"], "components": schema["components"]})


def check_events(schema: dict[str, Any], response: httpx.Response) -> list[str]:
    """Each typed SSE event of POST /v1/responses matches the described event schema; the events' types."""
    item = schema["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    event_schema = {**item["properties"]["data"]["contentSchema"], "components": schema["components"]}
    kinds = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(fields["data"])
        jsonschema.validate(data, event_schema)
        assert fields["event"] == data["type"]
        kinds.append(data["type"])
    return kinds


async def test_the_conversations_api_answers_as_described() -> None:
    cs = mock_chat_stream()
    app = create_app(cs, middleware_opts={"session": {"secret_key": "k", "secure": False}})
    schema, one = app.openapi(), "/conversations/{conversation_id}"
    async with started(cs), asgi_client(app) as client:
        assert (await client.post("/chat_stream", json={"user_input": "hello"})).status_code == 200
        check(schema, "get", "/conversations", listed := await client.get("/conversations"))
        check(schema, "post", "/conversations", await client.post("/conversations", json={"make_current": False}))
        url = f"/conversations/{listed.json()['data'][0]['id']}"
        check(schema, "get", one, await client.get(url))
        check(schema, "get", one + "/items", await client.get(url + "/items"))
        check(schema, "post", one, await client.post(url, json={"metadata": {"title": "Renamed"}}))
        check(schema, "post", one + "/open", await client.post(url + "/open"))
        for fmt in ("json", "markdown"):
            check(schema, "get", one + "/export", await client.get(url + "/export", params={"format": fmt}))
        check(schema, "delete", one, await client.delete(url))
        check(schema, "get", one, missing := await client.get(url))
        check(schema, "post", one, too_long := await client.post(url, json={"title": "x" * 2_000_000}))
    assert (missing.status_code, too_long.status_code) == (404, 413)


async def test_the_responses_api_and_a_model_answer_as_described() -> None:
    cs = mock_chat_stream()
    app = create_app(cs, middleware_opts={"session": {"secret_key": "k"}})
    schema, one = app.openapi(), "/v1/responses/{response_id}"
    async with started(cs), asgi_client(app) as client:
        check(schema, "get", "/v1/models/{model_id}", await client.get(f"/v1/models/{cs.model_name}"))
        check(schema, "get", "/v1/models/{model_id}", await client.get("/v1/models/no-such-model"))
        check(schema, "post", "/v1/responses", created := await client.post("/v1/responses", json={"input": "hi"}))
        streamed = await client.post("/v1/responses", json={"input": "hi", "stream": True})
        check(schema, "get", one, await client.get(f"/v1/responses/{created.json()['id']}"))
        check(schema, "delete", one, await client.delete(f"/v1/responses/{created.json()['id']}"))
        check(schema, "get", one, missing := await client.get(f"/v1/responses/{created.json()['id']}"))
        check(schema, "post", "/v1/responses", await client.post("/v1/responses", json={"input": "hi", "top_p": 9}))
    kinds = check_events(schema, streamed)
    assert (kinds[0], kinds[-1], missing.status_code) == ("response.created", "response.completed", 404)
