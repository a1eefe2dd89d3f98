"""Errors a client can cause, each with its HTTP status and a stable code, and the one place they are rendered.

Every failure leaves the service as `{"error": {"code", "message", "detail"}}`, or under `/v2` as the Open
Inference Protocol's `{"error": "message"}`; messages say what was wrong and what to do, and never carry stack
traces or server file paths.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.responses import JSONResponse, Response

log = logging.getLogger("vitserve")


RETRY_AFTER_S = 1  # what `Retry-After` says of every refusal worth retrying: soon, here or elsewhere
_UNSET: Any = object()


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    retry_after: int | None = None  # seconds, sent as `Retry-After` (and gRPC's retry-after metadata)

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        code: str | None = None,
        retry_after: int | None = _UNSET,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}
        if status is not None:  # an error with no class of its own (Starlette's 405, say)
            self.status = status
        if code is not None:
            self.code = code
        if retry_after is not _UNSET:
            self.retry_after = retry_after
        if self.retry_after is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after))


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


# What a message may echo of client input only escaped: control characters (a log line or a terminal would act on
# them) and lone surrogates (a JSON string may hold them; UTF-8 cannot).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The answer when even an error cannot be rendered: fixed, ASCII, and never raising.
_FALLBACK = b'{"error":{"code":"internal_error","message":"internal error while answering","detail":null}}'
_FALLBACK_V2 = b'{"error":"internal error while answering"}'


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: Any) -> Any:
    """`value` (a message, or a detail of dicts, lists and strings) with unsafe characters spelt as escapes."""
    if isinstance(value, str):
        return _UNSAFE.sub(_escape_char, value)
    if isinstance(value, dict):
        return {escape(k): escape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape(v) for v in value]
    return value


def error_response(error: ServiceError, path: str) -> Response:
    """The error as the API at `path` renders it: the REST body with code and detail, or V2's message only.
    Whatever the error holds, this answers: client input in it is escaped, and an error that still cannot be
    rendered (a detail that is not JSON) becomes a fixed 500, logged."""
    v2 = is_v2(path)
    try:
        message = escape(error.message)
        body: dict[str, Any] = (
            {"error": message}
            if v2
            else {"error": {"code": error.code, "message": message, "detail": escape(error.detail)}}
        )
        return JSONResponse(body, error.status, headers=error.headers)
    except Exception:
        log.exception("an error answer (%s) could not be rendered; answering a plain 500", type(error).__name__)
        return Response(_FALLBACK_V2 if v2 else _FALLBACK, 500, media_type="application/json")


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
    """Not now (starting, stopping, the engine away): retry shortly, unless `retry_after=None` says otherwise."""

    status, code, retry_after = 503, "unavailable", RETRY_AFTER_S


class Overloaded(ServiceError):
    status, code, retry_after = 503, "overloaded", RETRY_AFTER_S
