"""Prometheus metrics at `/metrics`.

Per-model inference metrics follow Triton's `nv_inference_*` family (names, `model`/`version` labels,
cumulative microsecond counters), so dashboards built for Triton read them unchanged; HTTP, queue and batch
metrics that Triton has no equivalent for are `vitserve_*`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # `_created` series double the exposition for no dashboard's benefit

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _BatchSeries(NamedTuple):
    """One model version's labelled series that every batch updates (`Metrics.observe_batch`)."""

    inference_count: Any
    exec_count: Any
    batch_size: Any
    batch_sources: Any
    runtime_time: Any
    compute_us: Any
    queue_us: Any
    queue_time: Any
    last_inference: Any


class Metrics(Collector):
    """Every metric, and (as a `Collector`) the one reading of them that `/metrics` and the statistics share."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._request_series: dict[tuple[str, str, bool], tuple[Any, Any]] = {}
        self._batch_series: dict[tuple[str, str], _BatchSeries] = {}
        self._batch_size_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        model = ["model", "version"]
        self.inference_count = Counter(
            "nv_inference_count", "Images inferred (a batch of N counts N)", model, registry=r
        )
        self.exec_count = Counter(
            "nv_inference_exec_count", "Runtime executions (a batch counts once)", model, registry=r
        )
        self.request_success = Counter(
            "nv_inference_request_success", "Successful inference requests", model, registry=r
        )
        self.request_failure = Counter("nv_inference_request_failure", "Failed inference requests", model, registry=r)
        self.request_us = Counter(
            "nv_inference_request_duration_us",
            "Cumulative time successful inference requests took, end to end",
            model,
            registry=r,
        )
        self.failure_us = Counter(
            "vitserve_inference_request_failure_duration_us",
            "Cumulative time failed inference requests took, end to end (Triton's statistics `fail.ns`)",
            model,
            registry=r,
        )
        self.queue_us = Counter(
            "nv_inference_queue_duration_us", "Cumulative time requests waited in the batch queue", model, registry=r
        )
        self.compute_us = Counter(
            "nv_inference_compute_infer_duration_us", "Cumulative runtime time, per request", model, registry=r
        )
        # Triton's statistics extension reports executions and their compute time per batch size (`batch_stats`);
        # the sizes are bounded by the batching policy, so the series are too.
        self.batch_exec = Counter(
            "vitserve_batch_executions", "Runtime executions by batch size", [*model, "batch_size"], registry=r
        )
        self.batch_compute_us = Counter(
            "vitserve_batch_compute_duration_us",
            "Cumulative runtime time of executions, by batch size",
            [*model, "batch_size"],
            registry=r,
        )
        self.last_inference = Gauge(
            "vitserve_last_inference_timestamp_seconds",
            "When the model version last ran a batch (Unix time)",
            model,
            registry=r,
            multiprocess_mode="max",
        )
        self.requests = Counter(
            "vitserve_http_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "vitserve_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vitserve_queue_duration_seconds",
            "Time a request waited for its batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.runtime_time = Histogram(
            "vitserve_runtime_duration_seconds",
            "onnxruntime time per batch execution",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vitserve_batch_size", "Images per runtime execution", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_sources = Histogram(
            "vitserve_batch_sources",
            "HTTP worker processes whose requests share a runtime execution (1 in single-process mode)",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vitserve_queue_depth",
            "Requests waiting in the batch queue",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "vitserve_requests_in_flight", "HTTP requests being served", registry=r, multiprocess_mode="livesum"
        )
        self.rejected = Counter(
            "vitserve_rejected",
            "Requests a model's batcher refused (503): `queue` (the queue was full) or `budget` (predicted to be "
            "answered later than its latency budget)",
            ["model", "reason"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "vitserve_model_load_seconds",
            "Time to load and warm up a model",
            model,
            registry=r,
            multiprocess_mode="max",
        )
        self.grpc_requests = Counter(
            "vitserve_grpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=r
        )
        self.grpc_latency = Histogram(
            "vitserve_grpc_request_duration_seconds",
            "gRPC call latency",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "vitserve_http_refused",
            "Requests refused before routing: unauthorized (401), concurrency (503: VITSERVE_MAX_CONCURRENT_REQUESTS), "
            "adaptive (503: the adaptive limit on requests in progress)",
            ["reason"],
            registry=r,
        )
        self.trace_headers_dropped = Counter(
            "vitserve_trace_headers_dropped",
            "W3C trace-context headers ignored as malformed or oversized (traceparent, tracestate); the request is "
            "served as if they were absent",
            ["header"],
            registry=r,
        )
        self.connections = Gauge(
            "vitserve_http_connections", "Open client connections", registry=r, multiprocess_mode="livesum"
        )
        self.connections_refused = Counter(
            "vitserve_http_connections_shed",
            "Connections closed or refused to protect the server: limit (503 at connect), evicted (idle or slow "
            "headers, to make room), header_timeout, body_timeout",
            ["reason"],
            registry=r,
        )
        self.budget_limit = Gauge(
            "vitserve_memory_budget_bytes", "Memory budget size", ["budget"], registry=r, multiprocess_mode="livesum"
        )
        self.budget_used = Gauge(
            "vitserve_memory_budget_used_bytes",
            "Bytes reserved from a memory budget now",
            ["budget"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.budget_refused = Counter(
            "vitserve_memory_budget_refused",
            "Requests refused (503) because a memory budget stayed full",
            ["budget"],
            registry=r,
        )
        self.reloads = Counter(
            "vitserve_model_reload",
            "Model (re)loads found by the repository poll: loaded (swapped in) or rejected (old version kept)",
            ["model", "outcome"],
            registry=r,
        )

    def observe_batch(
        self, model: str, version: str, size: int, compute_ms: float, queue_ms: list[float], sources: int = 1
    ) -> None:
        series = self._batch_series.get((model, version))
        if series is None:  # label lookups cost more than the updates: once per model version
            series = self._batch_series[(model, version)] = _BatchSeries(
                self.inference_count.labels(model, version),
                self.exec_count.labels(model, version),
                self.batch_size.labels(model),
                self.batch_sources.labels(model),
                self.runtime_time.labels(model),
                self.compute_us.labels(model, version),
                self.queue_us.labels(model, version),
                self.queue_time.labels(model),
                self.last_inference.labels(model, version),
            )
        series.inference_count.inc(size)
        series.exec_count.inc()
        series.batch_size.observe(size)
        series.batch_sources.observe(sources)
        series.runtime_time.observe(compute_ms / 1e3)
        series.compute_us.inc(compute_ms * 1e3 * size)
        series.queue_us.inc(sum(queue_ms) * 1e3)
        for q in queue_ms:
            series.queue_time.observe(q / 1e3)
        by_size = self._batch_size_series.get((model, version, size))
        if by_size is None:  # bounded: sizes go up to the model's largest batch
            by_size = self._batch_size_series[(model, version, size)] = (
                self.batch_exec.labels(model, version, str(size)),
                self.batch_compute_us.labels(model, version, str(size)),
            )
        by_size[0].inc()
        by_size[1].inc(compute_ms * 1e3)
        series.last_inference.set(time.time())

    def observe_request(self, model: str, version: str, ok: bool, seconds: float) -> None:
        """One inference request's outcome and end-to-end time (`service.http.gate.Ticket.close`, on every request)."""
        series = self._request_series.get((model, version, ok))
        if series is None:  # a label lookup costs more than the increment: once per model version and outcome
            count, duration = (self.request_success, self.request_us) if ok else (self.request_failure, self.failure_us)
            series = self._request_series[(model, version, ok)] = (
                count.labels(model, version),
                duration.labels(model, version),
            )
        series[0].inc()
        series[1].inc(seconds * 1e6)

    def collect(self) -> Iterable[Metric]:
        """Every metric family, as `/metrics` exposes it: this process's, or in multi-process mode
        (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor) every process's, summed as each metric's type says.
        The one source of the numbers `/metrics` and the V2 statistics extension report."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            return multiprocess.MultiProcessCollector.merge(_written_files(Path(directory)), accumulate=True)
        return self.registry.collect()

    def exposition(self) -> bytes:
        """The text `/metrics` answers (see `collect`)."""
        return generate_latest(self)


def _written_files(directory: Path) -> list[str]:
    """The processes' metric files that are written: a process creates its file empty, then sizes and fills it, and
    one read in between (another process's first request, say) would fail the whole scrape (prometheus_client
    reads the first 4 bytes unconditionally)."""
    written = []
    for path in directory.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):  # a dead process's live gauges are removed meanwhile
            if path.stat().st_size >= 8:
                written.append(str(path))
    return written


METRICS = Metrics()
