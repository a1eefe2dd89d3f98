"""The gate: one life for every request, whatever its transport.

A request over HTTP through ASGI (`service.http.middleware.GateMiddleware`), over HTTP answered by the connection
itself (`service.http.fast_path`), or a gRPC call (`service.grpc_v2.server`) is opened here as a `Ticket` once its
headers (or metadata) are in, and closed exactly once when it ends, whichever way it ends:

    open     the request id; a place in the in-flight gauge; refused at once (nothing reserved) when its key is
             missing or wrong (`service.http.security.Access`) or its declared body is over the limit
    body     its bytes covered from the body budget as they arrive (`cover`), at the pace `body_due` allows
    admit    an inference slot, once the body is complete (`service.core.admission`)
    close    the slot, the body's bytes and the in-flight place given back; the request counted and timed

The transports only move bytes: which rule applies, its numbers and the words of each refusal live here, and an
adapter holds its ticket in a `try`/`finally` (or a close callback that always runs), so that nothing a request
took can outlive it. Errors are rendered by `service.errors.error_response`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from service.errors import Overloaded, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable, error_response
from service.http.headers import REQUEST_ID_HEADER, SECURITY_HEADERS, raw_header, request_id_for
from service.http.security import Access
from service.obs.logs import ACCESS_LOGGER
from service.obs.metrics import METRICS
from service.route_table import is_control, is_inference

if TYPE_CHECKING:
    from service.core.admission import Admission
    from service.core.budgets import ByteBudget
    from service.settings import Settings

log = logging.getLogger("vitserve")


# --- what a request is -----------------------------------------------------------------------------------------
def reads_body_whole(method: str, path: str) -> bool:
    """A request whose body is read whole, against the body budget and its deadline, before its route sees it:
    inference and the control plane (service.route_table)."""
    return is_inference(method, path) or is_control(method, path)


_OVER_EVERY_LIMIT = 1 << 64


def content_length(value: bytes) -> int | None:
    """A `Content-Length` header's size, or None when the value is not one (anything but ASCII digits). Any
    number of digits is a size: zero-padded, or 20 digits and more (then over every limit), so that it meets the
    body limit at once, never a deadline."""
    if not value.isdigit():  # bytes: ASCII digits only
        return None
    significant = value.lstrip(b"0")
    return int(significant or b"0") if len(significant) <= 19 else _OVER_EVERY_LIMIT


# --- refusals and faults, worded once --------------------------------------------------------------------------
def body_too_slow(received: int, elapsed_s: float, grace_s: float, min_rate: int) -> RequestTimeout:
    """The body did not keep pace (counted; the connection is closed after the answer)."""
    METRICS.connections_refused.labels(reason="body_timeout").inc()
    return RequestTimeout(
        f"the request body arrived too slowly ({received} bytes in {elapsed_s:.1f} s); "
        f"send it within {grace_s:g} s plus {min_rate} bytes/s (VITSERVE_BODY_TIMEOUT_S, VITSERVE_BODY_MIN_RATE)",
        headers={"Connection": "close"},  # the rest of the body may still be on its way
    )


def cut_off_by_shutdown(request_id: str) -> Unavailable:
    log.warning("request %s was cut off by the shutdown (VITSERVE_SHUTDOWN_GRACE_S)", request_id)
    return Unavailable("the server shut down before this request finished; retry")


def internal_error(request_id: str, path: str) -> Response:
    """A fault of ours: the traceback goes to the log only; the body names the request, never a file, line or
    exception text. Carries the request id and safe headers itself (it may answer from outside the middleware)."""
    log.exception("request %s failed", request_id)
    headers = {REQUEST_ID_HEADER: request_id, **{k.decode(): v.decode() for k, v in SECURITY_HEADERS}}
    message = f"internal error; quote request id {request_id} when reporting it"
    return error_response(ServiceError(message, headers=headers), path)


# --- counting --------------------------------------------------------------------------------------------------
# Label values come from fixed sets, whatever a client sends: an invented method is "other", a path is its route
# template or "unmatched" (Prometheus keeps one series per label value, forever).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@functools.cache  # bounded: routes, methods and statuses all come from fixed sets
def _http_series(route: str, method: str, status: int) -> tuple[Any, Any]:
    """The labelled request counter and latency histogram (a label lookup costs more than the increment)."""
    return METRICS.requests.labels(route, method, str(status)), METRICS.latency.labels(route, method)


@functools.cache
def _grpc_series(method: str, code: str) -> tuple[Any, Any]:
    return METRICS.grpc_requests.labels(method, code), METRICS.grpc_latency.labels(method)


# --- the gate and its tickets ----------------------------------------------------------------------------------
RESERVE_STEP = 1 << 20  # a body's reservation runs this far ahead of its bytes: one budget call per MiB, not per chunk


class Gate:
    """The rules of one server process, and the shared things they hand out (the body budget, admission)."""

    def __init__(self, settings: Settings, access: Access, budget: ByteBudget | None, admission: Admission) -> None:
        self.access = access
        self.budget = budget
        self.admission = admission
        self.max_body = settings.max_body_bytes
        self.grace_s = settings.body_timeout_s
        self.min_rate = settings.body_min_rate

    def open(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        *,
        request_id: str | None = None,
        declared: int | None = None,
    ) -> Ticket:
        """An HTTP request whose headers are in (`request_id`: already given by the ASGI context middleware;
        `declared`: its Content-Length, if the caller has parsed it already)."""
        ticket = Ticket(self, method, path, headers, request_id or request_id_for(headers), http=True)
        ticket.declared = declared
        return ticket

    def open_call(self, rpc: str, rest_path: str, metadata: list[tuple[bytes, bytes]]) -> Ticket:
        """A gRPC call; `rest_path`: its REST twin's path, whose openness (keys) it shares."""
        return Ticket(self, rpc, rest_path, metadata, request_id_for(metadata), http=False)

    def too_large(self, size: int | None = None) -> PayloadTooLarge:
        got = f"{size} bytes" if size is not None else f"more than {self.max_body} bytes"  # chunked: size unknown
        return PayloadTooLarge(
            f"request body is {got}; the limit is {self.max_body} bytes (VITSERVE_MAX_BODY_BYTES)",
            detail={"limit_bytes": self.max_body},
        )


