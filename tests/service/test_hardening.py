"""Slow and idle clients, the connection cap, bounded metrics and heavy V2 requests, against a real server.

Each test replays a scenario of issue 16's probe at a scale that runs in seconds (40 slow uploads against a
limit of 32 rather than 256; 60 connections against a cap of 50 rather than the descriptor limit) and checks the
fixed behaviour: those who behave are served, those who do not are cut off with a 4xx/503 and closed.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from PIL import Image

from service.http.gate import METHODS as _METHODS
from service.settings import Settings
from tests.conftest import MODELS, Server
from tests.service.conftest import encode
from tests.service.rawhttp import Reader, connect, metric, request_bytes, scrape, wait_for

pytestmark = pytest.mark.server

SMALL_PNG = encode(Image.new("RGB", (32, 32), (200, 30, 30)))
MAX_BODY = Settings.model_fields["max_body_bytes"].default
BODY_BUDGET = Settings.model_fields["body_budget_bytes"].default


def start(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Server:
    return Server(MODELS, tmp_path_factory.mktemp(name) / "server.log", **env).wait_ready()


@contextmanager
def sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [stack.enter_context(connect(port)) for _ in range(count)]


def connections_settle(url: str, at_most: int = 1) -> None:
    """Wait until the server holds no client connection but the scrape's own."""
    wait_for("connections to close", lambda: metric(url, "vitserve_http_connections") <= at_most)


# --- slow uploads and slow headers ---------------------------------------------------------------------------
SLOW_UPLOADS = 40
CONCURRENCY = 32
BODY_TIMEOUT_S = 3.0
HEADER_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def slow_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(
        tmp_path_factory,
        "slow",
        VITSERVE_MAX_CONCURRENT_REQUESTS=str(CONCURRENCY),
        VITSERVE_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        VITSERVE_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    )
    yield srv
    assert srv.stop() == 0


def declared_sizes(count: int) -> list[int]:
    """Body sizes that together cover the whole body budget and more: what an attacker who read the defaults
    would declare, each within the body limit."""
    sizes, left = [], BODY_BUDGET
    for _ in range(count):
        size = min(MAX_BODY, left) if left > 0 else MAX_BODY
        sizes.append(size)
        left -= size
    return sizes


def test_slow_uploads_hold_no_inference_slot_and_are_cut_off_with_408(slow_target: Server) -> None:
    url = slow_target.url
    connections_settle(url)
    with sockets(slow_target.port, SLOW_UPLOADS) as slow:
        for sock, size in zip(slow, declared_sizes(SLOW_UPLOADS), strict=True):
            sock.sendall(request_bytes("POST", "/v1/classify", headers={"content-length": str(size)}) + b"\x89PNG")
        # Every slow upload is a request in progress (reading its body) before the honest clients come.
        wait_for("the slow uploads to be in flight", lambda: metric(url, "vitserve_requests_in_flight") > SLOW_UPLOADS)
        stop = threading.Event()

        def trickle() -> None:  # a byte per connection every 0.2 s: far below VITSERVE_BODY_MIN_RATE
            while not stop.wait(0.2):
                for sock in slow:
                    with contextlib.suppress(OSError):  # already cut off
                        sock.send(b"\0")

        dripper = threading.Thread(target=trickle, daemon=True)
        dripper.start()
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                for _ in range(5):
                    assert client.get("/healthz").status_code == 200
                    answer = client.post("/v1/classify", content=SMALL_PNG, headers={"content-type": "image/png"})
                    assert answer.status_code == 200, answer.text
            # ... and they were served while every slow upload was still going.
            assert metric(url, "vitserve_http_connections_shed", reason="body_timeout") == 0
            statuses = []
            for sock in slow:
                reader = Reader(sock)
                response = reader.response()
                statuses.append(response.status)
                assert response.headers.get("connection") == "close"
                assert reader.closed(), "a slow upload must be closed after its 408"
        finally:
            stop.set()
            dripper.join()
    assert statuses == [408] * SLOW_UPLOADS, statuses
    assert json.loads(response.body)["error"]["code"] == "request_timeout"
    assert metric(url, "vitserve_memory_budget_used_bytes", budget="body") == 0


