"""Slow and idle clients, the connection cap, bounded metrics and heavy V2 requests, against a real server.

Each test replays a scenario of issue 16's probe at a scale that runs in seconds (40 slow uploads against a
limit of 32 rather than 256; 60 connections against a cap of 50 rather than the descriptor limit) and checks the
fixed behaviour: those who behave are served, those who do not are cut off with a 4xx/503 and closed.
"""

from __future__ import annotations

import base64
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

from service.middleware import _METHODS
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
                    try:
                        sock.send(b"\0")
                    except OSError:  # already cut off
                        pass

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
