"""OpenTelemetry spans of each request, sent over OTLP/HTTP (imported only when tracing is on: service.obs.tracing).

One SERVER span per HTTP request, named `METHOD /route/template`, a child of the caller's span when the request
carries a W3C `traceparent`; under it one span per stage the request went through, placed at the times the
service measured (see service.obs.tracing):

    POST /v1/classify           the whole request, as the server saw it
    ├── decode                  one per image (attribute vitserve.image.index)
    ├── preprocess              one per image
    ├── queue                   waiting for the dynamic batcher (in the engine process in multi-process mode)
    ├── inference               the runtime call that served the request (shared by a coalesced batch)
    └── encode                  from the batcher's answer to the response: maps, top-k, JSON or PNG

Spans are finished and handed to a `BatchSpanProcessor` after the response has been sent, so exporting costs
the request nothing but building its spans; the processor's thread posts them in batches (`OTEL_BSP_*` tune it,
`OTEL_EXPORTER_OTLP_HEADERS` adds headers) and flushes at exit. Each process of multi-process mode exports its
own requests' spans; resource attributes name the process.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.obs.metrics import METRICS
from service.obs.tracing import TRACE_KEY, RequestTrace

# W3C Trace Context, checked here so that a malformed or oversized header is dropped quietly (and counted):
# OpenTelemetry logs a WARNING for each one, echoing the client's value, which a client could use to flood the log.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-[!-~]*)?")
_TRACEPARENT_MAX = 512  # version 00 is 55 characters; later versions may add fields
_TRACESTATE_MAX = 512  # the length the specification asks every vendor to propagate
_TRACESTATE_MEMBERS = 32
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z0-9][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


def _valid_tracestate(value: str) -> bool:
    if len(value) > _TRACESTATE_MAX:
        return False
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    keys = {m.partition("=")[0] for m in members}
    return (
        len(members) <= _TRACESTATE_MEMBERS
        and len(keys) == len(members)
        and all(_TRACESTATE_MEMBER.fullmatch(m) for m in members)
    )


def trace_carrier(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's trace-context headers that are well formed; any other is dropped and counted."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        if name in (b"traceparent", b"tracestate"):
            found.setdefault(name.decode(), []).append(value.decode("latin-1"))
    carrier: dict[str, str] = {}
    parents = found.get("traceparent", [])
    if parents:
        parent = parents[0].strip(" \t")
        if len(parents) == 1 and len(parent) <= _TRACEPARENT_MAX and _TRACEPARENT.fullmatch(parent):
            carrier["traceparent"] = parent
        else:
            METRICS.trace_headers_dropped.labels(header="traceparent").inc()
    if "tracestate" in found:
        state = ",".join(found["tracestate"])  # several fields are one list (RFC 9110, section 5.3)
        if "traceparent" in carrier and _valid_tracestate(state):
            carrier["tracestate"] = state
        elif "traceparent" in carrier:
            METRICS.trace_headers_dropped.labels(header="tracestate").inc()
    return carrier


def tracer_provider(endpoint: str, worker: int | None = None) -> TracerProvider:
    """A provider exporting to `endpoint` (OTLP/HTTP protobuf) in batches; it flushes at interpreter exit.
    `worker`: the HTTP worker's index in multi-process mode."""
    attributes: dict[str, Any] = {
        "service.name": "vitserve",
        "service.version": __version__,
        "process.pid": os.getpid(),
    }
    if worker is not None:
        attributes["vitserve.worker"] = worker
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class TracingMiddleware:
    """Record each HTTP request as a span tree. Installed just inside `RequestContextMiddleware`, so it sees the
    request id and every answer, refusals by the other middleware included."""

    def __init__(self, app: ASGIApp, endpoint: str, worker: int | None = None) -> None:
        self.app = app
        self.provider = tracer_provider(endpoint, worker)
        self.tracer = self.provider.get_tracer("vitserve", __version__)
        self.propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope[TRACE_KEY] = RequestTrace()
        wall_ns, started = time.time_ns(), time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        responded: float | None = None

        async def traced_send(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, traced_send)
        finally:
            self._export(scope, record, status, wall_ns, started, responded, time.perf_counter())

    def _export(
        self,
        scope: Scope,
        record: RequestTrace,
        status: int,
        wall_ns: int,
        started: float,
        responded: float | None,
        ended: float,
    ) -> None:
        def ns(at: float) -> int:  # perf_counter (what the service measures with) to the epoch nanoseconds of spans
            return wall_ns + int((at - started) * 1e9)

        state = scope.get("state", {})
        request_id = state.get("request_id", "")
        route = getattr(scope.get("route"), "path", None)
        attributes: dict[str, Any] = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "http.response.status_code": status,
            "vitserve.request_id": request_id,
        }
        if route is not None:
            attributes["http.route"] = route
        model = state.get("model")  # noted by service.api.deps.served_model
        if model is not None:
            attributes["vitserve.model"] = model.name
            attributes["vitserve.model.version"] = model.meta.version
        if record.results:
            attributes["vitserve.images"] = len(record.results)
            attributes["vitserve.batch_size"] = max(r.batch_size for r in record.results)
        carrier = trace_carrier(scope["headers"])
        span = self.tracer.start_span(
            f"{scope['method']} {route}" if route is not None else scope["method"],
            context=self.propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=ns(started),
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        parent = trace.set_span_in_context(span)

        def stage(name: str, start: float, end: float, **extra: Any) -> None:
            child = self.tracer.start_span(
                name, context=parent, attributes={"vitserve.request_id": request_id, **extra}, start_time=ns(start)
            )
            child.end(end_time=ns(end))

        for index, p in enumerate(record.prepared):
            decoded = p.started + p.decode_ms / 1e3
            stage("decode", p.started, decoded, **{"vitserve.image.index": index})
            stage("preprocess", decoded, decoded + p.preprocess_ms / 1e3, **{"vitserve.image.index": index})
        if record.results and record.inferred_at is not None:
            # Placed back from the batcher's answer: inference ended then, the queue before it. What lies between
            # preprocessing and the queue is the hand-over (to the engine process, in multi-process mode).
            done = record.inferred_at
            compute = max(r.compute_ms for r in record.results) / 1e3
            queued = max(r.queue_ms for r in record.results) / 1e3
            stage("queue", done - compute - queued, done - compute)
            stage("inference", done - compute, done, **{"vitserve.batch_size": attributes["vitserve.batch_size"]})
            stage("encode", done, responded if responded is not None else ended)
        span.end(end_time=ns(ended))