def test_partial_headers_get_408_and_silent_connections_are_closed(slow_target: Server) -> None:
    url = slow_target.url
    connections_settle(url)
    before = metric(url, "vitserve_http_connections_shed", reason="header_timeout")
    with sockets(slow_target.port, 10) as partial, sockets(slow_target.port, 10) as silent:
        for i, sock in enumerate(partial):  # a request line alone, or a request line and some headers
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + (b"host: x\r\nx-slow: 1\r\n" if i % 2 else b""))
        started = time.monotonic()
        for sock in partial:
            reader = Reader(sock)
            response = reader.response()
            assert response.status == 408, response
            assert json.loads(response.body)["error"]["code"] == "request_timeout"
            assert reader.closed()
        for sock in silent:
            assert Reader(sock).closed(), "a connection that sends nothing is closed without an answer"
        waited = time.monotonic() - started
    assert HEADER_TIMEOUT_S * 0.9 <= waited < HEADER_TIMEOUT_S + 5, waited
    assert metric(url, "vitserve_http_connections_shed", reason="header_timeout") - before == 20


# --- the connection cap --------------------------------------------------------------------------------------
MAX_CONNECTIONS = 50


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Long deadlines: here only the cap may close a connection.
    srv = start(
        tmp_path_factory,
        "capped",
        VITSERVE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        VITSERVE_HEADER_TIMEOUT_S="60",
        VITSERVE_BODY_TIMEOUT_S="60",
    )
    yield srv
    assert srv.stop() == 0


def test_idle_connections_past_the_cap_are_evicted_and_health_stays_reachable(capped: Server) -> None:
    url = capped.url
    connections_settle(url)
    with sockets(capped.port, MAX_CONNECTIONS + 10) as idle:
        # The oldest idle connections were closed to make room for the newest.
        wait_for("evictions", lambda: metric(url, "vitserve_http_connections_shed", reason="evicted") >= 10)
        assert metric(url, "vitserve_http_connections") <= MAX_CONNECTIONS
        for _ in range(3):
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert Reader(idle[0]).closed(), "the oldest idle connection is the one evicted"
    assert metric(url, "vitserve_http_connections_shed", reason="limit") == 0


def test_when_every_connection_is_mid_request_a_new_one_gets_503(capped: Server) -> None:
    url = capped.url
    connections_settle(url)
    head = request_bytes("POST", "/v1/classify", headers={"content-length": "1000", "expect": "100-continue"})
    with sockets(capped.port, MAX_CONNECTIONS) as busy:
        for sock in busy:
            sock.sendall(head)
        for sock in busy:  # "100 Continue": the server is reading this request's body, so it is mid-request
            assert Reader(sock).response().status == 100
        with connect(capped.port) as refused:
            reader = Reader(refused)
            response = reader.response()
            assert response.status == 503
            assert response.headers["retry-after"] == "1"
            assert json.loads(response.body)["error"]["code"] == "overloaded"
            assert reader.closed()
    connections_settle(url)
    assert metric(url, "vitserve_http_connections_shed", reason="limit") == 1


# --- bounded metrics -----------------------------------------------------------------------------------------
KEY = "hardening-test-key"
FLOOD = 10_000
# Methods httptools parses (an invented token is refused with 400 before the app, and is sent too), each path
# kind with a fresh suffix per request, and three kinds of caller: none, a valid key, a wrong key.
FLOOD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "MKCOL", "SEARCH", "PURGE", "REPORT"]
FLOOD_PATHS = ["/x{}", "/v1/models/m{}", "/v2/models/m{}/infer", "/static/{}.js", "/v1/classify/{}", "/metrics/{}"]
FLOOD_AUTH: list[dict[str, str]] = [{}, {"authorization": f"Bearer {KEY}"}, {"x-api-key": "wrong"}]
PIPELINE = 250  # requests per connection, sent at once


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tmp_path_factory, "keyed", VITSERVE_API_KEYS=KEY)
    yield srv
    assert srv.stop() == 0


