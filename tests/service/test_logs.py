"""Logs: `VITSERVE_LOG_FORMAT=json` gives one JSON object per line from every process (one process, or supervisor,
engine and workers), and every line logged while a request is handled, uvicorn's access line included, carries
its request id; the text format carries it too."""

from __future__ import annotations

import io
import json
import logging
import select
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.obs.logs import REQUEST_ID, JsonFormatter, QueuedStderrHandler, RequestIdFilter, TextFormatter
from tests.conftest import MODELS, Server, wait_until
from tests.service.test_direct import pixels_request


def record(name: str, message: str, *args: Any) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)


def formatted(formatter: logging.Formatter, rec: logging.LogRecord, role: str | None = None) -> str:
    RequestIdFilter(role).filter(rec)
    return formatter.format(rec)


def test_json_lines_carry_the_request_id_and_the_access_fields() -> None:
    token = REQUEST_ID.set("abc123")
    try:
        access = record(
            "vitserve.access", '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", "/v1/classify", "1.1", 200
        )
        entry = json.loads(formatted(JsonFormatter(), access, "worker 1"))
    finally:
        REQUEST_ID.reset(token)
    assert entry["request_id"] == "abc123" and entry["process"] == "worker 1" and entry["level"] == "INFO"
    assert entry["logger"] == "vitserve.access" and entry["message"].endswith('"POST /v1/classify HTTP/1.1" 200')
    assert entry | {"client": "127.0.0.1:5000", "method": "POST", "path": "/v1/classify", "status": 200} == entry
    assert entry["time"].endswith("+00:00")
    outside = json.loads(formatted(JsonFormatter(), record("vitserve", "loaded %d models", 2)))
    assert outside["request_id"] is None and outside["message"] == "loaded 2 models" and outside["process"] == "server"


def test_text_lines_name_the_role_and_the_request() -> None:
    token = REQUEST_ID.set("abc123")
    try:
        line = formatted(TextFormatter(), record("vitserve.engine", "batch of %d", 3), "engine")
    finally:
        REQUEST_ID.reset(token)
    assert line.endswith(" INFO vitserve.engine[engine]: batch of 3 [abc123]")
    assert formatted(TextFormatter(), record("vitserve", "ready")).endswith(" INFO vitserve: ready")


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object, or this fails


def access_line(log: Path, request_id: str) -> dict[str, Any] | None:
    return next(
        (e for e in json_lines(log) if e["logger"] == "vitserve.access" and e["request_id"] == request_id), None
    )


