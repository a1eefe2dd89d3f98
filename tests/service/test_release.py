"""No request keeps what it took: the probe's inputs, byte for byte, against real servers in one process and with
two workers, each followed by the same check: the body and decode budgets and the in-flight gauge are back to
zero, and a classify from a keyless client is answered 200.

What a request may hold (its body's bytes, its place in the in-flight gauge, an admission slot, decode memory,
an engine slot) is given back on every way it can end: answered, refused, abandoned by its client, failed while
answering, or cut off by a transport that closed under it. Each test here takes one of those ways.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import psutil
import pytest
from PIL import Image

from tests.conftest import MODELS, Server
from tests.service.conftest import encode
from tests.service.rawhttp import Reader, connect, metric, request_bytes, wait_for

pytestmark = pytest.mark.server

PNG = encode(Image.new("RGB", (32, 32), (200, 30, 30)))
SHM_ON = {"VITSERVE_SYSTEM_SHARED_MEMORY": "true"}
MODES = {"one process": {}, "two workers": {"VITSERVE_WORKERS": "2"}}
API_KEY, ADMIN_KEY = "k1", "a1"
V2_INFER = "/v2/models/digits-vit/infer"
MiB = 1 << 20


def start(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Server:
    return Server(MODELS, tmp_path_factory.mktemp(name) / "server.log", **env).wait_ready()


@pytest.fixture(scope="module", params=list(MODES))
def plain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Default settings (and the shared-memory extension on, for its inputs), one process or two workers."""
    srv = start(tmp_path_factory, "plain", **SHM_ON, **MODES[request.param])
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module", params=list(MODES))
def keyed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API and admin keys on; at most two inference requests in progress, so that a load reaches the limit."""
    env = {"VITSERVE_API_KEYS": API_KEY, "VITSERVE_ADMIN_KEYS": ADMIN_KEY, "VITSERVE_MAX_CONCURRENT_REQUESTS": "2"}
    srv = start(tmp_path_factory, "keyed", **SHM_ON, **env, **MODES[request.param])
    yield srv
    assert srv.stop() == 0


@contextmanager
def sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` open connections to `port`, closed on exit."""
    with ExitStack() as stack:
        yield [stack.enter_context(connect(port)) for _ in range(count)]


def held(url: str) -> dict[str, float]:
    """What requests hold now; the scrape itself is one request in flight."""
    return {
        "body": metric(url, "vitserve_memory_budget_used_bytes", budget="body"),
        "decode": metric(url, "vitserve_memory_budget_used_bytes", budget="decode"),
        "in_flight": metric(url, "vitserve_requests_in_flight") - 1,
    }


def assert_released(server: Server, key: str | None = None) -> None:
    """Every gauge back to zero, and a following classify answered 200."""
    wait_for("every request's holdings to be given back", lambda: not any(held(server.url).values()), timeout=20)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{server.url}/v1/classify", files={"file": ("d.png", PNG)}, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert "never retrieved" not in server.log.read_text(), "a request's task died with an exception"


