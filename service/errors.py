"""Errors a client can cause, each with its HTTP status and a stable code.

Every failure leaves the service as `{"error": {"code", "message", "detail"}}`; messages say what was wrong
and what to do, and never carry stack traces or server file paths.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


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
