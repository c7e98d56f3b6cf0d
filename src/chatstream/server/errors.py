"""One place that maps failures to HTTP status codes and error bodies.

Handlers raise :class:`ApiError` (or let admission/engine exceptions through :func:`to_api_error`); the two
renderers give the body each protocol's clients parse:

- native endpoints keep the original package's shapes: ``{"success": false, "message": ...}`` (and the role
  layer's ``{"success": false, "message": "Forbidden", "detail": "Denied on role layer."}``);
- OpenAI endpoints use ``{"error": {"message", "type", "param", "code"}}``.

Bad input always becomes a 4xx whose message names the field, never a 500.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from chatstream.admission.admission import Draining, QueueFull
from chatstream.engine.base import EngineError, EngineOverloaded
from chatstream.prompts.window import ContextLengthExceeded
from chatstream.request_builder import UnsupportedSampling
from chatstream.sessions import errors as store_errors

ROLE_DENIED_BODY: dict[str, Any] = {"success": False, "message": "Forbidden", "detail": "Denied on role layer."}


class ApiError(Exception):
    """A failure with its HTTP status, a message for the client and (for bad input) the offending field."""

    status: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    """Invalid input; ``param`` names the field."""

    status = 400
    error_type = "invalid_request_error"


class Unauthorized(ApiError):
    """Missing or wrong API key."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class Forbidden(ApiError):
    """The caller's client role does not allow this API."""

    status = 403
    error_type = "permission_error"
    default_code = "forbidden"


class NotFound(ApiError):
    """The thing named by ``param`` does not exist (a model, a message id)."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(ApiError):
    """The path exists, but not for this method."""

    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(ApiError):
    """A write based on a stale version: someone else changed the conversation first."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    """The request body is larger than the server accepts (``limit`` bytes)."""

    status = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is too large: the limit is {limit} bytes ({format_bytes(limit)}).",
            headers={"Connection": "close"},  # the rest of the body is not read: the connection cannot be reused
        )
        self.limit = limit


def format_bytes(size: int) -> str:
    """``1048576`` → ``"1 MiB"``; ``1500`` → ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # not reached


class TooManyRequests(ApiError):
    """The admission queue is full; retry after ``retry_after`` seconds."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class ServiceUnavailable(ApiError):
    """Starting, draining or the engine stopped."""

    status = 503
    error_type = "server_error"
    default_code = "service_unavailable"


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception a handler may meet to an :class:`ApiError` (unknown ones become a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        message = f"Too many requests: the queue is full. Retry after {exc.retry_after} s."
        return TooManyRequests(message, exc.retry_after)
    if isinstance(exc, Draining):
        return ServiceUnavailable("The server is shutting down and admits no new requests.", code="draining")
    if isinstance(exc, EngineOverloaded):
        return TooManyRequests(f"Too many requests: {exc} Retry after {exc.retry_after} s.", exc.retry_after)
    if isinstance(exc, EngineError):
        return ServiceUnavailable(f"The engine cannot serve requests: {exc}", code="engine_unavailable")
    if isinstance(exc, ValidationError):
        return bad_request_from_validation(exc)
    if isinstance(exc, store_errors.StoreError):
        return store_api_error(exc)
    if isinstance(exc, ContextLengthExceeded):
        return BadRequest(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnsupportedSampling):
        return BadRequest(str(exc), param=exc.field)
    return ApiError("Internal server error.", code="internal_error")


def store_api_error(exc: store_errors.StoreError) -> ApiError:
    """A store failure for the client: 404 (no such conversation or message for this user), 409 (a conflicting
    write), 503 (the store is unreachable), 500 naming the record that cannot be read."""
    if isinstance(exc, store_errors.ConversationNotFound):
        return NotFound(str(exc), param="conversation_id", code="conversation_not_found")
    if isinstance(exc, store_errors.MessageNotFound):
        return NotFound(str(exc), param="message_id", code="message_not_found")
    if isinstance(exc, store_errors.Conflict):
        return Conflict(str(exc), param="conversation_id")
    if isinstance(exc, store_errors.StoreUnavailable):
        return ServiceUnavailable(f"The conversation store is unavailable: {exc}", code="store_unavailable")
    code = "foreign_record" if isinstance(exc, store_errors.ForeignRecord) else "corrupt_record"
    return ApiError(str(exc), code=code)


def bad_request_from_validation(exc: ValidationError) -> BadRequest:
    """The first pydantic error as a 400 that names the field (``messages.0.content``)."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if param:
        return BadRequest(f"Invalid value for '{param}': {message}", param=param)
    return BadRequest(f"Invalid request body: {message}")


def openai_error_body(error: BaseException) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` for any exception (also sent as an SSE event)."""
    err = to_api_error(error)
    return {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": err.code}}


def openai_error_response(error: BaseException) -> JSONResponse:
    """The OpenAI error shape with the mapped status (and Retry-After for 429)."""
    err = to_api_error(error)
    return JSONResponse(openai_error_body(err), status_code=err.status, headers=err.headers or None)


def native_error_response(error: BaseException) -> JSONResponse:
    """The original package's shape ``{"success": false, "message": ...}`` with the mapped status."""
    err = to_api_error(error)
    if isinstance(err, Forbidden):
        return role_denied_response()
    return JSONResponse({"success": False, "message": err.message}, status_code=err.status, headers=err.headers or None)


def role_denied_response() -> JSONResponse:
    """403 exactly as the original's role layer answered."""
    return JSONResponse(dict(ROLE_DENIED_BODY), status_code=403)
