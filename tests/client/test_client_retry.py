"""Retries, backoff and connection reuse, against a scripted real HTTP server on loopback.

The waits between attempts are recorded rather than slept (`waits`): what the client decided to wait is the
fact under test, and a busy machine cannot blur it.
"""

from __future__ import annotations

import socket
import time
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import vitserve_client._core
import vitserve_client.client
from vitserve_client import Client
from vitserve_client._core import retry_after_seconds
from vitserve_client.errors import NotFoundError, OverloadedError, ServerError, TransportError

from tests.client.scripted import Reply

UNAVAILABLE = {"error": {"code": "unavailable", "message": "models are still loading; retry shortly", "detail": None}}


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait either client makes between attempts, in seconds, in order; none is really slept."""
    recorded: list[float] = []

    async def asleep(seconds: float) -> None:
        recorded.append(seconds)

    module = vitserve_client.client
    monkeypatch.setattr(module, "time", types.SimpleNamespace(sleep=recorded.append))
    monkeypatch.setattr(module, "asyncio", types.SimpleNamespace(sleep=asleep))
    return recorded


def test_503_with_retry_after_is_retried_then_succeeds(connect: Any, scripted: Any, waits: list[float]) -> None:
    scripted.script(
        Reply(503, UNAVAILABLE, {"Retry-After": "0"}),
        Reply(503, UNAVAILABLE, {"Retry-After": "1"}),
        Reply(200, {"status": "ok", "models": {"m": True}}),
    )
    sdk = connect(scripted.url, backoff=5.0)  # a large backoff: only Retry-After can explain short waits
    health = sdk.health()
    assert health.models == {"m": True}
    assert len(scripted.seen) == 3
    assert len(waits) == 2
    assert waits[0] == 0.0  # Retry-After: 0
    assert 1.0 <= waits[1] <= 1.1  # Retry-After: 1, plus at most 10% jitter


def test_503_forever_gives_up_after_max_retries(connect: Any, scripted: Any, waits: list[float]) -> None:
    scripted.script(Reply(503, {"error": {"code": "overloaded", "message": "queue full", "detail": None}}))
    sdk = connect(scripted.url, max_retries=2, backoff=0.01, max_backoff=0.02)
    with pytest.raises(OverloadedError) as caught:
        sdk.models()
    assert len(scripted.seen) == 3 and len(waits) == 2  # the first attempt and two retries
    assert (caught.value.status, caught.value.code, caught.value.message) == (503, "overloaded", "queue full")


@pytest.mark.parametrize("status", [400, 401, 404, 413, 415, 422])
def test_4xx_is_never_retried(connect: Any, scripted: Any, status: int) -> None:
    scripted.script(Reply(status, {"error": {"code": "x", "message": "no", "detail": None}}, {"Retry-After": "0"}))
    sdk = connect(scripted.url, backoff=0.01)
    with pytest.raises(Exception) as caught:
        sdk.models()
    assert caught.value.status == status and len(scripted.seen) == 1


def test_500_is_a_server_error_and_not_retried(connect: Any, scripted: Any) -> None:
    scripted.script(Reply(500, {"error": {"code": "internal_error", "message": "quote id", "detail": None}}))
    sdk = connect(scripted.url, backoff=0.01)
    with pytest.raises(ServerError):
        sdk.health()
    assert len(scripted.seen) == 1


def test_backoff_is_bounded(connect: Any, scripted: Any, waits: list[float]) -> None:
    # No Retry-After: exponential backoff capped at max_backoff; a huge Retry-After is capped as well.
    scripted.script(Reply(503, UNAVAILABLE), Reply(503, UNAVAILABLE, {"Retry-After": "3600"}), Reply(503, UNAVAILABLE))
    sdk = connect(scripted.url, max_retries=5, backoff=0.05, max_backoff=0.1)
    with pytest.raises(OverloadedError):
        sdk.health()
    assert len(scripted.seen) == 6
    assert len(waits) == 5 and all(0 < w <= 0.1 * 1.1 for w in waits)  # 5 waits of at most 0.1 s (+10%)
    assert 0.1 <= waits[1] <= 0.11  # Retry-After: 3600, capped at max_backoff
    client = Client("http://x.test", backoff=0.5, max_backoff=4.0)
    delays = [client._backoff(attempt) for attempt in range(30) for _ in range(20)]
    assert all(0 < d <= 4.0 for d in delays) and max(delays) > 2.0  # grows, then stays under the cap
    assert all(0.25 <= client._backoff(0) <= 0.5 for _ in range(50))
    client.close()


def test_no_retries_when_max_retries_is_zero(connect: Any, scripted: Any, waits: list[float]) -> None:
    scripted.script(Reply(503, UNAVAILABLE, {"Retry-After": "0"}))
    with pytest.raises(OverloadedError):
        connect(scripted.url, max_retries=0).health()
    assert len(scripted.seen) == 1 and waits == []


def test_readiness_503_is_an_answer_not_a_retry(connect: Any, scripted: Any) -> None:
    scripted.script(Reply(503, {"status": "not_ready", "models": {"m": False}}, {"Retry-After": "0"}))
    ready = connect(scripted.url).ready()
    assert not ready.ok and ready.models == {"m": False} and len(scripted.seen) == 1


def test_connection_errors_are_retried(connect: Any, waits: list[float]) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"status": "ok", "models": {}})

    assert connect("http://vitserve.test", transport=httpx.MockTransport(handler), backoff=0.01).health().ok
    assert calls == 3 and len(waits) == 2


@pytest.fixture
def full_listener() -> Iterator[str]:
    """The URL of a port that is listening but takes no new connection: its accept queue is full and never
    drained, so a connect gets no answer (Linux drops the SYN) and times out, as with a server too busy to
    accept or a host that drops packets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued: list[socket.socket] = []
    for _ in range(8):  # fill the queue: connect until one gets no answer
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(address)
        except TimeoutError:
            probe.close()
            break
        queued.append(probe)
    else:
        pytest.fail("the listener kept accepting connections: no way to make a connect time out here")
    yield f"http://{address[0]}:{address[1]}"
    for probe in queued:
        probe.close()
    listener.close()


