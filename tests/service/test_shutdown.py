"""Shutdown under load: no request sent is left unanswered, draining responses say `Connection: close`, and a
server started under `make serve`'s arrangement stops with its parent.

Issue 16's probe lost one request per keep-alive client at SIGTERM (reset or EOF after sending) and found the
server orphaned, holding its port, when only `make` was signalled.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from tests.conftest import MODELS, ROOT, Server, free_port
from tests.service.conftest import encode
from tests.service.rawhttp import ConnectionEnded, Reader, connect, request_bytes, wait_for

pytestmark = pytest.mark.server

CLIENTS = 16
CLASSIFY = request_bytes(
    "POST", "/v1/classify", encode(Image.new("RGB", (32, 32), (20, 90, 200))), {"content-type": "image/png"}
)
# V2 infer is answered by the connection layer itself (service.http.fast_path): it must drain the same way.
_PIXELS = bytes(3 * 32 * 32 * 4)
_V2_HEAD = json.dumps(
    {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(_PIXELS)},
            }
        ]
    }
).encode()
V2_INFER = request_bytes(
    "POST",
    "/v2/models/digits-vit/infer",
    _V2_HEAD + _PIXELS,
    {"inference-header-content-length": str(len(_V2_HEAD)), "content-type": "application/octet-stream"},
)
# Quick requests leave a connection idle (to the server) most often between two of them: the moment a shutdown
# used to close it under a request already on its way (the old server lost one per client this way).
HEALTH = request_bytes("GET", "/healthz")


@dataclass
class KeepAliveClient:
    """Sends requests back to back on one connection, reconnecting when told `Connection: close`, until the
    listener refuses it. A request sent and never answered is `lost`."""

    port: int
    statuses: Counter[int] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def run(self) -> None:
        while True:
            try:
                sock = connect(self.port)
            except ConnectionRefusedError:  # the listener is closed: fine, nothing was sent
                return
            with sock:
                reader = Reader(sock)
                for sent in itertools.count():
                    try:
                        sock.sendall((CLASSIFY, V2_INFER)[sent // 4 % 2] if sent % 4 == 3 else HEALTH)
                        response = reader.response()
                    except (ConnectionEnded, OSError) as e:
                        self.lost.append(repr(e))
                        return
                    self.statuses[response.status] += 1
                    if response.status != 200 and not (response.status == 503 and "retry-after" in response.headers):
                        self.bad.append(f"{response.status} {response.body[:200]!r}")
                    if response.headers.get("connection") == "close":
                        break

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


def test_sigterm_answers_every_request_sent_on_keep_alive_connections(tmp_path) -> None:
    server = Server(MODELS, tmp_path / "server.log", VITSERVE_DRAIN_DELAY_S="0").wait_ready()
    clients = [KeepAliveClient(server.port) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=c.run) for c in clients]
    for thread in threads:
        thread.start()
    wait_for("every client to be served a few times", lambda: all(c.answered >= 3 for c in clients))
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    for thread in threads:
        thread.join(timeout=30)
    lost = [e for c in clients for e in c.lost]
    assert not lost, f"{len(lost)} requests sent and never answered: {lost[:5]}"
    assert not [b for c in clients for b in c.bad]
    server.stop()


def test_responses_during_the_drain_carry_connection_close(tmp_path) -> None:
    server = Server(MODELS, tmp_path / "server.log", VITSERVE_DRAIN_DELAY_S="2").wait_ready()
    with connect(server.port) as first, connect(server.port) as second:
        for sock in (first, second):
            sock.sendall(request_bytes("GET", "/healthz"))
            assert "connection" not in Reader(sock).response().headers  # keep-alive before the signal
        server.process.send_signal(signal.SIGTERM)
        wait_for("readiness to turn off", lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503)
        # On the connections opened before the signal: served, and told to go.
        for sock, request in ((first, CLASSIFY), (second, V2_INFER)):
            reader = Reader(sock)
            sock.sendall(request)
            response = reader.response()
            assert response.status == 200, response.body
            assert response.headers["connection"] == "close"
            assert reader.closed()
    assert server.process.wait(timeout=60) == 0
    server.stop()


# --- `make serve`: the server is make's child; a supervisor signals make only --------------------------------
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "service"])
print(child.pid, flush=True)
child.wait()
"""
_PR_SET_CHILD_SUBREAPER = 36


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_server_stops_with_its_parent(tmp_path, sig: signal.Signals) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VITSERVE_MODEL_DIR": str(MODELS),
        "VITSERVE_PORT": str(port),
        "VITSERVE_LOG_LEVEL": "warning",
        "VITSERVE_EXIT_WITH_PARENT": "1",  # what the Makefile's serve target sets
    }
    libc = ctypes.CDLL(None, use_errno=True)
    # The orphaned server is re-parented to this test process, which can then read its exit status.
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        with (tmp_path / "server.log").open("w") as log:
            parent = subprocess.Popen(
                [sys.executable, "-c", PARENT], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
            )
            assert parent.stdout is not None
            server_pid = int(parent.stdout.readline())
            url = f"http://127.0.0.1:{port}"
            wait_for("the server", lambda: _ready(url), timeout=60, every=0.1)
            parent.send_signal(sig)
            parent.wait(timeout=10)
            _, status = os.waitpid(server_pid, 0)  # blocks until the server has drained and exited
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "server.log").read_text()
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