def flood_request(i: int) -> bytes:
    method = FLOOD_METHODS[i % len(FLOOD_METHODS)]
    path = FLOOD_PATHS[(i // len(FLOOD_METHODS)) % len(FLOOD_PATHS)].format(i)
    auth = FLOOD_AUTH[(i // (len(FLOOD_METHODS) * len(FLOOD_PATHS))) % len(FLOOD_AUTH)]
    return request_bytes(method, path, headers=auth)


def send_flood(port: int, start_at: int, count: int) -> None:
    for first in range(start_at, start_at + count, PIPELINE):
        numbers = range(first, min(first + PIPELINE, start_at + count))
        with connect(port) as sock:
            sock.sendall(b"".join(flood_request(i) for i in numbers))
            reader = Reader(sock)
            for _ in numbers:
                assert reader.response().status in (401, 404, 405), "every invented request is a 4xx"
        with connect(port) as sock:  # and an invented method: refused by the parser, never counted
            sock.sendall(f"X{first} /y{first} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            assert Reader(sock).response().status == 400


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_invented_methods_and_paths_leave_metrics_bounded(keyed: Server) -> None:
    combinations = len(FLOOD_METHODS) * len(FLOOD_PATHS) * len(FLOOD_AUTH)
    scrape(keyed.url)  # the scrape's own series, counted once it has been answered
    send_flood(keyed.port, 0, combinations)  # every (method, path kind, caller) once
    seen = scrape(keyed.url)
    send_flood(keyed.port, combinations, FLOOD - combinations)  # the rest: the same kinds, new strings each
    after = scrape(keyed.url)
    # The bound: a series per (route template or "unmatched", method of a fixed set or "other", status), so once
    # each kind of request has been seen, no number of new strings adds one.
    assert series(after) == series(seen), sorted(series(after) - series(seen))[:10]
    assert set(re.findall(r'method="([^"]*)"', after)) <= {*_METHODS, "other"}
    assert len(after.encode()) < 128 * 1024, len(after.encode())  # the probe's 20,000 requests made 34.9 MB


# --- heavy V2 requests: refused early, off the event loop ----------------------------------------------------
V2_INFER = "/v2/models/digits-vit/infer"


def v2_binary(header: dict, binary: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + binary, {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }


class HealthProbe:
    """Polls /healthz on its own connection while heavy requests run; the longest wait says how long the event
    loop was blocked."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.longest = 0.0
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                self.longest = max(self.longest, time.monotonic() - started)
                self.answered += 1

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        wait_for("the probe's first answer", lambda: self.answered > 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_heavy_v2_requests_are_refused_early_and_never_stall_the_loop(slow_target: Server) -> None:
    url = slow_target.url
    inferred = metric(url, "nv_inference_count")
    images = [SMALL_PNG] * 32
    raw = b"".join(struct.pack("<I", len(image)) + image for image in images)
    attentions = {
        "inputs": [{"name": "image", "shape": [32], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "attentions"}],  # as JSON: about 47 MB for 32 images
    }
    many = 4_500_000  # empty BYTES elements, each its 4-byte length
    elements = {
        "inputs": [
            {"name": "image", "shape": [many], "datatype": "BYTES", "parameters": {"binary_data_size": 4 * many}}
        ]
    }
    digits = b'{"inputs": [{"name": "pixel_values", "shape": [1], "datatype": "FP32", "data": [' + b"7" * 5000 + b"]}]}"
    with HealthProbe(url) as probe, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(3):
            body, headers = v2_binary(attentions, raw)
            started = time.monotonic()
            response = client.post(V2_INFER, content=body, headers=headers)
            assert response.status_code == 413, response.text
            assert "VITSERVE_MAX_RESPONSE_BYTES" in response.json()["error"]
            assert time.monotonic() - started < 5

            body, headers = v2_binary(elements, bytes(4 * many))
            response = client.post(V2_INFER, content=body, headers=headers)
            assert response.status_code == 413, response.text
            assert "VITSERVE_MAX_BATCH_FILES" in response.json()["error"]

            response = client.post(V2_INFER, content=digits, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"error"}  # the protocol's error body
    assert metric(url, "nv_inference_count") == inferred, "refused before any inference"
    # The old server stalled 2.3 s (attentions as JSON) and 1.8 s (millions of elements); 1 s is far above what
    # a scheduling hiccup on a busy 2-core machine costs, and far below either stall.
    assert probe.longest < 1.0, f"/healthz waited {probe.longest:.2f} s"
