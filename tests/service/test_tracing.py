"""OpenTelemetry traces, received by a real OTLP/HTTP endpoint written here (protobuf, as a collector takes them):
one server span per request, a child per stage placed at the measured times, W3C `traceparent` honoured, the
request id on every span; in one process and in multi-process mode. With no endpoint, nothing of the SDK loads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

import service
from service.obs.tracing import traces_endpoint
from service.settings import Settings
from tests.conftest import MODELS, Server, metric, run_cli

STAGES = ["decode", "preprocess", "queue", "inference", "encode"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


class Receiver:
    """An OTLP/HTTP trace endpoint: decodes `ExportTraceServiceRequest`s and keeps every span as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
                receiver.take(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self.arrived:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "status": span.status.code,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "resource": resource,
                            }
                        )
            self.arrived.notify_all()

    def wait_for(self, request_id: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The spans of one request (by its id), once `count` of them have arrived."""

        def mine() -> list[dict[str, Any]]:
            return [s for s in self.spans if s["attributes"].get("vitserve.request_id") == request_id]

        with self.arrived:
            assert self.arrived.wait_for(lambda: len(mine()) >= count, timeout), f"spans of {request_id}: {mine()}"
            return mine()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def traced_server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver, **env: str) -> Server:
    log = tmp_path_factory.mktemp("traced") / "server.log"
    # Exported every 50 ms instead of every 5 s (OpenTelemetry's own variable), so the test waits less.
    return Server(MODELS, log, VITSERVE_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="50", **env).wait_ready()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Server]:
    srv = traced_server(tmp_path_factory, receiver)
    yield srv
    assert srv.stop() == 0


def by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    names: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        names.setdefault(span["name"], []).append(span)
    return names


def check_tree(spans: list[dict[str, Any]], root_name: str, images: int) -> dict[str, Any]:
    """One server span and its stage children, placed in order within it; returns the server span."""
    names = by_name(spans)
    (root,) = names.pop(root_name)
    assert root["kind"] == 2  # SPAN_KIND_SERVER
    per_image = {"decode": images, "preprocess": images} if images else {}
    assert {n: len(s) for n, s in names.items()} == {**per_image, "queue": 1, "inference": 1, "encode": 1}
    for span in spans:
        assert span["trace_id"] == root["trace_id"]
        assert root["start"] <= span["start"] <= span["end"] <= root["end"], span
        assert span["resource"]["service.name"] == "vitserve"
        assert span["resource"]["service.version"] == service.__version__
    for child in (s for n in STAGES for s in names.get(n, [])):
        assert child["parent"] == root["span_id"]
    for decode, preprocess in zip(names.get("decode", []), names.get("preprocess", []), strict=True):
        assert decode["end"] <= preprocess["start"] + 1000  # ns: rounding of the measured milliseconds
    queue, inference, encode = names["queue"][0], names["inference"][0], names["encode"][0]
    assert queue["end"] <= inference["start"] + 1000 and inference["end"] <= encode["start"] + 1000
    assert max((s["end"] for s in names.get("preprocess", [])), default=0) <= queue["start"] + 1000
    return root


@pytest.mark.server
def test_classify_is_a_span_tree_under_the_callers_traceparent(traced, receiver, held_out_pngs):
    response = httpx.post(
        f"{traced.url}/v1/classify",
        content=held_out_pngs[0],
        headers={
            "content-type": "image/png",
            "x-request-id": "traced-classify-1",
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    spans = receiver.wait_for("traced-classify-1", 1 + len(STAGES))
    root = check_tree(spans, "POST /v1/classify", images=1)
    assert root["trace_id"] == TRACE_ID and root["parent"] == PARENT_ID
    attributes = root["attributes"]
    assert attributes["http.route"] == "/v1/classify" and attributes["http.request.method"] == "POST"
    assert attributes["http.response.status_code"] == 200
    assert attributes["vitserve.model"] == "digits-vit" and attributes["vitserve.model.version"]
    assert attributes["vitserve.batch_size"] >= 1 and attributes["vitserve.images"] == 1
    inference = by_name(spans)["inference"][0]
    assert inference["attributes"]["vitserve.batch_size"] == attributes["vitserve.batch_size"]


@pytest.mark.server
def test_batch_attention_spans_one_decode_per_good_image(traced, receiver, held_out_pngs):
    files = [
        ("files", ("a.png", held_out_pngs[1], "image/png")),
        ("files", ("b.txt", b"no image", "text/plain")),
        ("files", ("c.png", held_out_pngs[2], "image/png")),
    ]
    response = httpx.post(
        f"{traced.url}/v1/models/digits-vit/attention/batch",
        files=files,
        headers={"x-request-id": "traced-batch-1"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    spans = receiver.wait_for("traced-batch-1", 1 + 2 * 2 + 3)
    root = check_tree(spans, "POST /v1/models/{name}/attention/batch", images=2)
    assert root["trace_id"] != TRACE_ID and root["parent"] == ""  # no traceparent: a trace of its own
    assert root["attributes"]["vitserve.images"] == 2
    indices = sorted(s["attributes"]["vitserve.image.index"] for s in by_name(spans)["decode"])
    assert indices == [0, 1]


@pytest.mark.server
def test_v2_infer_spans_its_queue_inference_and_encode(traced, receiver, held_out_pngs):
    # The fast path (service.http.fast_path) serves V2 infer past the router, inside the tracing middleware.
    pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {"name": "pixel_values", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": pixels.ravel().tolist()}
        ]
    }
    response = httpx.post(
        f"{traced.url}/v2/models/digits-vit/infer", json=body, headers={"x-request-id": "traced-v2"}, timeout=60
    )
    assert response.status_code == 200, response.text
    spans = receiver.wait_for("traced-v2", 4)
    # Named by its route template where service.http.fast_path finds it (with FastAPI 0.165 it finds none: "POST").
    (name,) = [s["name"] for s in spans if s["kind"] == 2]
    assert name in ("POST /v2/models/{name}/infer", "POST")
    root = check_tree(spans, name, images=0)
    assert root["attributes"]["url.path"] == "/v2/models/digits-vit/infer"
    assert root["attributes"]["vitserve.images"] == 2 and root["attributes"]["vitserve.model"] == "digits-vit"


@pytest.mark.server
def test_a_refused_request_is_one_span_with_its_status(traced, receiver, held_out_pngs):
    response = httpx.post(
        f"{traced.url}/v1/models/nope/classify",
        content=held_out_pngs[0],
        headers={"content-type": "image/png", "x-request-id": "traced-404"},
        timeout=60,
    )
    assert response.status_code == 404
    (span,) = receiver.wait_for("traced-404", 1)
    assert span["name"] == "POST /v1/models/{name}/classify"
    assert span["attributes"]["http.response.status_code"] == 404 and "vitserve.model" not in span["attributes"]


BAD_TRACE_HEADERS = [
    ({"traceparent": "00-" + "a" * 600}, "traceparent"),  # over OpenTelemetry's 512 characters
    (
        {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": ",".join(f"k{i}=v" for i in range(40))},
        "tracestate",
    ),
    ({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "BAD KEY=v,a=1,a=2"}, "tracestate"),
    ({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "x=" + "v" * 9000}, "tracestate"),
]


@pytest.mark.server
def test_malformed_trace_headers_are_dropped_quietly_and_counted(traced, receiver, held_out_pngs):
    def dropped(header: str) -> float:
        return metric(httpx.get(f"{traced.url}/metrics").text, "vitserve_trace_headers_dropped_total", header=header)

    before = {h: dropped(h) for h in ("traceparent", "tracestate")}
    for round_ in range(10):
        for index, (headers, _) in enumerate(BAD_TRACE_HEADERS):
            request_id = f"bad-trace-{round_}-{index}"
            response = httpx.post(
                f"{traced.url}/v1/classify",
                content=held_out_pngs[0],
                headers={"content-type": "image/png", "x-request-id": request_id, **headers},
                timeout=60,
            )
            assert response.status_code == 200, response.text
    # Each request is still one span tree: under the caller's span when its traceparent was good.
    root = check_tree(receiver.wait_for("bad-trace-9-1", 1 + len(STAGES)), "POST /v1/classify", images=1)
    assert root["trace_id"] == TRACE_ID and root["parent"] == PARENT_ID
    expected = {"traceparent": 10, "tracestate": 30}
    assert {h: dropped(h) - before[h] for h in expected} == expected
    log = traced.log.read_text()
    assert "tracestate" not in log and "traceparent" not in log and "key/value" not in log, log[-2000:]


@pytest.mark.server
def test_multi_process_workers_export_the_engines_timings(tmp_path_factory, receiver, held_out_pngs):
    srv = traced_server(tmp_path_factory, receiver, VITSERVE_WORKERS="2")
    try:
        for i in range(2):
            response = httpx.post(
                f"{srv.url}/v1/classify",
                content=held_out_pngs[i],
                headers={"content-type": "image/png", "x-request-id": f"traced-workers-{i}"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            spans = receiver.wait_for(f"traced-workers-{i}", 1 + len(STAGES))
            check_tree(spans, "POST /v1/classify", images=1)
            assert spans[0]["resource"]["vitserve.worker"] in (0, 1)
            assert by_name(spans)["inference"][0]["end"] > by_name(spans)["inference"][0]["start"]
    finally:
        assert srv.stop() == 0


def test_endpoint_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VITSERVE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    resolve: Callable[[], str | None] = lambda: traces_endpoint(Settings())  # noqa: E731
    assert resolve() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")
    assert resolve() == "http://otel:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://otel:4318/custom")
    assert resolve() == "http://otel:4318/custom"
    monkeypatch.setenv("VITSERVE_OTLP_ENDPOINT", "http://collector:4318")
    assert resolve() == "http://collector:4318/v1/traces"
    monkeypatch.setenv("VITSERVE_OTLP_ENDPOINT", "http://collector:4318/v1/traces")
    assert resolve() == "http://collector:4318/v1/traces"


@pytest.mark.slow
def test_off_loads_no_opentelemetry_sdk() -> None:
    # FastAPI itself imports opentelemetry-api (its own telemetry, off while no provider is configured); what
    # vitserve would add, the SDK and the exporter, must stay unloaded, and no tracing middleware installed.
    program = (
        "import sys; from service.app import create_app; from service.settings import Settings; "
        "app = create_app(Settings()); "
        "names = [m.cls.__name__ for m in app.user_middleware]; assert 'TracingMiddleware' not in names, names; "
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', "
        "'service.obs.otel'))]; assert not loaded, loaded; print('ok')"
    )
    run = run_cli("-c", program)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
