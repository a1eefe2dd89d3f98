"""Tracing's switch, and what a request notes for its spans. OpenTelemetry itself is in `service.obs.otel`, imported
only when tracing is on (by `service.app`): with no endpoint configured nothing of it is loaded, no middleware is
installed, and a route's whole cost is one `scope.get` and one `if`.

Spans are built after the fact from timings the service measures anyway (decode and preprocess in
`service.core.pipeline.prepare`, queue and inference from the batcher, in the engine process in multi-process mode),
not by wrapping every call: a route notes its `Prepared` images and batcher `Result`s on the `RequestTrace` that
`service.obs.otel.TracingMiddleware` put in the ASGI scope, and the middleware turns them into child spans when the
response has been sent.

Which endpoint: `VITSERVE_OTLP_ENDPOINT`, else OpenTelemetry's own `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as
given), else `OTEL_EXPORTER_OTLP_ENDPOINT` (what the OpenTelemetry Operator injects) with `/v1/traces` added.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.settings import Settings

TRACE_KEY = "vitserve.trace"  # the ASGI scope key of a request's RequestTrace, present only when tracing is on
TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for spans under a base endpoint


class Prepared(Protocol):
    """What a span reads of an image as prepared (`service.core.pipeline.Prepared`)."""

    @property
    def started(self) -> float: ...  # perf_counter when decoding began

    @property
    def decode_ms(self) -> float: ...

    @property
    def preprocess_ms(self) -> float: ...


class Result(Protocol):
    """What a span reads of a batcher's answer (`service.core.batching.Result`)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def queue_ms(self) -> float: ...

    @property
    def compute_ms(self) -> float: ...


class RequestTrace:
    """What one request's routes noted for its spans: the images as prepared, and the batcher's answers."""

    __slots__ = ("inferred_at", "prepared", "results")

    def __init__(self) -> None:
        self.prepared: Sequence[Prepared] = ()
        self.results: Sequence[Result] = ()
        self.inferred_at: float | None = None  # perf_counter when the batcher answered

    def inferred(self, prepared: Sequence[Prepared], results: Sequence[Result]) -> None:
        self.prepared, self.results, self.inferred_at = prepared, results, time.perf_counter()


def traces_endpoint(settings: Settings) -> str | None:
    """The OTLP/HTTP URL spans are posted to, or None: tracing is off."""
    if settings.otlp_endpoint:
        return _with_traces_path(settings.otlp_endpoint)
    if traces := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return traces
    if base := os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return _with_traces_path(base)
    return None


def _with_traces_path(base: str) -> str:
    # A base URL (http://collector:4318) gets OTLP's path, as OpenTelemetry's own variable does; a URL that
    # already names it is taken as it is.
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH
