"""/openapi.json describes every endpoint: request bodies, responses with media types, error shapes, security."""

from __future__ import annotations

from typing import Any

import pytest
from tests.server.support import mock_chat_stream

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