@pytest.mark.server
@pytest.mark.parametrize("workers", ["1", "2"])
def test_json_logs_from_a_running_server(tmp_path: Path, held_out_pngs: list[bytes], workers: str) -> None:
    log = tmp_path / "server.log"
    srv = Server(MODELS, log, VITSERVE_LOG_FORMAT="json", VITSERVE_LOG_LEVEL="info", VITSERVE_WORKERS=workers)
    srv.wait_ready()
    try:
        for i in range(3):
            request_id = f"json-log-{workers}-{i}"
            response = httpx.post(
                f"{srv.url}/v1/classify",
                content=held_out_pngs[i],
                headers={"content-type": "image/png", "x-request-id": request_id},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            wait_until(lambda rid=request_id: access_line(log, rid) is not None, f"the access line of {request_id}")
            entry = access_line(log, request_id)
            assert entry is not None
            assert entry["method"] == "POST" and entry["path"] == "/v1/classify" and entry["status"] == 200
            assert entry["level"] == "INFO" and entry["pid"] > 0
        # One line per answer, whichever way it went: the direct path (V2 infer), ASGI (a probe, a 404).
        body, headers = pixels_request()
        direct = httpx.post(
            f"{srv.url}/v2/models/digits-vit/infer", content=body, headers={**headers, "x-request-id": "once-direct"}
        )
        assert direct.status_code == 200
        assert httpx.get(f"{srv.url}/v2/health/ready", headers={"x-request-id": "once-asgi"}).status_code == 200
        assert httpx.get(f"{srv.url}/nowhere", headers={"x-request-id": "once-404"}).status_code == 404
        wait_until(lambda: access_line(log, "once-404") is not None, "the access line of the 404")
    finally:
        assert srv.stop() == 0
    entries = json_lines(log)
    for request_id, path, status in [
        ("once-direct", "/v2/models/digits-vit/infer", 200),
        ("once-asgi", "/v2/health/ready", 200),
        ("once-404", "/nowhere", 404),
    ]:
        lines = [e for e in entries if e["logger"] == "vitserve.access" and e["request_id"] == request_id]
        assert [(e["path"], e["status"]) for e in lines] == [(path, status)], request_id
    assert all(set(e) >= {"time", "level", "logger", "message", "request_id", "process"} for e in entries)
    roles = {e["process"] for e in entries}
    if workers == "1":
        assert roles == {"server"}
    else:
        assert {"supervisor", "engine", "worker 0", "worker 1"} >= roles >= {"supervisor", "engine"}
        assert any(r.startswith("worker") for r in roles)
    # Outside a request there is no id; inside one, only that request's.
    assert all(e["request_id"] is None for e in entries if e["logger"] != "vitserve.access")


class Writes(io.StringIO):
    """A stream that remembers each flushed piece (what one write(2) to stderr would carry)."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def flush(self) -> None:
        written = self.getvalue()[sum(map(len, self.pieces)) :]
        if written:
            self.pieces.append(written)


def queued_handler() -> tuple[QueuedStderrHandler, Writes, logging.Logger]:
    handler = QueuedStderrHandler(interval_s=3600)  # the thread never writes: only what the test triggers
    stream = Writes()
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.Logger("queued-test")
    logger.addHandler(handler)
    return handler, stream, logger


def test_info_lines_wait_for_the_writer_and_warnings_take_them_along() -> None:
    handler, stream, logger = queued_handler()
    logger.info("first")
    logger.info("second")
    assert stream.getvalue() == "", "INFO lines wait for the writer thread"
    logger.warning("third")  # written at once, after the lines queued before it
    assert stream.pieces == ["INFO first\nINFO second\nWARNING third\n"]
    logger.info("fourth")
    handler.close()  # as logging.shutdown at exit: what is queued is written
    assert stream.getvalue().endswith("WARNING third\nINFO fourth\n")
    logger.info("after close")  # written at once: no writer thread any more
    assert stream.getvalue().endswith("INFO after close\n")


def test_queued_lines_are_written_in_whole_lines_a_pipe_keeps_in_one_piece() -> None:
    handler, stream, logger = queued_handler()
    for i in range(200):
        logger.info("line %03d %s", i, "x" * 60)
    handler.flush()
    assert len(stream.pieces) > 1 and all(len(p.encode()) <= select.PIPE_BUF for p in stream.pieces)
    assert all(p.endswith("\n") for p in stream.pieces)
    assert stream.getvalue().splitlines() == [f"INFO line {i:03d} {'x' * 60}" for i in range(200)]


def test_the_writer_thread_writes_queued_lines_soon() -> None:
    handler = QueuedStderrHandler(interval_s=0.01)
    stream = Writes()
    handler.setStream(stream)
    logger = logging.Logger("queued-thread-test")
    logger.addHandler(handler)
    logger.info("soon")
    wait_until(lambda: stream.getvalue() == "soon\n", "the writer thread writes the queued line")
    handler.close()


@pytest.mark.server
def test_access_lines_queued_at_sigterm_reach_the_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    srv = Server(MODELS, log, VITSERVE_LOG_LEVEL="info").wait_ready()
    try:
        for i in range(5):
            response = httpx.get(f"{srv.url}/v2/health/live", headers={"x-request-id": f"before-exit-{i}"})
            assert response.status_code == 200
    finally:
        srv.process.send_signal(signal.SIGTERM)
        assert srv.stop() == 0
    text = log.read_text()  # no waiting: the server has exited, and wrote what it had queued
    assert all(f'"GET /v2/health/live HTTP/1.1" 200 [before-exit-{i}]' in text for i in range(5)), text
