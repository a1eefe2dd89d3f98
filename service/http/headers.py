"""The request id and the headers every answer carries, whatever its transport."""

from __future__ import annotations

import itertools
import re
import uuid

REQUEST_ID_HEADER = "x-request-id"
_ID_NAME = REQUEST_ID_HEADER.encode()
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Unique without a system call per request: a random prefix per process, then a counter (uuid4 reads urandom).
_ID_PREFIX = uuid.uuid4().hex[:16]
_request_ids = (f"{_ID_PREFIX}{n:016x}" for n in itertools.count())
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def raw_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def header_in(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    value = raw_header(headers, name)
    return None if value is None else value.decode("latin-1")


def request_id_for(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` if it is sane, else a new one."""
    incoming = header_in(headers, _ID_NAME)
    return incoming if incoming and _VALID_ID.match(incoming) else next(_request_ids)


def with_context_headers(headers: list[tuple[bytes, bytes]], request_id: str) -> list[tuple[bytes, bytes]]:
    """A response's headers with the request id (ours replaces any other) and the safe headers it lacks."""
    out = [h for h in headers if h[0].lower() != _ID_NAME]
    out.append((_ID_NAME, request_id.encode()))
    present = {k.lower() for k, _ in out}
    out += [h for h in SECURITY_HEADERS if h[0] not in present]
    return out
