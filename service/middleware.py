"""Pure-ASGI middleware: request ids and safe headers on every response, the request body limit, and the limit
on inference requests in progress. Each rule is a function or class here that the direct path
(service.fast_path) applies too.

The body limit is enforced while the body is read: a `Content-Length` over the limit is refused before a byte
of the body is read, and a chunked body is cut off as soon as it passes the limit, so nothing is buffered
beyond it. Errors answered here are rendered by `service.errors.error_response`, like every other error.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import time
import uuid
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable, error_response
from service.logs import REQUEST_ID
from service.memory import ByteBudget
from service.metrics import METRICS

log = logging.getLogger("vitserve")

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Unique without a system call per request: a random prefix per process, then a counter (uuid4 reads urandom).
_ID_PREFIX = uuid.uuid4().hex[:16]
_request_ids = (f"{_ID_PREFIX}{n:016x}" for n in itertools.count())
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


_OVER_EVERY_LIMIT = 1 << 64


def content_length(value: bytes) -> int | None:
    """A `Content-Length` header's size, or None when the value is not one (anything but ASCII digits). Any
    number of digits is a size: zero-padded, or 20 digits and more (then over every limit), so that it meets the
    body limit at once, never a deadline."""
    if not value.isdigit():  # bytes: ASCII digits only
        return None
    significant = value.lstrip(b"0")
    return int(significant or b"0") if len(significant) <= 19 else _OVER_EVERY_LIMIT


async def send_error(scope: Scope, send: Send, error: ServiceError) -> None:
    """Answer with `error` from inside a middleware, before or instead of the app. Every caller runs inside
    `RequestContextMiddleware`, which adds the request id and the safe headers."""
    await error_response(error, scope["path"])(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}  # a Response never reads the request; this is only its signature


_ID_NAME = REQUEST_ID_HEADER.encode()


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


def cut_off_by_shutdown(request_id: str) -> Unavailable:
    log.warning("request %s was cut off by the shutdown (VITSERVE_SHUTDOWN_GRACE_S)", request_id)
    return Unavailable("the server shut down before this request finished; retry", headers={"Retry-After": "1"})


def internal_error(request_id: str, path: str) -> Response:
    """A fault of ours: the traceback goes to the log only; the body names the request, never a file, line or
    exception text. Carries the request id and safe headers itself (it may answer from outside the middleware)."""
    log.exception("request %s failed", request_id)
    headers = {REQUEST_ID_HEADER: request_id, **{k.decode(): v.decode() for k, v in SECURITY_HEADERS}}
    message = f"internal error; quote request id {request_id} when reporting it"
    return error_response(ServiceError(message, headers=headers), path)


class RequestContextMiddleware:
    """Give each request an id (the client's `X-Request-ID` if it is sane), echo it, add security headers.

    A request still running when the shutdown grace period ends is cancelled by uvicorn; it answers 503 with
    `Retry-After` (retry elsewhere), not uvicorn's bare 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # for service.logs; this request's task holds its own value

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": with_context_headers(message.get("headers", []), request_id)}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            if started:
                raise
            await send_error(scope, send_with_headers, cut_off_by_shutdown(request_id))


class RequestBodyMiddleware:
    """The body limit for every request; for inference requests also the body deadline and the body budget.

    An inference request's body is read whole here, before the concurrency limit admits it and before any route
    sees it, so a slow upload holds only its connection and its reserved bytes, never an inference slot. The
    body must keep pace: it may take `grace_s` plus its size at `min_rate` bytes/s, checked as it arrives
    (a client that declares 15 MB and sends 10 bytes/s is cut off after about `grace_s`), else 408 and the
    connection is closed. Its bytes are reserved from `budget` as they arrive, `RESERVE_STEP` ahead, not as
    declared: a declared size costs nothing until it is sent, so connections that declare large bodies and
    trickle them cannot fill the budget (and lock honest uploads out) while holding next to no memory. When the
    budget stays full the answer is 503 + Retry-After.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, budget: ByteBudget, grace_s: float, min_rate: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget
        self.grace_s = grace_s
        self.min_rate = min_rate

    def _too_large(self, size: int | None = None) -> PayloadTooLarge:
        got = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"  # chunked: size unknown
        return PayloadTooLarge(
            f"request body is {got}; the limit is {self.max_bytes} bytes (VITSERVE_MAX_BODY_BYTES)",
            detail={"limit_bytes": self.max_bytes},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = raw_header(scope["headers"], b"content-length")
        size = None if declared is None else content_length(declared)
        if size is not None and size > self.max_bytes:
            refused = self._too_large(size)
            refused.headers["Connection"] = "close"  # the body it declared may be on its way: not read
            await send_error(scope, send, refused)
            return
        if reads_body_whole(scope):
            await self._buffered(scope, receive, send, size)
        else:
            await self._streamed(scope, receive, send)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        reservation = _BodyReservation(self.budget, self.max_bytes if size is None else size)
        try:
            try:
                body = await self._read(receive, reservation)
            except _ClientGone:
                return
            except (PayloadTooLarge, RequestTimeout, Overloaded) as e:
                await send_error(scope, send, e)
                return
            delivered = False

            async def replay() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: only a disconnect can come

            await self.app(scope, replay, send)
        finally:
            reservation.release()

    async def _read(self, receive: Receive, reservation: _BodyReservation) -> bytes:
        chunks: list[bytes] = []
        received = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # One deadline for the whole body, moved on as bytes arrive: grace plus size at the minimum rate.
            async with asyncio.timeout_at(started + self.grace_s) as deadline:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > self.max_bytes:
                        raise self._too_large()
                    await reservation.cover(received)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
                    deadline.reschedule(started + self.grace_s + received / self.min_rate)
        except TimeoutError:
            raise body_too_slow(received, loop.time() - started, self.grace_s, self.min_rate) from None

    async def _streamed(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as e:  # raised inside body reading that no handler turned into a response
            if not started:
                await send_error(scope, send, e)


def body_too_slow(received: int, elapsed_s: float, grace_s: float, min_rate: int) -> RequestTimeout:
    """The body did not keep pace (counted; the connection is closed after the answer)."""
    METRICS.connections_refused.labels(reason="body_timeout").inc()
    return RequestTimeout(
        f"the request body arrived too slowly ({received} bytes in {elapsed_s:.1f} s); "
        f"send it within {grace_s:g} s plus {min_rate} bytes/s (VITSERVE_BODY_TIMEOUT_S, VITSERVE_BODY_MIN_RATE)",
        headers={"Connection": "close"},  # the rest of the body may still be on its way
    )


RESERVE_STEP = 1 << 20  # a body's reservation runs this far ahead of its bytes: one budget call per MiB, not per chunk


class _BodyReservation:
    """The bytes of one request body reserved from the body budget: what has arrived, rounded up a step."""

    def __init__(self, budget: ByteBudget, declared: int) -> None:
        self.budget = budget
        self.declared = declared
        self.held = 0

    async def cover(self, received: int) -> None:
        """Hold at least `received` bytes (within the budget's size), or raise Overloaded (503)."""
        if received <= self.held or self.held >= self.budget.limit:
            return
        want = max(min(received + RESERVE_STEP, self.declared), received) - self.held
        got = await self.budget.reserve_async(want)
        if got is None:
            raise Overloaded(
                "the server holds too many request bodies in flight (VITSERVE_BODY_BUDGET_BYTES); retry shortly",
                headers={"Retry-After": "1", "Connection": "close"},  # the rest of the body may be on its way
            )
        self.held += got

    def release(self) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0


class _ClientGone(Exception):
    """The client disconnected before its body was complete: there is no one to answer."""


# The control plane: POSTs that change what is served or registered, never shed by the data plane's admission.
CONTROL_PREFIXES = ("/v2/repository/", "/v2/systemsharedmemory/")


def reads_body_whole(scope: Scope) -> bool:
    """Every POST under /v1 and /v2: its body is read whole, against the body budget and its deadline."""
    return scope["method"] == "POST" and scope["path"].startswith(("/v1/", "/v2/"))


def is_inference(scope: Scope) -> bool:
    """A POST that runs a model (classify, attention, V2 infer): every one under /v1 and /v2 but the control
    plane's (the repository and shared-memory extensions), which an operator must reach during an overload."""
    return reads_body_whole(scope) and not scope["path"].startswith(CONTROL_PREFIXES)


class Admission:
    """At most `limit` inference requests in progress (from a complete body to the answer); one more is refused
    at once with 503 + Retry-After instead of queueing without bound. One per server process, shared by the
    middleware and the direct path (service.fast_path); one event loop, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0

    def enter(self, route: str = "") -> Overloaded | None:
        """Admit the request (then `leave()` when it is answered), or the error to answer with. `route`: its path,
        for `service.admission.AdaptiveAdmission`, which keeps each route's latency."""
        if self.in_progress >= self.limit:
            METRICS.refused.labels(reason="concurrency").inc()
            return Overloaded(
                f"the server has {self.limit} inference requests in progress "
                "(VITSERVE_MAX_CONCURRENT_REQUESTS); retry shortly",
                detail={"limit": self.limit},
                headers={"Retry-After": "1"},
            )
        self.in_progress += 1
        return None

    def leave(self) -> None:
        self.in_progress -= 1


class ConcurrencyLimitMiddleware:
    """`Admission` for inference requests; probes and metrics never count."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_inference(scope):
            await self.app(scope, receive, send)
            return
        refused = self.admission.enter(scope["path"])
        if refused is not None:
            await send_error(scope, send, refused)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()


# Label values come from fixed sets, whatever a client sends: an invented method is "other", a path is its route
# template or "unmatched" (Prometheus keeps one series per label value, forever).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@functools.cache  # bounded: routes, methods and statuses all come from fixed sets
def _http_series(route: str, method: str, status: int) -> tuple[Any, Any]:
    """The labelled request counter and latency histogram (a label lookup costs more than the increment)."""
    return METRICS.requests.labels(route, method, str(status)), METRICS.latency.labels(route, method)


def record_request(route: str, method: str, status: int, started: float, model: Any) -> None:
    """Count and time one answered HTTP request; an inference request also by the model it served."""
    counter, histogram = _http_series(route, method if method in _METHODS else "other", status)
    counter.inc()
    elapsed = time.perf_counter() - started
    histogram.observe(elapsed)
    if model is not None:
        METRICS.observe_request(model.name, model.meta.version, status < 400, elapsed)


class MetricsMiddleware:
    """Count and time every HTTP request by route template, and each inference request by the model it served
    (`service.deps.served_model` notes it on the request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        METRICS.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            METRICS.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            record_request(route, scope["method"], status, started, scope.get("state", {}).get("model"))
