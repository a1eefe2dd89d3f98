"""V2 over gRPC (`VITSERVE_GRPC_PORT`) through the real clients, unmodified: tritonclient.grpc (sync and aio) and
KServe's InferenceGRPCClient, against a real server with API keys, in one process and with two workers.

tritonclient's and KServe's generated modules both define `inference.*` in protobuf's default descriptor pool,
so no process may import both: pytest's own process imports neither; each tritonclient test runs in a forked
child (`in_child`, as test_v2's KServe REST test does), KServe's gRPC client in a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from model_export.digits import held_out_set
from tests.conftest import DEFAULT_MODEL, MODELS, ROOT, Server, free_port, metric, wait_until
from tests.service.conftest import in_child
from vit_artifact.metadata import read_metadata
from vit_artifact.preprocessing import preprocess_batch

pytestmark = pytest.mark.server

MODEL = "digits-vit"
KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def digits():
    held = held_out_set()
    pick = np.linspace(0, len(held.labels) - 1, 12).round().astype(int)
    images = [Image.fromarray(c).convert("RGB") for c in held.images[pick]]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    pixels = preprocess_batch(images, read_metadata(DEFAULT_MODEL).preprocessing)
    session = ort.InferenceSession(str(DEFAULT_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": pixels})
    return {"pngs": pngs, "pixels": pixels, "logits": logits}


class GrpcServer(Server):
    def __init__(self, log, **env: str) -> None:
        self.grpc_port = free_port()
        super().__init__(MODELS, log, VITSERVE_GRPC_PORT=str(self.grpc_port), VITSERVE_API_KEYS=KEY, **env)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = GrpcServer(tmp_path_factory.mktemp("grpc") / "server.log").wait_ready()
    yield srv
    assert srv.stop() == 0


def connect(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def _image_input(pngs: list[bytes]):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    return tensor


@in_child
def test_health_and_metadata(server):
    triton = connect(server)
    # Live and ready are open without a key, as /v2/health/* is over HTTP; the rest needs one.
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL, headers=AUTH) and triton.is_model_ready(MODEL, "1", headers=AUTH)
    meta = triton.get_server_metadata(headers=AUTH, as_json=True)
    assert meta["name"] == "vitserve" and "classification" in meta["extensions"]
    model = triton.get_model_metadata(MODEL, headers=AUTH, as_json=True)
    assert model["inputs"][0] == {"name": "pixel_values", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}
    assert {o["name"] for o in model["outputs"]} >= {"logits", "probabilities", "attention_rollout"}


@in_child
def test_triton_sync_pixels_and_images(server, digits):
    triton = connect(server)
    import tritonclient.grpc as grpcclient

    x = digits["pixels"][:4]
    tensor = grpcclient.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # raw_input_contents
    result = triton.infer(MODEL, [tensor], request_id="req-1", headers=AUTH)
    assert result.get_response().id == "req-1"
    np.testing.assert_allclose(result.as_numpy("logits"), digits["logits"][:4], atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(1), 1.0, atol=1e-5)

    outputs = [
        grpcclient.InferRequestedOutput("logits", class_count=3),  # Triton's classification extension
        grpcclient.InferRequestedOutput("attention_rollout"),
    ]
    result = triton.infer(MODEL, [_image_input(digits["pngs"])], outputs=outputs, headers=AUTH)
    top = result.as_numpy("logits")
    assert top.shape == (12, 3)
    assert [int(row[0].decode().split(":")[1]) for row in top] == digits["logits"].argmax(1).tolist()
    maps = result.as_numpy("attention_rollout")
    assert maps.shape == (12, 8, 8) and np.isclose(maps.max(axis=(1, 2)), 1.0).all()


@in_child
def test_triton_aio_concurrent_images(server, digits):
    import tritonclient.grpc.aio as aioclient

    async def run() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            calls = [client.infer(MODEL, [_image_input([png])], headers=AUTH) for png in digits["pngs"]]
            return [r.as_numpy("logits")[0] for r in await asyncio.gather(*calls)]

    np.testing.assert_allclose(np.stack(asyncio.run(run())), digits["logits"], atol=1e-5)


def test_kserve_grpc_client(server, digits, tmp_path):
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, digits["pixels"][:3])
    pngs = []
    for i, png in enumerate(digits["pngs"][:3]):
        pngs.append(tmp_path / f"{i}.png")
        pngs[-1].write_bytes(png)
    script = ROOT / "tests" / "service" / "kserve_grpc_client.py"
    done = subprocess.run(
        [sys.executable, str(script), server.grpc_url, KEY, str(pixels), *map(str, pngs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["live"] and report["model_ready"]
    np.testing.assert_allclose(report["typed_logits"], digits["logits"][:3], atol=1e-5)
    assert np.argmax(report["raw_probabilities"], 1).tolist() == digits["logits"][:3].argmax(1).tolist()


@in_child
def test_errors_are_grpc_status_codes(server, digits):
    triton = connect(server)
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def status(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(InferenceServerException) as caught:
            call()
        return caught.value.status(), caught.value.message()

    wrong = grpcclient.InferInput("pixel_values", [1, 3, 16, 16], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    code, message = status(lambda: triton.infer(MODEL, [wrong], headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT" and "[N, 3, 32, 32]" in message
    code, message = status(lambda: triton.infer(MODEL, [_image_input([b"not an image"])], headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT"
    code, message = status(lambda: triton.infer("no-such-model", [wrong], headers=AUTH))
    assert code == "StatusCode.NOT_FOUND" and "not loaded" in message
    code, message = status(lambda: triton.is_model_ready("no-such-model", headers=AUTH))
    assert code == "StatusCode.NOT_FOUND"
    code, message = status(lambda: triton.infer(MODEL, [wrong]))
    assert code == "StatusCode.UNAUTHENTICATED" and "no API key" in message
    code, message = status(lambda: triton.get_model_metadata(MODEL, headers={"x-api-key": "wrong"}))
    assert code == "StatusCode.UNAUTHENTICATED" and "not valid" in message
    code, message = status(lambda: triton.infer(MODEL, [_image_input(digits["pngs"][:1] * 33)], headers=AUTH))
    assert code == "StatusCode.RESOURCE_EXHAUSTED" and "VITSERVE_MAX_BATCH_FILES" in message
    # Every refusal gave back what its call held (the gate's ticket), and the server goes on serving.
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "vitserve_memory_budget_used_bytes", budget="body") == 0
    assert metric(text, "vitserve_memory_budget_used_bytes", budget="decode") == 0
    assert triton.infer(MODEL, [_image_input(digits["pngs"][:1])], headers=AUTH).as_numpy("logits").shape == (1, 10)


@in_child
def test_an_empty_infer_request_is_invalid_argument(server):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(service_pb2.ModelInferRequest(), metadata=list(AUTH.items()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "model_name" in caught.value.details()
    assert not dict(caught.value.trailing_metadata() or ()).get("retry-after")  # a mistake: nothing to retry


@in_child
def test_metrics_count_grpc_calls(server, digits):
    triton = connect(server)

    def scrape() -> str:
        return httpx.get(f"{server.url}/metrics").text

    before = scrape()
    for png in digits["pngs"][:3]:
        triton.infer(MODEL, [_image_input([png])], headers=AUTH)
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("nv_inference_request_success_total", model=MODEL, version="1") == 3
    assert grew("nv_inference_count_total", model=MODEL, version="1") == 3
    assert grew("vitserve_grpc_requests_total", method="ModelInfer", code="OK") == 3
    assert grew("vitserve_http_requests_total", route="/v2/models/{name}/infer", method="POST", status="200") == 0


@in_child
def test_two_workers_serve_grpc_and_drain_on_sigterm(tmp_path, digits):
    import tritonclient.grpc as grpcclient

    srv = GrpcServer(tmp_path / "server.log", VITSERVE_WORKERS="2", VITSERVE_DRAIN_DELAY_S="2").wait_ready()
    try:
        import tritonclient.grpc.aio as aioclient

        async def one(png: bytes) -> np.ndarray:  # a channel each: the kernel spreads them over both workers
            async with aioclient.InferenceServerClient(srv.grpc_url) as client:
                return (await client.infer(MODEL, [_image_input([png])], headers=AUTH)).as_numpy("logits")[0]

        async def run() -> list[np.ndarray]:
            return list(await asyncio.gather(*(one(png) for png in digits["pngs"])))

        np.testing.assert_allclose(np.stack(asyncio.run(run())), digits["logits"], atol=1e-5)
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "vitserve_grpc_requests_total", method="ModelInfer", code="OK") == len(digits["pngs"])

        with grpcclient.InferenceServerClient(srv.grpc_url) as client:
            srv.process.send_signal(signal.SIGTERM)
            wait_until(lambda: not client.is_server_ready(), "gRPC readiness turns off on SIGTERM")
            # Still served while draining (VITSERVE_DRAIN_DELAY_S), then stopped with the workers.
            client.infer(MODEL, [_image_input(digits["pngs"][:1])], headers=AUTH)
        assert srv.process.wait(timeout=60) == 0
    finally:
        if srv.process.poll() is None:
            srv.stop()
