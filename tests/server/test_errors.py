"""The one exception → status/body mapping, and the en/ja message catalogue."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from chatstream.admission.admission import Draining, QueueFull
from chatstream.engine.base import EngineError
from chatstream.i18n import message, normalize_locale
from chatstream.server.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    native_error_response,
    openai_error_response,
    to_api_error,
)


def body(response: Any) -> dict[str, Any]:
    return dict(json.loads(bytes(response.body)))


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (BadRequest("x", param="temperature"), 400),
        (Forbidden("x"), 403),
        (NotFound("x"), 404),
        (QueueFull(retry_after=3), 429),
        (Draining(), 503),
        (EngineError("stopped"), 503),
        (RuntimeError("bug"), 500),
    ],
)
def test_status_mapping(exc: Exception, status: int) -> None:
    assert to_api_error(exc).status == status
    assert openai_error_response(exc).status_code == status
    assert native_error_response(exc).status_code == status


def test_openai_shape_and_retry_after() -> None:
    response = openai_error_response(QueueFull(retry_after=7))
    assert response.headers["Retry-After"] == "7"
    error = body(response)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "rate_limit_error"


def test_internal_errors_do_not_leak_details() -> None:
    error = body(openai_error_response(RuntimeError("secret path /home/x")))["error"]
    assert "secret" not in error["message"] and error["code"] == "internal_error"


def test_native_shapes() -> None:
    assert body(native_error_response(BadRequest("'top_k_value' must be an integer"))) == {
        "success": False,
        "message": "'top_k_value' must be an integer",
    }
    assert body(native_error_response(Forbidden("x"))) == {
        "success": False,
        "message": "Forbidden",
        "detail": "Denied on role layer.",
    }


def test_validation_errors_name_the_field() -> None:
    class Body(BaseModel):
        items: list[int]

    with pytest.raises(ValidationError) as info:
        Body.model_validate({"items": [1, "x"]})
    error = to_api_error(info.value)
    assert isinstance(error, BadRequest) and error.param == "items.1" and "items.1" in error.message


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("ja", "ja"), ("ja-JP", "ja"), ("ja_JP.UTF-8", "ja"), ("JA", "ja"), ("en", "en"), ("fr", "en"), (None, "en")],
)
def test_normalize_locale(locale: str | None, expected: str) -> None:
    assert normalize_locale(locale) == expected


def test_messages_in_both_languages() -> None:
    english, japanese = message("cors_enabled", "en"), message("cors_enabled", "ja-JP")
    assert english != japanese and "%s" in english and "%s" in japanese
    assert english % "http://a" == "CORS enabled for origins http://a."
    assert message("drain_finished") == message("drain_finished", "de") == "Shutdown complete."
    assert message("drain_started", "ja") % (1.5, 2)  # same argument order in both languages
    with pytest.raises(KeyError):
        message("no_such_message")
