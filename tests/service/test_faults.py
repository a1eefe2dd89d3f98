"""Faults: artifacts that cannot be served, models skipped at start, and shutdown on SIGTERM.

An artifact whose files are missing or damaged, or whose metadata disagrees with its graphs, must stop the start
with one clear line (exit code 2), or, with `VITSERVE_ON_MODEL_ERROR=skip`, leave that one model unavailable
(503 with the reason) while the others serve. SIGTERM must turn readiness off at once, let in-flight requests
finish, and exit 0.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image

from service.core.loading import load_repository
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS, Server, free_port, metric, run_cli, wait_until
from tests.service import inprocess
from tests.service.conftest import encode
from vit_artifact.metadata import METADATA_FILE, ArtifactError, sha256_file

PNG = encode(Image.fromarray(skimage.data.camera()).resize((32, 32)))
INT8 = MODELS / "digits-vit-int8"


def edit_record(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    record = json.loads((directory / METADATA_FILE).read_text())
    change(record)
    (directory / METADATA_FILE).write_text(json.dumps(record))


def rehash(directory: Path, role: str = "classify") -> None:
    """Record the graph's current sha256, so the damage gets past the hash check to onnxruntime itself."""
    graph = directory / ("model.onnx" if role == "classify" else "attention.onnx")
    edit_record(directory, lambda r: r["graphs"][role].update(sha256=sha256_file(graph)))


def drop_label(r: dict[str, Any]) -> None:
    r["labels"] = r["labels"][:-1]


def bigger_input(r: dict[str, Any]) -> None:
    r.update(input_size=[64, 64], patch_size=8)  # grid 8x8 still: consistent metadata, not the graph's input
    r["preprocessing"].update(resize_size=[64, 64], crop_size=[64, 64])


def not_onnx(d: Path) -> None:
    (d / "model.onnx").write_text("this is not a protobuf\n")
    rehash(d)


def truncated(d: Path) -> None:
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:2048])


def truncated_rehashed(d: Path) -> None:
    truncated(d)
    rehash(d)


BROKEN = {
    # name: how the copy is damaged, what the one error says
    "labels-not-logits": (lambda d: edit_record(d, drop_label), "lists 9 labels"),
    "heads-not-graph": (lambda d: edit_record(d, lambda r: r.update(num_heads=2)), "does not match the metadata"),
    "layers-not-graph": (lambda d: edit_record(d, lambda r: r.update(num_layers=6)), "does not match the metadata"),
    "input-not-graph": (lambda d: edit_record(d, bigger_input), "do not take the input"),
    "missing-graph": (lambda d: (d / "model.onnx").unlink(), "the classify graph named in artifact.json is missing"),
    "missing-attention": (lambda d: (d / "attention.onnx").unlink(), "the attention graph"),
    "not-onnx": (not_onnx, "onnxruntime cannot load it"),
    "truncated": (truncated, "sha256 differs"),
    "truncated-rehashed": (truncated_rehashed, "onnxruntime cannot load it"),
    "metadata-not-json": (lambda d: (d / METADATA_FILE).write_text("{not json"), "not a valid vitserve artifact"),
    "metadata-incomplete": (lambda d: edit_record(d, lambda r: r.pop("labels")), "not a valid vitserve artifact"),
    "bad-serving-json": (lambda d: (d / "serving.json").write_text('{"max_batch": 4}'), "unknown keys"),
}


def broken_copy(root: Path, how: str, source: Path = DEFAULT_MODEL) -> Path:
    directory = shutil.copytree(source, root / source.name)
    BROKEN[how][0](directory)
    return directory


# --- a broken artifact stops the start ----------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_broken_artifact_is_refused_with_what_is_wrong(tmp_path, how):
    broken_copy(tmp_path, how)
    with pytest.raises(ArtifactError) as caught:
        load_repository(Settings(model_dir=tmp_path, provider="cpu"))
    assert BROKEN[how][1] in str(caught.value)


@pytest.mark.parametrize("how", ["input-not-graph", "labels-not-logits", "bad-serving-json"])
@pytest.mark.server
def test_inconsistent_artifact_exits_2_with_one_line(tmp_path, monkeypatch, how):
    broken_copy(tmp_path, how)
    monkeypatch.setenv("VITSERVE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("VITSERVE_PORT", str(free_port()))
    result = run_cli("-m", "service", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and BROKEN[how][1] in errors[0], result.stderr


def test_a_broken_second_model_also_stops_the_start_by_default(tmp_path):
    shutil.copytree(DEFAULT_MODEL, tmp_path / DEFAULT_MODEL.name)
    broken_copy(tmp_path, "truncated", INT8)
    with pytest.raises(ArtifactError, match="digits-vit-int8"):
        load_repository(Settings(model_dir=tmp_path, provider="cpu"))


# --- VITSERVE_ON_MODEL_ERROR=skip ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    """The default model, and the INT8 variant with a truncated graph, loaded with skip."""
    root = tmp_path_factory.mktemp("skip")
    shutil.copytree(DEFAULT_MODEL, root / DEFAULT_MODEL.name)
    broken_copy(root, "truncated", INT8)
    settings = Settings(model_dir=root, provider="cpu", on_model_error="skip")
    repository = load_repository(settings)
    with TestClient(inprocess.app(repository, model_dir=root, on_model_error="skip")) as c:
        yield root, c


def test_skip_serves_the_others_and_lists_the_broken_one(skipping):
    root, c = skipping
    assert c.get("/readyz").status_code == 200  # readiness: every model that loaded is warmed up
    assert c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"}).status_code == 200
    listing = c.get("/v1/models").json()
    assert [m["name"] for m in listing["models"]] == ["digits-vit"]
    [unavailable] = listing["unavailable"]
    assert unavailable["name"] == "digits-vit-int8"
    assert "digits-vit-int8/model.onnx: sha256 differs" in unavailable["error"]
    assert str(root) not in c.get("/v1/models").text  # no server paths, only the repository-relative one


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/v1/models/digits-vit-int8/classify", {"content": PNG, "headers": {"content-type": "image/png"}}),
        ("POST", "/v1/models/digits-vit-int8/attention", {"content": PNG, "headers": {"content-type": "image/png"}}),
        ("GET", "/v1/models/digits-vit-int8", {}),
    ],
)
def test_requests_to_the_skipped_model_get_503_with_the_reason(skipping, method, path, kwargs):
    root, c = skipping
    response = c.request(method, path, **kwargs)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "failed to load" in error["message"]
    assert "sha256 differs" in error["message"] and str(root) not in response.text


