"""Exceptions raised by the vitserve client.

Every failure is a `VitserveError`; catch a narrower class to handle one case::

    VitserveError                    anything this package raises about a call
    ├── TransportError               no HTTP answer: connection refused or reset, DNS, timeouts
    ├── UnexpectedResponseError      not a vitserve answer (wrong URL?): an HTML page, or a body of another shape
    └── APIError                     the server answered with an error status (body {"error": {...}})
        ├── BadImageError            400 bad_image: empty, undecodable or truncated image
        ├── BadRequestError          400 (other codes): malformed multipart, missing field
        ├── AuthenticationError      401: missing or wrong API key
        ├── NotFoundError            404: unknown model, route, layer or head
        ├── PayloadTooLargeError     413: body, pixel count or file count over the server's limit
        ├── UnsupportedMediaTypeError 415: content type or image format not accepted
        ├── InvalidParameterError    422: a query parameter out of range or not applicable
        ├── OverloadedError          503: loading or overloaded, still 503 after the retries
        └── ServerError              other 5xx: a server fault

An `APIError` carries `status`, `code`, `message`, `detail`, `request_id` (quote it when reporting a problem),
and the httpx `request` and `response`. A `TransportError` carries the httpx `request` and the httpx error
as `__cause__`. Other 4xx statuses (405, ...) raise `APIError` itself.
"""

from __future__ import annotations

from typing import Any

import httpx

REQUEST_ID_HEADER = "x-request-id"  # the server echoes or assigns one per request

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadImageError",
    "BadRequestError",
    "InvalidParameterError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ServerError",
    "TransportError",
    "UnexpectedResponseError",
    "UnsupportedMediaTypeError",
    "VitserveError",
    "error_from_response",
]


class VitserveError(Exception):
    """Base class of every exception this package raises about a call."""


class TransportError(VitserveError):
    """The request got no HTTP answer (after the retries): the server is down, unreachable or too slow."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class UnexpectedResponseError(VitserveError):
    """An answer that no vitserve server sends: an HTML page (whatever the status, but for a gateway's 502, 503 or
    504, which speaks for the server behind it), or a success whose body is not what the call expects."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.message = message
        self.request = _request_of(response)
        self.response = response


class APIError(VitserveError):
    """The server answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        detail: Any = None,
        request_id: str | None = None,
        request: httpx.Request | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.request = request
        self.response = response

    def __str__(self) -> str:
        rid = f", request id {self.request_id}" if self.request_id else ""
        return f"{self.status} {self.code}: {self.message}{rid}"

    def to_dict(self) -> dict[str, Any]:
        """The error as plain data (what the CLI prints with --json)."""
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "detail": self.detail,
            "request_id": self.request_id,
        }


class BadImageError(APIError):
    """400 bad_image: the bytes are empty, not an image, or a damaged one."""


class BadRequestError(APIError):
    """400 with another code: the request itself is malformed."""


class AuthenticationError(APIError):
    """401: the API key is missing or wrong (pass `api_key=` or set VITSERVE_API_KEY)."""


class NotFoundError(APIError):
    """404: unknown model, route, layer or head."""


class PayloadTooLargeError(APIError):
    """413: the body, the image's pixel count or the number of files is over the server's limit."""


class UnsupportedMediaTypeError(APIError):
    """415: the content type or the image format is not accepted."""


class InvalidParameterError(APIError):
    """422: a query parameter is out of range or does not apply to the chosen method."""


class OverloadedError(APIError):
    """503: the server is loading its models or overloaded, and stayed so through the retries."""


class ServerError(APIError):
    """5xx other than 503: a fault in the server (never caused by the request); quote the request id."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidParameterError,
    503: OverloadedError,
}


def _error_body(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:  # a proxy's HTML page, an empty body, ...
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response: the class from the status (and code), fields from the body."""
    status = response.status_code
    error = _error_body(response)
    if error is not None:
        code = str(error.get("code") or f"http_{status}")
        message = str(error.get("message") or response.reason_phrase)
        detail = error.get("detail")
        request_id = error.get("request_id")
    else:
        code, detail, request_id = f"http_{status}", None, None
        text = response.text.strip()[:200]
        message = f"{response.reason_phrase}: {text}" if text else response.reason_phrase
    if status == 400 and code == "bad_image":
        cls: type[APIError] = BadImageError
    else:
        cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(
        message,
        status=status,
        code=code,
        detail=detail,
        request_id=str(request_id or response.headers.get(REQUEST_ID_HEADER) or "") or None,
        request=_request_of(response),
        response=response,
    )


def _request_of(response: httpx.Response) -> httpx.Request | None:
    try:
        return response.request
    except RuntimeError:  # a Response built by hand, with no request attached
        return None