# Every HTTP answer's access line, ASGI or direct, is logged here, once (uvicorn's own access log is off);
# service.obs.logs gives the JSON format its parts as fields.
ACCESS_LOG = logging.getLogger(ACCESS_LOGGER)


def log_access(client: tuple[str, int] | None, method: str, target: str, http_version: str, status: int) -> None:
    """The access line of an HTTP answer, in uvicorn's words (the formatters read the arguments by position)."""
    if ACCESS_LOG.isEnabledFor(logging.INFO):
        peer = f"{client[0]}:{client[1]}" if client else "-"
        ACCESS_LOG.info('%s - "%s %s HTTP/%s" %d', peer, method, target, http_version, status)


class Ticket:
    """One request's life: what it holds, and the one `close` that gives it all back (idempotent)."""

    __slots__ = (
        "admitted",
        "arrived",
        "closed",
        "counted",
        "declared",
        "gate",
        "headers",
        "held",
        "http",
        "label",
        "method",
        "model",
        "path",
        "request_id",
        "started",
    )

    def __init__(
        self, gate: Gate, method: str, path: str, headers: list[tuple[bytes, bytes]], request_id: str, *, http: bool
    ) -> None:
        self.gate = gate
        self.method = method  # HTTP's method, or the RPC's name
        self.path = path
        self.headers = headers
        self.request_id = request_id
        self.http = http
        self.label = "unmatched" if http else method  # the metrics' route: its template, once known
        self.model: Any = None  # the model it served, noted by the route (per-model counters)
        self.started = time.perf_counter()
        self.arrived = asyncio.get_running_loop().time()  # the body's pace is measured from here
        self.declared: int | None = None
        self.held = 0  # bytes reserved from the body budget
        self.admitted = False
        self.closed = self.counted = False
        if http:
            METRICS.in_flight.inc()

    # --- at once, from the headers ------------------------------------------------------------------------------
    def refusal(self) -> ServiceError | None:
        """Why the request is refused before a byte of its body is read or reserved, or None. Reads the declared
        body size (`declared`)."""
        refused = self.gate.access.check(self.path, self.headers)
        if refused is not None:
            return refused
        if self.http and self.declared is None:
            value = raw_header(self.headers, b"content-length")
            self.declared = None if value is None else content_length(value)
        if self.declared is not None and self.declared > self.gate.max_body:
            too_large = self.gate.too_large(self.declared)
            too_large.headers["Connection"] = "close"  # the body it declared may be on its way: not read
            return too_large
        return None

    # --- the body -----------------------------------------------------------------------------------------------
    def _want(self, received: int) -> int:
        """Bytes to reserve so that `received` are held, a step ahead within the declared (or largest) size."""
        budget = self.gate.budget
        if budget is None or received <= self.held or self.held >= budget.limit:
            return 0
        end = self.gate.max_body if self.declared is None else self.declared
        return max(min(received + RESERVE_STEP, end), received) - self.held

    def cover_now(self, received: int) -> bool:
        """Hold `received` bytes if the budget has room now (the caller has another way if not)."""
        want = self._want(received)
        if want:
            got = self.gate.budget.reserve_now(want)  # type: ignore[union-attr]  # _want is 0 without a budget
            if got is None:
                return False
            self.held += got
        return True

    async def cover(self, received: int) -> None:
        """Hold `received` bytes, waiting a little for room; else raise Overloaded (503)."""
        want = self._want(received)
        if want:
            got = await self.gate.budget.reserve_async(want)  # type: ignore[union-attr]
            if got is None:
                raise Overloaded(
                    "the server holds too many request bodies in flight (VITSERVE_BODY_BUDGET_BYTES); retry shortly",
                    headers={"Connection": "close"} if self.http else None,  # the rest of the body may be coming
                )
            self.held += got

    def body_due(self, received: int) -> float:
        """When (loop time) the body must be complete, having `received` bytes: the grace period plus its size at
        the minimum rate, so a body that keeps pace is never cut off and one that trickles is."""
        gate = self.gate
        return self.arrived + gate.grace_s + received / gate.min_rate

    def too_slow(self, received: int) -> RequestTimeout:
        gate = self.gate
        return body_too_slow(received, asyncio.get_running_loop().time() - self.arrived, gate.grace_s, gate.min_rate)

    # --- admission ----------------------------------------------------------------------------------------------
    def admit(self) -> ServiceError | None:
        """An inference slot for the request (given back by `close`, in the same task), or the refusal."""
        refused = self.gate.admission.enter(self.path)
        self.admitted = refused is None
        return refused

    # --- the end --------------------------------------------------------------------------------------------------
    def close(self, status: int | str | None) -> None:
        """Give back everything the request holds and count it, once. `status`: the HTTP status answered, the
        gRPC code's name, or None when the client left before there was anything to answer."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.admitted:
                self.admitted = False
                self.gate.admission.leave()
        finally:
            if self.held:
                self.gate.budget.release(self.held)  # type: ignore[union-attr]  # held only from a budget
                self.held = 0
            if self.http:
                METRICS.in_flight.dec()
            if status is not None:
                self.answered(status)

    def answered(self, status: int | str) -> None:
        """Count the request as answered with `status`, once: just before its answer's last bytes are written
        (so that a client reading the metrics or statistics right after the answer finds it counted), or at the
        latest when the ticket closes."""
        if self.counted:
            return
        self.counted = True
        elapsed = time.perf_counter() - self.started
        if self.http:
            assert isinstance(status, int)
            method = self.method if self.method in METHODS else "other"
            counter, histogram = _http_series(self.label, method, status)
            ok = status < 400
        else:
            counter, histogram = _grpc_series(self.label, str(status))
            ok = status == "OK"
        counter.inc()
        histogram.observe(elapsed)
        if self.model is not None:
            METRICS.observe_request(self.model.name, self.model.meta.version, ok, elapsed)
