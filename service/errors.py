"""Errors a client can cause, each with its HTTP status and a stable code, and the one place they are rendered.

Every failure leaves the service as `{"error": {"code", "message", "detail"}}`, or under `/v2` as the Open
Inference Protocol's `{"error": "message"}`; messages say what was wrong and what to do, and never carry stack
traces or server file paths.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}
        if status is not None:  # an error with no class of its own (Starlette's 405, say)
            self.status = status
        if code is not None:
            self.code = code


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(error: ServiceError, path: str) -> JSONResponse:
    """The error as the API at `path` renders it: the REST body with code and detail, or V2's message only."""
    body: dict[str, Any] = (
        {"error": error.message}
        if is_v2(path)
        else {"error": {"code": error.code, "message": error.message, "detail": error.detail}}
    )
    return JSONResponse(body, error.status, headers=error.headers)


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"
