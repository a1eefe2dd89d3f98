"""Everything the two clients share that is not I/O: configuration, building requests, the retry policy,
parsing responses. `Client` and `AsyncClient` only send what this builds and sleep where it says."""

from __future__ import annotations

import email.utils
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from vitserve_client._images import PNG_SIGNATURE, ImageInput, to_upload
from vitserve_client._version import __version__
from vitserve_client.errors import REQUEST_ID_HEADER, TransportError, UnexpectedResponseError, error_from_response
from vitserve_client.models import (
    AttentionBatchResponse,
    AttentionMethod,
    AttentionPNG,
    AttentionResponse,
    BatchResponse,
    ClassifyResponse,
    HeadFusion,
    Health,
    ModelInfo,
    ModelList,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 3


class UseClientDefault:
    """Type of `USE_CLIENT_DEFAULT`: "the client's timeout", as opposed to `None`, which means no timeout."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()
TimeoutTypes = float | httpx.Timeout | None
Timeout = TimeoutTypes | UseClientDefault

# Errors where the request was not (completely) processed, or the connection broke: safe to send again, since
# every vitserve route is free of side effects. A connect timeout is here (no connection, so the server never saw
# the request); the other timeouts are not: after a read timeout the server may still be working on the request,
# and sending it again would add load where there is too much and multiply the wait the caller asked for.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# What each timeout means to the user, which of `httpx.Timeout`'s limits it ran into, and what to check (None:
# whether the server is running there, as for any failed connection).
_BUSY = "not sent again, as the server may be working on it: is it overloaded, or the timeout too short?"
_TIMEOUTS: dict[type[Exception], tuple[str, str, str | None]] = {
    httpx.ConnectTimeout: ("timed out connecting", "connect", None),
    httpx.ReadTimeout: ("timed out waiting for the answer", "read", _BUSY),
    httpx.WriteTimeout: ("timed out sending the request", "write", _BUSY),
    httpx.PoolTimeout: (
        "timed out waiting for a free connection in the client's pool",
        "pool",
        "too many calls in flight on this client for its timeout",
    ),
}


def check_base_url(url: str, *, name: str = "base_url") -> str:
    """`url` without a trailing slash; a ValueError naming `name` (where the URL came from) and the likely fix
    unless it is an http:// or https:// URL with a host (`127.0.0.1:8000` alone parses as scheme `127.0.0.1`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fix = f"; did you mean http://{url}?" if "://" not in url else ""
        raise ValueError(f"{name} {url!r} is not an http:// or https:// URL{fix}")
    return url.rstrip("/")


GATEWAY_STATUSES = frozenset({502, 503, 504})


def is_html(response: httpx.Response) -> bool:
    """Whether the body is an HTML page (a web server, proxy or portal that is not vitserve), whatever its status."""
    if "html" in response.headers.get("content-type", "").lower():
        return True
    start = response.content[:64].lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html"))


def _html_title(response: httpx.Response) -> str:
    match = re.search(rb"<title[^>]*>([^<]{1,120})</title>", response.content[:4096], re.IGNORECASE)
    return f" titled {match.group(1).decode('utf-8', 'replace').strip()!r}" if match else ""


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call before it is sent: the request, and how to turn the answer into a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    files: Sequence[tuple[str, tuple[str, bytes, str]]] | None = None
    ok: frozenset[int] = frozenset({200})
    retry_unavailable: bool = True  # False where a 503 is an answer (readiness), not a reason to wait


def _query(**params: Any) -> dict[str, Any]:
    # Absent and explicit are different to the server (e.g. head_fusion for method=layer): drop the Nones.
    return {k: v for k, v in params.items() if v is not None}


class _NotExpected(Exception):
    """Raised by a parser: the body is not what the call expects (`BaseClient._result` words the error)."""


def _json(model: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise _NotExpected(f"a body that is not a {model.__name__} ({where}: {first['msg']})") from e

    return parse


def _png(response: httpx.Response) -> AttentionPNG:
    if not response.content.startswith(PNG_SIGNATURE):
        raise _NotExpected(f"{response.headers.get('content-type', 'no content type')}, not a PNG")
    return AttentionPNG(data=response.content, request_id=response.headers.get(REQUEST_ID_HEADER))


def _route(model: str | None, action: str) -> str:
    return f"/v1/{action}" if model is None else f"/v1/models/{quote(model, safe='')}/{action}"


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The server's `Retry-After`, in seconds (delay-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class BaseClient:
    """Configuration and request building shared by `Client` and `AsyncClient`.

    `base_url` defaults to $VITSERVE_URL, then http://127.0.0.1:8000; `api_key` to $VITSERVE_API_KEY (sent as
    `Authorization: Bearer`). `timeout` (seconds, or an `httpx.Timeout`; None: wait forever) applies to every
    call that does not pass its own, to each of connecting, sending and waiting for the answer. A failed
    connection (refused, reset, or not made within the timeout) or a 503 is retried up to `max_retries` times,
    waiting `backoff * 2**n` seconds (at most `max_backoff`) with jitter, or the server's `Retry-After` (also
    capped at `max_backoff`); an answer that is late (a read timeout), a 4xx and other 5xx are never retried.
    """

    # How the user names the server's URL, for error messages (the CLI says --url).
    _url_hint = "set VITSERVE_URL or pass base_url"

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 (got {max_retries})")
        if base_url:
            self.base_url = check_base_url(base_url)
        elif os.environ.get("VITSERVE_URL"):
            self.base_url = check_base_url(os.environ["VITSERVE_URL"], name="$VITSERVE_URL")
        else:
            self.base_url = DEFAULT_URL
        self.api_key = api_key if api_key is not None else os.environ.get("VITSERVE_API_KEY") or None
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = {"User-Agent": f"vitserve-client/{__version__}", **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def _http_options(self) -> dict[str, Any]:
        """Keyword arguments for the httpx client (the one connection pool this SDK client keeps)."""
        return {"base_url": self.base_url, "headers": self.headers, "timeout": self.timeout}

    # --- requests -------------------------------------------------------------------------------------------

    def _health(self) -> Call[Health]:
        return Call("GET", "/healthz", _json(Health))

    def _ready(self) -> Call[Health]:
        return Call("GET", "/readyz", _json(Health), ok=frozenset({200, 503}), retry_unavailable=False)

    def _models(self) -> Call[ModelList]:
        return Call("GET", "/v1/models", _json(ModelList))

    def _model(self, name: str) -> Call[ModelInfo]:
        return Call("GET", f"/v1/models/{quote(name, safe='')}", _json(ModelInfo))

    def _classify(self, image: ImageInput, model: str | None, top_k: int | None) -> Call[ClassifyResponse]:
        return Call(
            "POST",
            _route(model, "classify"),
            _json(ClassifyResponse),
            params=_query(top_k=top_k),
            files=[("file", to_upload(image))],
        )

    def _classify_batch(
        self, images: Iterable[ImageInput], model: str | None, top_k: int | None
    ) -> Call[BatchResponse]:
        files = [("files", to_upload(image)) for image in images]
        if not files:
            raise ValueError("classify_batch needs at least one image")
        return Call(
            "POST", _route(model, "classify/batch"), _json(BatchResponse), params=_query(top_k=top_k), files=files
        )

    def _attention(
        self,
        image: ImageInput,
        model: str | None,
        *,
        method: AttentionMethod,
        layer: int | None,
        head: int | None,
        head_fusion: HeadFusion | None,
        discard_ratio: float | None,
        format: str,
        alpha: float | None,
        top_k: int | None,
        target: int | str | None = None,
    ) -> Call[AttentionResponse] | Call[AttentionPNG]:
        if format not in ("json", "png"):
            raise ValueError(f"format must be 'json' or 'png' (got {format!r})")
        params = _query(
            method=method,
            layer=layer,
            head=head,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            target=target,
            format=format,
            alpha=alpha,
            top_k=top_k,
        )
        files = [("file", to_upload(image))]
        path = _route(model, "attention")
        if format == "png":
            return Call("POST", path, _png, params=params, files=files)
        return Call("POST", path, _json(AttentionResponse), params=params, files=files)

    def _attention_batch(
        self,
        images: Iterable[ImageInput],
        model: str | None,
        *,
        method: AttentionMethod,
        layer: int | None,
        head: int | None,
        head_fusion: HeadFusion | None,
        discard_ratio: float | None,
        top_k: int | None,
        target: int | str | None = None,
    ) -> Call[AttentionBatchResponse]:
        files = [("files", to_upload(image)) for image in images]
        if not files:
            raise ValueError("attention_batch needs at least one image")
        params = _query(
            method=method,
            layer=layer,
            head=head,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            target=target,
            top_k=top_k,
        )
        return Call("POST", _route(model, "attention/batch"), _json(AttentionBatchResponse), params=params, files=files)

    # --- responses and retries ------------------------------------------------------------------------------

    @staticmethod
    def _timeout(timeout: Timeout) -> Any:
        return httpx.USE_CLIENT_DEFAULT if isinstance(timeout, UseClientDefault) else timeout

    def _result(self, call: Call[T], response: httpx.Response) -> T:
        # vitserve's API never answers with an HTML page: that is another web server, a portal, or a proxy with
        # no route to vitserve. Said so here, not passed on as an API error with a page of markup for a message.
        # A gateway's 502/503/504 page speaks for the server behind it, and goes on to the status (a load
        # balancer's 503 is retried like vitserve's own).
        if response.status_code not in GATEWAY_STATUSES and is_html(response):
            raise self._unexpected(
                response,
                f"an HTML page{_html_title(response)}",
                f"the server at {self.base_url} is not vitserve, or vitserve is not at that URL",
            )
        if response.status_code not in call.ok:
            raise error_from_response(response)
        try:
            return call.parse(response)
        except _NotExpected as e:
            raise self._unexpected(
                response, str(e), f"is {self.base_url} a vitserve server of a compatible version?"
            ) from e.__cause__

    def _unexpected(self, response: httpx.Response, what: str, verdict: str) -> UnexpectedResponseError:
        request = response.request
        return UnexpectedResponseError(
            f"{request.method} {request.url} answered {response.status_code} with {what}: {verdict} ({self._url_hint})",
            response=response,
        )

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": half the exponential step is fixed, half random, so clients that failed together
        # spread out but none retries at once.
        step = min(self.max_backoff, self.backoff * 2.0**attempt)
        return step / 2 + random.uniform(0, step / 2)

    def _retry_delay(self, call: Call[Any], attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before sending `call` again after `response`, or None to stop here."""
        if attempt >= self.max_retries or response.status_code != 503 or not call.retry_unavailable:
            return None
        after = retry_after_seconds(response)
        if after is None:
            return self._backoff(attempt)
        return min(self.max_backoff, after) * random.uniform(1.0, 1.1)

    def _transport_delay(self, attempt: int, error: httpx.TransportError) -> float | None:
        if attempt >= self.max_retries or not isinstance(error, RETRYABLE_ERRORS):
            return None
        return self._backoff(attempt)

    def _transport_error(self, error: httpx.TransportError, attempts: int) -> TransportError:
        try:
            request: httpx.Request | None = error.request
        except RuntimeError:
            request = None
        where = f"{request.method} {request.url}" if request is not None else self.base_url
        kind, limit, advice = _TIMEOUTS.get(type(error), ("failed", "", None))
        seconds = request.extensions.get("timeout", {}).get(limit) if request is not None and limit else None
        facts = [f"limit {seconds:g} s"] if seconds is not None else []
        facts += [f"{attempts} attempts"] if attempts > 1 else []
        details = f" ({', '.join(facts)})" if facts else ""
        said = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if advice is None:
            advice = f"is the server running at {self.base_url}? ({self._url_hint})"
        return TransportError(f"{where} {kind}{details}: {said}; {advice}", request=request)