def one_response(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers and body of the first response to `data`, and whether the server then closed."""
    with connect(port, timeout) as sock:
        sock.sendall(data)
        reader = Reader(sock)
        response = reader.response()
        sock.settimeout(2)
        try:
            closed = reader.closed()
        except TimeoutError:
            closed = False
        return response.status, response.headers, response.body, closed


# --- 1: a pipelined request and unparsable bytes behind a direct-path request, then a close --------------------
def test_garbage_pipelined_behind_a_direct_request_releases_everything(plain: Server) -> None:
    b = b"x" * MiB
    m = (
        b"POST /v2/models/digits-vit/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b)
        + b
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"\x00\r\n\r\n"
    )
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", plain.port))
        s.sendall(m)
        s.close()
    assert_released(plain)


# --- 2 and 4: lone surrogates in fields the error message echoes --------------------------------------------
SURROGATE_BODIES = [
    '{"inputs":[{"name":"image","shape":[1],"datatype":"\\ud800","data":["AA=="]}]}',
    '{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":{"shared_memory_region":"\\ud800","shared_memory_byte_size":4}}]}',
]


@pytest.mark.parametrize("query", ["", "?x=1"], ids=["direct", "asgi"])
@pytest.mark.parametrize("body", SURROGATE_BODIES, ids=["datatype", "shm region"])
def test_a_lone_surrogate_is_answered_400_with_the_value_escaped(plain: Server, body: str, query: str) -> None:
    padded = body.encode() + b" " * (MiB - len(body) - 64)  # as the probe: a body the size the direct path takes
    request = request_bytes("POST", V2_INFER + query, padded, {"content-type": "application/json"})
    status, _, answer, _ = one_response(plain.port, request)
    assert status == 400, answer
    message = json.loads(answer)["error"]
    assert "\\ud800" in message and "\ud800" not in message, message
    assert_released(plain)


def test_a_shared_memory_key_with_a_lone_surrogate_is_400(plain: Server) -> None:
    body = b'{"key":"/\\udc80x","offset":0,"byte_size":16}'
    request = request_bytes("POST", "/v2/systemsharedmemory/region/r/register", body)
    status, _, answer, _ = one_response(plain.port, request)
    assert 400 <= status < 500, answer
    assert "\udc80" not in json.loads(answer)["error"]
    assert_released(plain)


# --- 3: keyless clients may not reserve a byte, the repository's routes included ----------------------------
def test_keyless_uploads_to_the_repository_are_refused_before_their_bodies(keyed: Server) -> None:
    declared = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 15000000\r\n\r\nx"
    with sockets(keyed.port, 200) as socks:
        for sock in socks:
            sock.sendall(declared)
        for sock in socks:  # every one refused at once, before its body: nothing reserved for it
            assert Reader(sock).response().status == 401
        assert held(keyed.url)["body"] == 0
        noise = random.Random(0).randbytes(900 * 900 * 3)
        big = encode(Image.frombytes("RGB", (900, 900), noise))  # about 2.4 MB: streamed, not direct
        assert len(big) > 2 * MiB
        response = httpx.post(
            f"{keyed.url}/v1/classify",
            files={"file": ("big.png", big)},
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    assert_released(keyed, API_KEY)


def test_without_admin_keys_the_repository_is_403_before_the_body(plain: Server) -> None:
    declared = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 15000000\r\n\r\nx"
    status, _, answer, _ = one_response(plain.port, declared, timeout=5)
    assert status == 403, answer
    assert_released(plain)


# --- 6: the control plane is not shed by the data plane's limit ---------------------------------------------
def test_repository_and_shared_memory_calls_pass_an_inference_overload(keyed: Server) -> None:
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=keyed.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
            while not stop.is_set():
                statuses.append(c.post("/v1/classify", files={"file": ("d.png", PNG)}).status_code)

    clients = [threading.Thread(target=load) for _ in range(8)]
    for thread in clients:
        thread.start()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        wait_for("the load to reach the limit", lambda: 503 in statuses)
        answers = []
        for _ in range(3):
            answers.append(httpx.post(f"{keyed.url}/v2/repository/models/digits-vit-int8/unload", headers=admin))
            answers.append(httpx.post(f"{keyed.url}/v2/repository/models/digits-vit-int8/load", headers=admin))
        # A register that reaches the route: refused for its key (no such object), not for the load.
        register = httpx.post(
            f"{keyed.url}/v2/systemsharedmemory/region/r/register",
            json={"key": "/vitserve-no-such-object", "offset": 0, "byte_size": 16},
            headers={"authorization": f"Bearer {API_KEY}"},
        )
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers if a.status_code != 200]
    assert register.status_code != 503 and 400 <= register.status_code < 500, register.text
    assert_released(keyed, API_KEY)


# --- 7: HTTP/1.0 keep-alive is answered alike by both ways --------------------------------------------------
def test_http_1_0_keep_alive_closes_alike_on_both_ways(plain: Server) -> None:
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]})
    answers = {}
    for way, path in (("direct", V2_INFER), ("asgi", V2_INFER + "?x=1")):
        request = (
            f"POST {path} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(header)}\r\n\r\n{header}"
        ).encode()
        status, headers, _, closed = one_response(plain.port, request)
        answers[way] = (status, headers.get("connection"), closed)
    assert answers["direct"] == answers["asgi"] == (400, "close", True), answers
    assert_released(plain)


# --- 8: a Content-Length of 20 or more digits is a size, over the limit: 413 at once ------------------------
# 2^64-1 and a zero-padded 300 MB: sizes over the limit (413); past 2^64 the parser itself refuses (400).
@pytest.mark.parametrize(
    ("length", "status"), [("18446744073709551615", 413), ("0" * 12 + "300000000", 413), ("9" * 23, 400)]
)
@pytest.mark.parametrize("path", [V2_INFER, "/v1/classify"])
def test_a_huge_or_padded_content_length_is_refused_at_once(plain: Server, length: str, status: int, path: str) -> None:
    request = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
    with connect(plain.port, timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(request)
        reader = Reader(sock)
        response = reader.response()
        assert time.monotonic() - started < 2, "answered at once, not after a body deadline"
        assert response.status == status, response.body
        assert "error" in json.loads(response.body)
        assert response.headers.get("connection") == "close"  # the body it declared is not read
        assert reader.closed()
    assert_released(plain)


def test_a_zero_padded_content_length_is_its_value(plain: Server) -> None:
    body = b'{"inputs":[]}'
    request = f"POST {V2_INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body):025d}\r\n\r\n".encode() + body
    status, _, answer, _ = one_response(plain.port, request)
    assert status == 400 and b"input" in answer, answer  # read as 13 bytes: the body's own mistake is named
    assert_released(plain)


# --- 9: readiness says whether the server can answer inference now ------------------------------------------
def test_readiness_turns_503_while_the_engine_is_stopped(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start(tmp_path_factory, "stopped-engine", **MODES["two workers"])
    try:
        (engine,) = [
            p for p in psutil.Process(srv.process.pid).children() if "service.procs.engine" in " ".join(p.cmdline())
        ]
        engine.send_signal(signal.SIGSTOP)
        try:
            answer = wait_for("readiness to fail", lambda: _not_ready(srv.url))
            assert "engine" in answer["reason"], answer
        finally:
            engine.send_signal(signal.SIGCONT)
        wait_for("readiness to come back", lambda: httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200)
        assert_released(srv)
    finally:
        assert srv.stop() == 0


def _not_ready(url: str) -> dict | None:
    response = httpx.get(f"{url}/readyz", timeout=10)
    return response.json() if response.status_code == 503 else None


def test_readiness_turns_503_while_a_budget_refuses_everything(tmp_path_factory: pytest.TempPathFactory) -> None:
    # A small body budget held by four slow uploads (a long body deadline keeps them): every further request is
    # refused, and after READY_STALL_S of only refusals the server says it is not ready.
    srv = start(tmp_path_factory, "stalled", VITSERVE_BODY_BUDGET_BYTES=str(4 * MiB), VITSERVE_BODY_TIMEOUT_S="120")
    try:
        slow = f"POST {V2_INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {MiB}\r\n\r\n".encode() + b"x"
        with sockets(srv.port, 4) as socks:
            for sock in socks:
                sock.sendall(slow)
            wait_for("the budget to fill", lambda: held(srv.url)["body"] >= 4 * MiB)

            def refused_and_not_ready() -> dict | None:
                post = httpx.post(f"{srv.url}/v1/classify", files={"file": ("d.png", PNG)}, timeout=30)
                assert post.status_code == 503, post.text
                return _not_ready(srv.url)

            answer = wait_for("readiness to fail", refused_and_not_ready, timeout=40, every=0.5)
            assert "body budget" in answer["reason"], answer
        assert_released(srv)
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    finally:
        assert srv.stop() == 0


# --- the principle: random sequences of requests, garbage and closes ----------------------------------------
FUZZ_SECONDS = 10  # per process mode


def fuzz_message(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["direct", "classify", "pipelined", "garbage", "partial"])
        if kind == "direct":
            body = b"x" * rng.choice([0, 10, 1000, 300_000])
            parts.append(request_bytes("POST", V2_INFER, body))
        elif kind == "classify":
            parts.append(request_bytes("POST", "/v1/classify", b"--b\r\n", {"content-type": "multipart/form-data"}))
        elif kind == "pipelined":
            parts.append(request_bytes("GET", rng.choice(["/healthz", "/v2/models/digits-vit", "/metrics"])))
        elif kind == "garbage":
            parts.append(rng.choice([b"\x00\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", bytes(rng.randbytes(64))]))
        else:  # a request whose body never comes whole
            parts.append(request_bytes("POST", V2_INFER, b"x" * 5000)[: -rng.randint(1, 4000)])
    return b"".join(parts)


def test_random_sequences_leave_nothing_held(plain: Server) -> None:
    rng = random.Random(2026)
    deadline = time.monotonic() + FUZZ_SECONDS
    sent = 0
    while time.monotonic() < deadline:
        with connect(plain.port) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendall(fuzz_message(rng))
                if rng.random() < 0.5:  # sometimes read a little before the early close
                    sock.recv(4096)
            except OSError:  # reset, or nothing in time: the close comes anyway
                pass
        sent += 1
    assert sent > 50
    assert_released(plain)
