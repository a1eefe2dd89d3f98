"""Who may call the service: optional API keys, and which browser origins may read its answers (CORS).

API keys are off until `VITSERVE_API_KEYS` or `VITSERVE_API_KEYS_FILE` names at least one. Then every route
except the open ones (`VITSERVE_OPEN_ROUTES`: probes, metrics, the demo page's own files) needs
`Authorization: Bearer <key>` or `X-API-Key: <key>`; anything else is 401 with `WWW-Authenticate: Bearer`,
decided before routing, so an unknown path without a key is 401 too and routes cannot be enumerated.

With keys on, the OpenAPI document declares both ways to send a key (`document_api_keys`) on every operation
that needs one, and on no open one, so Swagger UI at `/docs` offers Authorize and generated clients send the
header. Without keys the document declares no scheme: a client generated from it has nothing to configure.

The V2 model repository extension (its routes' access is `admin` in service.route_table: index, load, unload) is another matter: it changes what is
served, so it takes an admin key (`VITSERVE_ADMIN_KEYS`, sent the same ways), never an API key, and with no
admin key configured it is off (403). Both decisions are `Access.check`, made before a request's body is read or
anything is reserved for it: a client without a key holds nothing.

A presented key's SHA-256 is compared with every configured key's by `hmac.compare_digest`, all of them every
time, so the answer's timing says nothing about how much of a key (or its length) was right. Keys are never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi import FastAPI

from service.errors import Forbidden, Unauthorized
from service.http.headers import REQUEST_ID_HEADER, header_in
from service.obs.metrics import METRICS
from service.route_table import is_admin
from service.v2.codec import HEADER_LENGTH

AUTH_HEADERS = ["Authorization", "X-API-Key"]
# OpenAPI security schemes: the two headers `presented_key` reads. Either one is enough (two requirement objects).
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: <key>`"},
}
UNAUTHORIZED_RESPONSE = {"description": "no API key was sent, or it is not valid (`WWW-Authenticate: Bearer`)"}


def is_open(path: str, open_routes: list[str]) -> bool:
    """`/metrics` matches itself only; `/v2/health/*` matches every path below `/v2/health/`."""
    return any(path.startswith(r[:-1]) if r.endswith("*") else path == r for r in open_routes)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    authorization = header_in(headers, b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip().encode("latin-1")
    api_key = header_in(headers, b"x-api-key")
    return api_key.strip().encode("latin-1") if api_key else None


class KeySet:
    """Keys, kept as digests and compared digest to digest: equal lengths, so not even a key's length shows in
    the timing."""

    def __init__(self, keys: list[str]) -> None:
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def accepts(self, candidate: bytes | None) -> bool:
        if candidate is None:
            return False
        digest = hashlib.sha256(candidate).digest()
        matched = False
        for key in self.digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(digest, key)
        return matched


class Access:
    """Who may call what, decided before anything is reserved for a request: API keys for every route but the
    open ones (when any is configured), admin keys for the repository extension (off while none is). `check`
    is the one decision, made by the gate (service.http.gate) for every transport."""

    def __init__(self, api_keys: list[str], admin_keys: list[str], open_routes: list[str]) -> None:
        self.api = KeySet(api_keys) if api_keys else None
        self.admin = KeySet(admin_keys) if admin_keys else None
        self.open_routes = open_routes

    def check(self, path: str, headers: list[tuple[bytes, bytes]]) -> Unauthorized | Forbidden | None:
        """None when the request may go on; else the 401 or 403 to answer with (counted)."""
        if is_admin(path):
            return self._admin(headers)
        if self.api is None or is_open(path, self.open_routes):
            return None
        candidate = presented_key(headers)
        if self.api.accepts(candidate):
            return None
        METRICS.refused.labels(reason="unauthorized").inc()
        problem = "no API key was sent" if candidate is None else "the API key is not valid"
        return Unauthorized(
            f"{problem}; send it as `Authorization: Bearer <key>` (or `X-API-Key: <key>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _admin(self, headers: list[tuple[bytes, bytes]]) -> Unauthorized | Forbidden | None:
        """The repository extension's gate: 403 while no admin key is configured, 401 without a valid one."""
        if self.admin is None:
            return Forbidden(
                "the model repository extension is disabled on this server; set VITSERVE_ADMIN_KEYS to enable it"
            )
        candidate = presented_key(headers)
        if self.admin.accepts(candidate):
            return None
        METRICS.refused.labels(reason="unauthorized").inc()
        problem = "no admin key was sent" if candidate is None else "the admin key is not valid"
        return Unauthorized(
            f"{problem}; the model repository extension needs a key of VITSERVE_ADMIN_KEYS as "
            "`Authorization: Bearer <key>` (or `X-API-Key: <key>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def document_api_keys(app: FastAPI, open_routes: list[str]) -> None:
    """Declare the API-key schemes in `app`'s OpenAPI document, on the operations that need a key only."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI's own, which it caches in app.openapi_schema: amended here, once
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        for path, operations in schema.get("paths", {}).items():
            if is_open(path, open_routes):  # a path template: `{name}` matches `/*` patterns as any name would
                continue
            for operation in operations.values():
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                operation.setdefault("responses", {})["401"] = UNAUTHORIZED_RESPONSE
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def cors_options(origins: list[str]) -> dict[str, Any]:
    """Starlette CORSMiddleware arguments: the given origins may call the API and read its answers (no cookies)."""
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST"],
        "allow_headers": [*AUTH_HEADERS, "Content-Type", REQUEST_ID_HEADER, HEADER_LENGTH],
        "expose_headers": [REQUEST_ID_HEADER, "Retry-After", HEADER_LENGTH],
        "allow_credentials": False,
        "max_age": 600,
    }