def test_a_connect_timeout_is_retried(connect: Any, full_listener: str, waits: list[float]) -> None:
    # No connection, so the server never saw the request: sending it again is safe, as after a refusal.
    sdk = connect(full_listener, timeout=0.1, max_retries=2, backoff=0.01)
    with pytest.raises(TransportError) as caught:
        sdk.health()
    assert isinstance(caught.value.__cause__, httpx.ConnectTimeout)
    assert len(waits) == 2  # three attempts
    assert "timed out connecting (limit 0.1 s, 3 attempts)" in str(caught.value)
    assert "is the server running at" in str(caught.value)


def test_a_late_answer_is_not_retried(connect: Any, scripted: Any, waits: list[float]) -> None:
    # The request reached the server, which may still be working on it: sending it again would add load where
    # there is too much, and make the caller wait a multiple of the timeout it asked for.
    scripted.script(Reply(delay=1.0))
    sdk = connect(scripted.url, timeout=0.1, max_retries=3)
    with pytest.raises(TransportError) as caught:
        sdk.classify(b"GIF89a")
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    assert len(scripted.seen) == 1 and waits == []
    message = str(caught.value)
    assert "POST" in message and "timed out waiting for the answer (limit 0.1 s)" in message
    assert "attempts" not in message and "not sent again" in message


def test_one_connection_is_reused(connect: Any, scripted: Any) -> None:
    sdk = connect(scripted.url)
    for _ in range(5):
        sdk.health()
    assert len(scripted.seen) == 5 and len({s.client_port for s in scripted.seen}) == 1
    assert scripted.seen[0].headers["User-Agent"].startswith("vitserve-client/")


def test_retry_after_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    def after(value: str) -> float | None:
        return retry_after_seconds(httpx.Response(503, headers={"Retry-After": value}))

    assert after("2") == 2.0 and after("0") == 0.0 and after("-3") == 0.0 and after("soon") is None
    now = float(int(time.time()))  # a whole second: an HTTP date has no finer resolution
    monkeypatch.setattr(vitserve_client._core, "time", types.SimpleNamespace(time=lambda: now))
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 60))
    assert after(in_a_minute) == 60.0
    assert after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now - 60))) == 0.0  # a date passed
    assert retry_after_seconds(httpx.Response(503)) is None


def test_not_found_on_the_scripted_server_keeps_its_fields(connect: Any, scripted: Any) -> None:
    scripted.script(
        Reply(404, {"error": {"code": "not_found", "message": "gone", "detail": {"a": 1}}}, {"X-Request-ID": "r1"})
    )
    with pytest.raises(NotFoundError) as caught:
        connect(scripted.url).model("x")
    assert (caught.value.detail, caught.value.request_id) == ({"a": 1}, "r1")
    assert scripted.seen[0].path == "/v1/models/x"