def test_v2_requests_to_the_skipped_model_get_503_in_the_protocol_shape(skipping):
    _, c = skipping
    body = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
    response = c.post("/v2/models/digits-vit-int8/infer", json=body)
    assert response.status_code == 503 and "failed to load" in response.json()["error"]
    assert c.post("/v2/models/digits-vit/infer", json=body).status_code == 200


def test_skip_never_applies_to_the_default_model(tmp_path):
    broken_copy(tmp_path, "truncated")
    shutil.copytree(INT8, tmp_path / INT8.name)
    with pytest.raises(ArtifactError, match="the default model must load"):
        load_repository(Settings(model_dir=tmp_path, provider="cpu", on_model_error="skip"))


# --- SIGTERM ---------------------------------------------------------------------------------------------------


def in_flight(client: httpx.Client, count: int) -> bool:
    """Whether `count` requests are being served, besides this scrape of `/metrics` itself."""
    return metric(client.get("/metrics").text, "vitserve_requests_in_flight") == count + 1


class Background:
    """A classify request in a thread, for a request that is in flight while the test does other things."""

    def __init__(self, url: str) -> None:
        self.response: httpx.Response | None = None
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            self.response = c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})

    def result(self) -> httpx.Response:
        self.thread.join(timeout=30)
        assert self.response is not None
        return self.response


@contextmanager
def request_in_flight(
    tmp_path: Path, queue_delay_ms: int, **env: str
) -> Iterator[tuple[Server, httpx.Client, Background]]:
    """A server whose requests wait `queue_delay_ms` in the batch queue for company, with one request in flight."""
    srv = Server(
        MODELS,
        tmp_path / "server.log",
        VITSERVE_MODELS='["digits-vit"]',
        VITSERVE_MAX_QUEUE_DELAY_MS=str(queue_delay_ms),
        **env,
    ).wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            request = Background(srv.url)
            wait_until(lambda: in_flight(c, 1), "the request is in flight")
            yield srv, c, request
    finally:
        srv.stop()


@pytest.mark.server
def test_sigterm_turns_readiness_off_drains_and_exits_0(tmp_path):
    # The first request waits for a second to share its batch (of 2), up to the request timeout; the drain is
    # longer than any test, and a second SIGTERM cuts it short.
    env = {"VITSERVE_DRAIN_DELAY_S": "600", "VITSERVE_MAX_BATCH_SIZE": "2"}
    with request_in_flight(tmp_path, 600_000, **env) as (srv, c, first):
        srv.process.send_signal(signal.SIGTERM)
        wait_until(lambda: c.get("/readyz").status_code == 503, "readiness turns off")
        assert first.thread.is_alive(), "readiness turned off while the request was still in flight"
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/healthz").status_code == 200  # alive: only readiness changes
        second = Background(srv.url)  # still served while draining: it completes the first one's batch
        assert first.result().status_code == 200
        assert second.result().status_code == 200
        assert c.get("/healthz").status_code == 200 and srv.process.poll() is None, "the drain delay was kept"
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=20) == 0
        assert "readiness is off" in srv.log.read_text()


@pytest.mark.server
def test_sigterm_without_drain_delay_finishes_in_flight_requests_and_exits_0(tmp_path):
    with request_in_flight(tmp_path, 1000) as (srv, _, request):
        srv.process.send_signal(signal.SIGTERM)
        assert request.result().status_code == 200
        assert srv.process.wait(timeout=20) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/healthz", timeout=2)


@pytest.mark.server
def test_a_request_still_running_after_the_grace_period_gets_503_to_retry_elsewhere(tmp_path):
    with request_in_flight(tmp_path, 5000, VITSERVE_SHUTDOWN_GRACE_S="0.3") as (srv, _, request):
        srv.process.send_signal(signal.SIGTERM)
        response = request.result()
        assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
        assert "shut down before this request finished" in response.json()["error"]["message"]
        assert srv.process.wait(timeout=20) == 0
