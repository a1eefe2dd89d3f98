"""Every documented client error, over HTTP, and the server's refusal to start on a broken configuration.

Each bad request must get its status and the JSON body `{"error": {"code", "message", "detail"}}`, and the
next good request on the same connection pool must still be served: a client can make a request fail, never
the server. Limits (body bytes, pixels, batch files) are tested on a second server started with small ones.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from PIL import Image

from tests.conftest import DEFAULT_MODEL, MODELS, Server, free_port, run_cli
from tests.service.conftest import allocates_no_image, encode, post_image
from vit_artifact.metadata import METADATA_FILE, sha256_file

BODY_LIMIT = 16_384  # bytes: a 32x32 canvas PNG is ~2 kB, a batch of three fits
PIXEL_LIMIT = 250_000  # 0.25 megapixels: the canvases fit, a 1000x1000 image does not
BATCH_LIMIT = 3

PHOTO_JPEG = encode(Image.fromarray(skimage.data.astronaut()).resize((128, 128)), "JPEG", quality=90)
GOOD_PNG = encode(Image.fromarray(skimage.data.camera()).resize((32, 32)))


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG declaring width x height: a few hundred bytes, however large it claims to be."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(min(height, 64))) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def refused_format(fmt: str) -> bytes:
    return encode(Image.new("RGB", (16, 16), (200, 30, 30)), fmt)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and len(body["error"]["message"]) > 10
    assert "Traceback" not in response.text and "/work/" not in response.text
    assert response.headers["x-request-id"] and response.headers["x-content-type-options"] == "nosniff"
    return body["error"]


def assert_still_serving(client: httpx.Client) -> None:
    response = post_image(client, "/v1/classify", GOOD_PNG)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[Server]:
    """The committed models behind small limits."""
    srv = Server(
        MODELS,
        tmp_path_factory.mktemp("limited") / "server.log",
        VITSERVE_MAX_BODY_BYTES=str(BODY_LIMIT),
        VITSERVE_MAX_PIXELS=str(PIXEL_LIMIT),
        VITSERVE_MAX_BATCH_FILES=str(BATCH_LIMIT),
    ).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def limited_client(limited) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def no_server_faults(server, limited) -> Iterator[None]:
    """After the module: neither server logged a traceback (a 500 would have)."""
    yield
    for srv in (server, limited):
        log = srv.log.read_text()
        assert "Traceback" not in log and "internal error" not in log, log


# --- 400, 404, 405, 415 and 422 on the default server --------------------------------------------------------

RAW = "/v1/classify"
BATCH = "/v1/classify/batch"


def raw(data: bytes, content_type: str = "image/jpeg") -> dict[str, Any]:
    """httpx arguments for a raw body."""
    return {"content": data, "headers": {"content-type": content_type}}


def one_file(field: str, data: bytes = b"") -> dict[str, Any]:
    """httpx arguments for a multipart body with one file (the photo, unless `data` is given)."""
    return {"files": {field: ("a.jpg", data or PHOTO_JPEG, "image/jpeg")}}


BAD_REQUESTS = [
    # method, path, httpx keyword arguments, status, code
    pytest.param("POST", RAW, raw(b"", "image/png"), 400, "bad_image", id="empty-body"),
    pytest.param("POST", RAW, raw(np.random.default_rng(0).bytes(4096)), 400, "bad_image", id="random-bytes"),
    pytest.param("POST", RAW, raw(PHOTO_JPEG[: len(PHOTO_JPEG) // 2]), 400, "bad_image", id="truncated-jpeg"),
    pytest.param("POST", RAW, raw(PHOTO_JPEG[:100]), 400, "bad_image", id="truncated-jpeg-header"),
    pytest.param("POST", RAW, raw(b"<!doctype html><html><body>hi</body></html>"), 400, "bad_image", id="html-as-jpeg"),
    pytest.param("POST", RAW, one_file("image"), 400, "bad_request", id="multipart-without-file"),
    pytest.param(
        "POST", RAW, {"files": {"file": ("a.png", b"", "image/png")}}, 400, "bad_image", id="multipart-empty-file"
    ),
    pytest.param("POST", RAW, raw(b"--x\r\n", "multipart/form-data"), 400, "bad_request", id="multipart-no-boundary"),
    pytest.param("POST", BATCH, one_file("file"), 400, "bad_request", id="batch-without-files"),
    pytest.param("POST", RAW, raw(b"hello", "text/plain"), 415, "unsupported_media_type", id="text-plain"),
    pytest.param("POST", RAW, {"content": PHOTO_JPEG}, 415, "unsupported_media_type", id="no-content-type"),
    pytest.param("POST", RAW, raw(refused_format("ICO"), "image/png"), 415, "unsupported_media_type", id="ico"),
    pytest.param("POST", RAW, raw(refused_format("PPM")), 415, "unsupported_media_type", id="ppm"),
    pytest.param("POST", BATCH, raw(PHOTO_JPEG), 415, "unsupported_media_type", id="batch-raw-body"),
    pytest.param("GET", "/v9/nothing", {}, 404, "not_found", id="unknown-route"),
    pytest.param("POST", "/v1/classify/everything", raw(PHOTO_JPEG), 404, "not_found", id="unknown-post-route"),
    pytest.param("GET", RAW, {}, 405, "method_not_allowed", id="wrong-method"),
]
ATTENTION = "/v1/attention"
QUERY_ERRORS = [
    # route, query, status, code: each sent with a good image, so only the query is wrong
    pytest.param(RAW, {"top_k": 0}, 422, "invalid_parameter", id="top_k=0"),
    pytest.param(RAW, {"top_k": "abc"}, 422, "invalid_parameter", id="top_k=abc"),
    pytest.param(ATTENTION, {"top_k": -3}, 422, "invalid_parameter", id="top_k=-3"),
    pytest.param(ATTENTION, {"method": "nope"}, 422, "invalid_parameter", id="method=nope"),
    pytest.param(ATTENTION, {"discard_ratio": 1.5}, 422, "invalid_parameter", id="discard_ratio=1.5"),
    pytest.param(ATTENTION, {"discard_ratio": -0.1}, 422, "invalid_parameter", id="discard_ratio=-0.1"),
    pytest.param(ATTENTION, {"format": "png", "alpha": 2}, 422, "invalid_parameter", id="alpha=2"),
    pytest.param(ATTENTION, {"format": "gif"}, 422, "invalid_parameter", id="format=gif"),
    pytest.param(ATTENTION, {"head_fusion": "median"}, 422, "invalid_parameter", id="head_fusion=median"),
    pytest.param(ATTENTION, {"method": "cls", "discard_ratio": 0.5}, 422, "invalid_parameter", id="cls+discard_ratio"),
    pytest.param(ATTENTION, {"method": "layer"}, 422, "invalid_parameter", id="layer-without-index"),
    pytest.param(ATTENTION, {"method": "rollout", "layer": 1}, 422, "invalid_parameter", id="rollout+layer"),
    pytest.param(
        ATTENTION,
        {"method": "layer", "layer": 0, "head": 1, "head_fusion": "max"},
        422,
        "invalid_parameter",
        id="head+fusion",
    ),
    pytest.param(ATTENTION, {"method": "layer", "layer": 99}, 404, "not_found", id="layer=99"),
    pytest.param(ATTENTION, {"method": "layer", "layer": -99}, 404, "not_found", id="layer=-99"),
    pytest.param(ATTENTION, {"method": "layer", "layer": 0, "head": 99}, 404, "not_found", id="head=99"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BAD_REQUESTS)
def test_bad_request_gets_its_error_and_the_server_keeps_serving(client, method, path, kwargs, status, code):
    assert_error(client.request(method, path, **kwargs), status, code)
    assert_still_serving(client)


@pytest.mark.parametrize(("path", "params", "status", "code"), QUERY_ERRORS)
def test_bad_query_gets_its_error_and_the_server_keeps_serving(client, path, params, status, code):
    error = assert_error(post_image(client, path, PHOTO_JPEG, content_type="image/jpeg", params=params), status, code)
    named = [k for k in params if k in error["message"]]
    assert named, f"the message should name the parameter: {error['message']}"
    assert_still_serving(client)


def test_refused_format_names_it_and_the_accepted_ones(client):
    error = assert_error(post_image(client, RAW, refused_format("ICO")), 415, "unsupported_media_type")
    assert error["detail"]["format"] == "ICO"
    assert "JPEG" in error["message"] and "PNG" in error["message"]


UNKNOWN_MODEL_ROUTES = [
    pytest.param("GET", "/v1/models/missing", {}, id="model"),
    pytest.param("POST", "/v1/models/missing/classify", raw(PHOTO_JPEG), id="classify"),
    pytest.param("POST", "/v1/models/missing/classify/batch", one_file("files"), id="batch"),
    pytest.param("POST", "/v1/models/missing/attention", raw(PHOTO_JPEG), id="attention"),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), UNKNOWN_MODEL_ROUTES)
def test_unknown_model_is_404_on_every_route(client, method, path, kwargs):
    error = assert_error(client.request(method, path, **kwargs), 404, "not_found")
    assert "missing" in error["message"]
    assert sorted(error["detail"]["available"]) == sorted(p.parent.name for p in MODELS.glob(f"*/{METADATA_FILE}"))
    assert_still_serving(client)


def test_huge_declared_image_is_refused_before_decoding_on_the_default_limit(client, server):
    with allocates_no_image(server.process.pid):  # 400 megapixels would take 400 MB at one byte a pixel
        assert_error(post_image(client, RAW, blank_png(20_000, 20_000)), 413, "payload_too_large")
    assert_still_serving(client)


# --- limits: a second server with small ones -----------------------------------------------------------------


def test_body_over_the_limit_by_content_length(limited_client):
    body = b"\xff\xd8" + b"\0" * BODY_LIMIT
    error = assert_error(limited_client.post(RAW, **raw(body)), 413, "payload_too_large")
    assert str(BODY_LIMIT) in error["message"] and str(len(body)) in error["message"]
    assert error["detail"]["limit_bytes"] == BODY_LIMIT
    assert_still_serving(limited_client)


def test_multipart_body_over_the_limit(limited_client):
    files = {"file": ("big.jpg", b"\0" * (BODY_LIMIT + 1), "image/jpeg")}
    assert_error(limited_client.post(RAW, files=files), 413, "payload_too_large")
    assert_still_serving(limited_client)


BOUNDARY = "vitserve-test"
MULTIPART_HEAD = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
    "Content-Type: image/jpeg\r\n\r\n"
).encode()


@pytest.mark.parametrize(
    ("content_type", "head"),
    [("image/jpeg", b"\xff\xd8"), (f"multipart/form-data; boundary={BOUNDARY}", MULTIPART_HEAD)],
    ids=["raw", "multipart"],
)
def test_chunked_body_over_the_limit_without_content_length(limited_client, content_type, head):
    # A well-formed start, then a file that keeps coming: only its size can be wrong.
    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(2 * BODY_LIMIT // 1024):
            yield b"\0" * 1024

    request = limited_client.build_request("POST", RAW, content=chunks(), headers={"content-type": content_type})
    assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
    error = assert_error(limited_client.send(request), 413, "payload_too_large")
    assert f"request body is more than {BODY_LIMIT} bytes" in error["message"]
    assert_still_serving(limited_client)


def test_chunked_body_under_the_limit_is_served(limited_client):
    def chunks() -> Iterator[bytes]:
        yield GOOD_PNG[:100]
        yield GOOD_PNG[100:]

    response = limited_client.post(RAW, content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (1_000, 1_000), (PIXEL_LIMIT + 1, 1)])
def test_too_many_pixels_is_refused_before_decoding(limited, limited_client, width, height):
    data = blank_png(width, height)
    assert len(data) < BODY_LIMIT
    with allocates_no_image(limited.process.pid):  # told apart only at 20,000 x 20,000; the others are small
        error = assert_error(post_image(limited_client, RAW, data), 413, "payload_too_large")
    assert f"{PIXEL_LIMIT / 1e6:.1f} megapixels" in error["message"]
    assert_still_serving(limited_client)


def test_image_at_the_pixel_limit_is_served(limited_client):
    assert post_image(limited_client, RAW, blank_png(500, 500)).status_code == 200


@pytest.mark.parametrize("count", [BATCH_LIMIT + 1, 2 * BATCH_LIMIT])
def test_too_many_batch_files(limited_client, count):
    files = [("files", (f"{i}.png", GOOD_PNG, "image/png")) for i in range(count)]
    error = assert_error(limited_client.post("/v1/classify/batch", files=files), 413, "payload_too_large")
    assert str(BATCH_LIMIT) in error["message"]
    assert_still_serving(limited_client)


def test_batch_at_the_file_limit_reports_an_oversized_image_in_place(limited_client):
    files = [
        ("files", ("a.png", GOOD_PNG, "image/png")),
        ("files", ("huge.png", blank_png(20_000, 20_000), "image/png")),
        ("files", ("c.png", GOOD_PNG, "image/png")),
    ]
    response = limited_client.post("/v1/classify/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["error"] is None for r in results] == [True, False, True]
    assert results[1]["error"]["code"] == "payload_too_large"
    assert results[0]["predictions"] == results[2]["predictions"]


# --- the server refuses to start on a broken configuration ---------------------------------------------------


def corrupt_copy(root: Path, *, rehash: bool) -> None:
    """A copy of the default artifact with a truncated classify graph; `rehash` updates its recorded sha256."""
    artifact = shutil.copytree(DEFAULT_MODEL, root / DEFAULT_MODEL.name)
    graph = artifact / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:2048])
    if rehash:  # gets past the hash check, so onnxruntime itself must reject the file
        record = json.loads((artifact / METADATA_FILE).read_text())
        record["graphs"]["classify"]["sha256"] = sha256_file(graph)
        (artifact / METADATA_FILE).write_text(json.dumps(record))


STARTUP_FAILURES = [
    # environment ("{tmp}" is a fresh folder), the artifact copied there (none, truncated graph, also rehashed),
    # and what the one error line must say
    pytest.param({"VITSERVE_MODEL_DIR": "{tmp}"}, None, "no artifacts in", id="empty-model-dir"),
    pytest.param({"VITSERVE_MODEL_DIR": "{tmp}/nowhere"}, None, "does not exist", id="missing-model-dir"),
    pytest.param({"VITSERVE_MODEL_DIR": "{tmp}"}, "truncated", "sha256 differs", id="truncated-graph"),
    pytest.param({"VITSERVE_MODEL_DIR": "{tmp}"}, "rehashed", "onnxruntime cannot load it", id="unloadable-graph"),
    pytest.param({"VITSERVE_DEFAULT_MODEL": "missing"}, None, "default model 'missing'", id="missing-default-model"),
    pytest.param({"VITSERVE_MAX_PIXELS": "0"}, None, "VITSERVE_MAX_PIXELS", id="bad-limit"),
    pytest.param(
        {"VITSERVE_PROVIDER": "cuda"},
        None,
        "onnxruntime-gpu",
        id="cuda-without-gpu",
        marks=pytest.mark.skipif(
            "CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime here offers CUDA"
        ),
    ),
]


@pytest.mark.parametrize(("environment", "artifact", "says"), STARTUP_FAILURES)
def test_broken_configuration_exits_with_a_clear_message(tmp_path, monkeypatch, environment, artifact, says):
    if artifact is not None:
        corrupt_copy(tmp_path, rehash=artifact == "rehashed")
    monkeypatch.setenv("VITSERVE_MODEL_DIR", str(MODELS))
    monkeypatch.setenv("VITSERVE_PORT", str(free_port()))
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    result = run_cli("-m", "service", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr
