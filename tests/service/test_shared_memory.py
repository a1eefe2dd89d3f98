"""Triton's system shared memory extension through the real `tritonclient.http` and its
`tritonclient.utils.shared_memory`, on real servers: register, status, infer from and into regions, unregister;
every bad offset, size, key and region a 4xx with the protocol's `{"error": ...}`; off by default; and one registry
for every worker of a multi-process server."""

from __future__ import annotations

import io
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from PIL import Image

from model_export.digits import held_out_set
from service.v2.shared_memory import SHM_DIR
from tests.conftest import DEFAULT_MODEL, MODELS, Server, wait_until
from vit_artifact.metadata import read_metadata
from vit_artifact.preprocessing import preprocess_batch

pytestmark = pytest.mark.server

MODEL = "digits-vit"
MAX_REGIONS = 6
SHM_ON = {"VITSERVE_SYSTEM_SHARED_MEMORY": "true", "VITSERVE_SYSTEM_SHARED_MEMORY_MAX_REGIONS": str(MAX_REGIONS)}
FLOAT = 4  # bytes of an FP32 element


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    held = held_out_set()
    images = [Image.fromarray(c).convert("RGB") for c in held.images[:3]]
    pixels = preprocess_batch(images, read_metadata(DEFAULT_MODEL).preprocessing)  # (3, 3, 32, 32)
    sess = ort.InferenceSession(str(DEFAULT_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"pixel_values": pixels})
    return {"pixels": pixels, "logits": logits}


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(MODELS, tmp_path_factory.mktemp("shm") / "server.log", **SHM_ON).wait_ready()
    yield srv
    assert srv.stop() == 0


@pytest.fixture
def triton(shm_server):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url=shm_server.url.removeprefix("http://")) as client:
        yield client
        client.unregister_system_shared_memory()  # every test starts with no region


@pytest.fixture
def names() -> Iterator[Any]:
    """Unique shm keys for a test ("/vitserve-test-..."), and every object made under them removed after it."""
    made: list[str] = []

    def new() -> str:
        made.append(f"/vitserve-test-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield new
    for key in made:
        (SHM_DIR / key[1:]).unlink(missing_ok=True)


def plain_object(key: str, data: bytes) -> Path:
    """A POSIX shm object made without tritonclient (shm_open is open(2) under /dev/shm), for the tests that
    shrink or replace it: tritonclient maps its objects, and this process must never touch a shrunk mapping."""
    path = SHM_DIR / key[1:]
    path.write_bytes(data)
    return path


def infer_body(region: str, byte_size: int, offset: int = 0, shape: list[int] | None = None, **extra: Any) -> dict:
    """A V2 request whose pixel_values come from `region`, asking for logits in JSON."""
    parameters = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset:
        parameters["shared_memory_offset"] = offset
    tensor = {"name": "pixel_values", "shape": shape or [1, 3, 32, 32], "datatype": "FP32", "parameters": parameters}
    return {"inputs": [{**tensor, **extra}], "outputs": [{"name": "logits"}]}


def v2_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_register_infer_through_regions_status_unregister(shm_server, triton, names, digits):
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    pixels, logits = digits["pixels"], digits["logits"]
    assert "system_shared_memory" in triton.get_server_metadata()["extensions"]
    inputs = shm.create_shared_memory_region("pixels", names(), pixels.nbytes)
    outputs = shm.create_shared_memory_region("outputs", names(), 2 * logits.nbytes)
    try:
        shm.set_shared_memory_region(inputs, [pixels])
        triton.register_system_shared_memory("pixels", inputs._shm_key, pixels.nbytes)
        triton.register_system_shared_memory("outputs", outputs._shm_key, 2 * logits.nbytes)
        status = triton.get_system_shared_memory_status()
        assert status == [
            {"name": "outputs", "key": outputs._shm_key, "offset": 0, "byte_size": 2 * logits.nbytes},
            {"name": "pixels", "key": inputs._shm_key, "offset": 0, "byte_size": pixels.nbytes},
        ]
        assert triton.get_system_shared_memory_status("pixels") == [status[1]]

        tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
        tensor.set_shared_memory("pixels", pixels.nbytes)
        requested = [httpclient.InferRequestedOutput(n) for n in ("logits", "probabilities")]
        requested[0].set_shared_memory("outputs", logits.nbytes)
        requested[1].set_shared_memory("outputs", logits.nbytes, offset=logits.nbytes)
        result = triton.infer(MODEL, [tensor], outputs=requested)
        # The response carries no data for outputs written into a region, only where they went.
        assert "data" not in result.get_output("logits")
        entry = result.get_output("probabilities")
        assert entry["shape"] == [3, 10] and entry["datatype"] == "FP32"
        assert entry["parameters"] == {
            "shared_memory_region": "outputs",
            "shared_memory_byte_size": logits.nbytes,
            "shared_memory_offset": logits.nbytes,
        }
        got = shm.get_contents_as_numpy(outputs, np.float32, [3, 10])
        np.testing.assert_allclose(got, logits, atol=1e-5)
        probabilities = shm.get_contents_as_numpy(outputs, np.float32, [3, 10], offset=logits.nbytes)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
        assert (probabilities.argmax(1) == logits.argmax(1)).all()

        # An input at an offset in a region registered at an offset of its object: the third image alone.
        one = pixels[0].nbytes
        triton.register_system_shared_memory("tail", inputs._shm_key, 2 * one, offset=one)
        tensor = httpclient.InferInput("pixel_values", [1, 3, 32, 32], "FP32").set_shared_memory("tail", one, one)
        result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("logits")])
        np.testing.assert_allclose(result.as_numpy("logits"), logits[2:3], atol=1e-5)

        triton.unregister_system_shared_memory("tail")
        assert [r["name"] for r in triton.get_system_shared_memory_status()] == ["outputs", "pixels"]
        triton.unregister_system_shared_memory()
        assert triton.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)


def test_encoded_images_from_a_region(shm_server, triton, names, digits):
    """A BYTES input in a region is the binary data extension's layout: a 4-byte length before each element."""
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import serialize_byte_tensor

    pngs = []
    for canvas in held_out_set().images[:3]:
        buffer = io.BytesIO()
        Image.fromarray(canvas).convert("RGB").save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    serialized = serialize_byte_tensor(np.array(pngs, dtype=np.object_))  # one object: the serialized bytes
    size = len(serialized.item())
    region = shm.create_shared_memory_region("images", names(), size)
    try:
        shm.set_shared_memory_region(region, [serialized])
        triton.register_system_shared_memory("images", region._shm_key, size)
        tensor = httpclient.InferInput("image", [3], "BYTES").set_shared_memory("images", size)
        result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("logits")])
        np.testing.assert_allclose(result.as_numpy("logits"), digits["logits"], atol=1e-5)
    finally:
        shm.destroy_shared_memory_region(region)


def test_offsets_and_sizes_outside_the_region_are_400(shm_server, triton, names, digits):
    pixels = digits["pixels"][:1].tobytes()
    key = names()
    plain_object(key, pixels + b"\0" * 64)
    triton.register_system_shared_memory("r", key, len(pixels))
    url = f"{shm_server.url}/v2/models/{MODEL}/infer"
    cases = [
        (infer_body("r", len(pixels), offset=4), "passes the end of region 'r'"),
        (infer_body("r", len(pixels) + 4), "passes the end of region 'r'"),
        (infer_body("r", len(pixels) - 4), "needs 12288 bytes, got 12284"),  # the shape's size, not the region's
        (infer_body("r", 2**40), "over the"),  # never read: the body limit bounds what is copied out
        (infer_body("r", len(pixels), data=[0.0] * 3072), "also carries data"),
        (infer_body("nope", len(pixels)), "no system shared memory region named 'nope'"),
        (infer_body("r", -1), "shared_memory_byte_size must be a non-negative integer"),
        ({"inputs": [{**infer_body("r", 1)["inputs"][0], "parameters": {"shared_memory_offset": 0}}]}, "region name"),
    ]
    for body, message in cases:
        status = 413 if "over the" in message else 400
        v2_error(httpx.post(url, json=body), status, message)
    # Outputs: a region too small for the output (found after inference), a place outside the region, and
    # classification (its strings have no fixed size).
    logits_out = {"name": "logits", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8}}
    body = {"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]}
    v2_error(httpx.post(url, json={**body, "outputs": [logits_out]}), 400, "40 bytes", "cannot hold it")
    outside = {"name": "logits", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 40,
                                                "shared_memory_offset": len(pixels)}}  # fmt: skip
    v2_error(httpx.post(url, json={**body, "outputs": [outside]}), 400, "passes the end of region 'r'")
    top = {"name": "logits", "parameters": {**logits_out["parameters"], "classification": 2}}
    v2_error(httpx.post(url, json={**body, "outputs": [top]}), 400, "classification")
    # The region is intact and still serves.
    assert httpx.post(url, json=infer_body("r", len(pixels))).status_code == 200


def test_unregistered_region_and_registration_mistakes(shm_server, triton, names, digits):
    pixels = digits["pixels"][:1].tobytes()
    key = names()
    plain_object(key, pixels)
    base = f"{shm_server.url}/v2/systemsharedmemory"
    url = f"{shm_server.url}/v2/models/{MODEL}/infer"
    triton.register_system_shared_memory("r", key, len(pixels))
    v2_error(httpx.post(f"{base}/region/r/register", json={"key": key, "byte_size": 4}), 409, "already registered")
    triton.unregister_system_shared_memory("r")
    v2_error(httpx.post(url, json=infer_body("r", len(pixels))), 400, "no system shared memory region named 'r'")
    v2_error(httpx.get(f"{base}/region/r/status"), 404, "'r'")
    triton.unregister_system_shared_memory("r")  # unregistering an unknown name is not an error, as in Triton

    def register(body: Any) -> httpx.Response:
        return httpx.post(f"{base}/region/x/register", json=body)

    v2_error(register({"key": key, "offset": 0, "byte_size": len(pixels) + 1}), 400, f"{key} holds {len(pixels)}")
    v2_error(register({"key": key, "offset": 0, "byte_size": 0}), 400, "byte_size >= 1")
    v2_error(register({"key": key, "byte_size": "12"}), 400, "byte_size")
    v2_error(register({"key": key}), 400, "byte_size")
    v2_error(register([1]), 400, "{key, offset, byte_size}")
    v2_error(httpx.post(f"{base}/region/x/register", content=b"{"), 400, "not valid JSON")
    v2_error(httpx.post(f"{base}/region/{'n' * 300}/register", json={"key": key, "byte_size": 1}), 400, "1 to 256")
    assert triton.get_system_shared_memory_status() == []


def test_keys_that_are_not_shm_objects_are_refused(shm_server, triton, names, tmp_path):
    base = f"{shm_server.url}/v2/systemsharedmemory/region/x/register"
    for key in ["/../etc/passwd", "/a/b", "name-without-slash", "/", "/..", "//etc/passwd", "/" + "n" * 256]:
        v2_error(httpx.post(base, json={"key": key, "byte_size": 1}), 400, "is not a POSIX shared memory name")
    v2_error(httpx.post(base, json={"key": names(), "byte_size": 1}), 400, "no shared memory object")
    # A symlink planted under /dev/shm, pointing at a readable file: never followed.
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    link = names()
    (SHM_DIR / link[1:]).symlink_to(target)
    v2_error(httpx.post(base, json={"key": link, "byte_size": 1}), 400, link, "not a shared memory object")
    # A FIFO (an open would wait for a writer without O_NONBLOCK) and a directory: not regular files.
    fifo = names()
    os.mkfifo(SHM_DIR / fifo[1:])
    v2_error(httpx.post(base, json={"key": fifo, "byte_size": 1}), 400, fifo, "not a shared memory object")
    directory = names()
    (SHM_DIR / directory[1:]).mkdir()
    try:
        v2_error(httpx.post(base, json={"key": directory, "byte_size": 1}), 400, directory)
    finally:
        (SHM_DIR / directory[1:]).rmdir()
    assert triton.get_system_shared_memory_status() == []


def test_a_shrunk_or_replaced_object_is_400_and_the_server_lives(shm_server, triton, names, digits):
    pixels = digits["pixels"][:1].tobytes()
    url = f"{shm_server.url}/v2/models/{MODEL}/infer"
    key = names()
    path = plain_object(key, pixels)
    triton.register_system_shared_memory("r", key, len(pixels))
    output = {"name": "logits", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 40}}
    os.truncate(path, 100)  # what a client may do after registering: a mapping would now fault past 100 bytes
    v2_error(httpx.post(url, json=infer_body("r", len(pixels))), 400, "is now 100 bytes", "shrank")
    body = {"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]}
    os.truncate(path, 16)
    v2_error(httpx.post(url, json={**body, "outputs": [output]}), 400, "is now 16 bytes")
    assert path.stat().st_size == 16  # refused before any write: the object was not grown back
    # The same key, another object: the region named the old one.
    path.unlink()
    plain_object(key, pixels)
    v2_error(httpx.post(url, json=infer_body("r", len(pixels))), 400, "removed or replaced")
    assert shm_server.process.poll() is None
    assert httpx.get(f"{shm_server.url}/v2/health/live").json() == {"live": True}


def test_outputs_need_write_permission_and_inputs_only_read(shm_server, triton, names, digits):
    if os.geteuid() == 0:
        pytest.skip("root may write any file: a read-only object cannot be made here")
    pixels = digits["pixels"][:1].tobytes()
    key = names()
    path = plain_object(key, pixels)
    path.chmod(0o400)
    triton.register_system_shared_memory("ro", key, len(pixels))
    url = f"{shm_server.url}/v2/models/{MODEL}/infer"
    assert httpx.post(url, json=infer_body("ro", len(pixels))).status_code == 200
    output = {"name": "logits", "parameters": {"shared_memory_region": "ro", "shared_memory_byte_size": 40}}
    body = {**infer_body("ro", len(pixels)), "outputs": [output]}
    v2_error(httpx.post(url, json=body), 400, "may not write to")


def test_the_region_limit(shm_server, triton, names):
    key = names()
    plain_object(key, b"\0" * 64)
    for i in range(MAX_REGIONS):
        triton.register_system_shared_memory(f"r{i}", key, 8, offset=i)
    response = httpx.post(
        f"{shm_server.url}/v2/systemsharedmemory/region/more/register", json={"key": key, "byte_size": 8}
    )
    v2_error(response, 400, f"{MAX_REGIONS} system shared memory regions", "VITSERVE_SYSTEM_SHARED_MEMORY_MAX_REGIONS")
    triton.unregister_system_shared_memory("r0")
    triton.register_system_shared_memory("more", key, 8)


def test_off_by_default(server, names, digits):
    """The session's server runs the defaults: every route and region parameter is a 403 saying how to turn it
    on, and `GET /v2` does not list the extension."""
    assert "system_shared_memory" not in httpx.get(f"{server.url}/v2").json()["extensions"]
    base = f"{server.url}/v2/systemsharedmemory"
    key = names()
    plain_object(key, digits["pixels"][:1].tobytes())
    calls = [
        httpx.post(f"{base}/region/r/register", json={"key": key, "offset": 0, "byte_size": 8}),
        httpx.get(f"{base}/status"),
        httpx.get(f"{base}/region/r/status"),
        httpx.post(f"{base}/unregister"),
        httpx.post(f"{base}/region/r/unregister"),
        httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=infer_body("r", 12288)),
    ]
    for response in calls:
        v2_error(response, 403, "VITSERVE_SYSTEM_SHARED_MEMORY=true")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("shm-workers") / "server.log"
    srv = Server(MODELS, log, VITSERVE_WORKERS="2", **SHM_ON).wait_ready()
    yield srv
    assert srv.stop() == 0


def _only_through(worker: psutil.Process, others: list[psutil.Process]) -> None:
    """Stop every other worker (SIGSTOP), so the next new connection can only be accepted by `worker`."""
    for process in others:
        process.send_signal(signal.SIGSTOP)
    for process in others:
        wait_until(lambda p=process: p.status() == psutil.STATUS_STOPPED, "a worker stopped")
    worker.send_signal(signal.SIGCONT)


def test_one_registry_for_every_worker(two_workers, names, digits):
    """Register through one worker, infer through the other, unregister through it, and the first sees that: the
    workers are pinned by stopping the other one, since they share the listening socket."""
    workers = [p for p in psutil.Process(two_workers.process.pid).children() if "service.procs.worker" in p.cmdline()]
    assert len(workers) == 2
    pixels, logits = digits["pixels"][:1], digits["logits"][:1]
    key = names()
    plain_object(key, pixels.tobytes() + b"\0" * logits.nbytes)
    base = two_workers.url
    infer = {
        **infer_body("r", pixels.nbytes),
        "outputs": [{"name": "logits", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 40}}],
    }

    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=30) as client:  # a new connection each time
            return client.request(method, path, **kwargs)

    first, second = workers
    try:
        _only_through(first, [second])
        for name, offset, size in (("r", 0, pixels.nbytes), ("out", pixels.nbytes, logits.nbytes)):
            body = {"key": key, "offset": offset, "byte_size": size}
            assert call("POST", f"/v2/systemsharedmemory/region/{name}/register", json=body).status_code == 200
        _only_through(second, [first])
        assert [r["name"] for r in call("GET", "/v2/systemsharedmemory/status").json()] == ["out", "r"]
        response = call("POST", f"/v2/models/{MODEL}/infer", json=infer)
        assert response.status_code == 200, response.text
        assert "data" not in response.json()["outputs"][0]
        written = np.frombuffer((SHM_DIR / key[1:]).read_bytes()[pixels.nbytes :], np.float32).reshape(1, 10)
        np.testing.assert_allclose(written, logits, atol=1e-5)
        assert call("POST", "/v2/systemsharedmemory/region/r/unregister").status_code == 200
        _only_through(first, [second])
        v2_error(call("POST", f"/v2/models/{MODEL}/infer", json=infer), 400, "no system shared memory region named 'r'")
        assert [r["name"] for r in call("GET", "/v2/systemsharedmemory/status").json()] == ["out"]
    finally:
        for process in workers:
            process.send_signal(signal.SIGCONT)
