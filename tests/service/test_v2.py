"""Open Inference Protocol (V2) through the real Triton and KServe Python clients, unmodified."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from model_export.digits import held_out_set
from tests.conftest import DEFAULT_MODEL
from tests.service.conftest import in_child
from vit_artifact.metadata import read_metadata
from vit_artifact.preprocessing import preprocess_batch

MODEL = "digits-vit"
BINARY_HEADER = (
    b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32",'
    b' "parameters": {"binary_data_size": 12288}}]}'
)


@pytest.fixture(scope="module")
def digits():
    held = held_out_set()
    images = [Image.fromarray(c).convert("RGB") for c in held.images[:6]]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    meta = read_metadata(DEFAULT_MODEL)
    pixels = preprocess_batch(images, meta.preprocessing)
    sess = ort.InferenceSession(str(DEFAULT_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"pixel_values": pixels})
    return {"pngs": pngs, "pixels": pixels, "logits": logits, "labels": held.labels[:6], "boxes": held.boxes[:6]}


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url=server.url.removeprefix("http://")) as client:
        yield client


def test_triton_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert triton.get_server_metadata()["name"] == "vitserve"
    meta = triton.get_model_metadata(MODEL)
    assert meta["inputs"][0] == {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    assert {o["name"] for o in meta["outputs"]} >= {"logits", "probabilities", "attention_rollout"}
    assert triton.is_model_ready(MODEL, model_version="1")
    assert not triton.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [True, False])
def test_triton_fp32_pixels(triton, digits, binary):
    import tritonclient.http as httpclient

    x = digits["pixels"]
    tensor = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("logits", binary_data=binary),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = triton.infer(MODEL, [tensor], outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("logits"), digits["logits"], atol=1e-5)
    probs = result.as_numpy("probabilities")
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == digits["logits"].argmax(1)).all()


def test_triton_encoded_images_with_classification_and_attention(triton, digits):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("image", [len(digits["pngs"])], "BYTES")
    tensor.set_data_from_numpy(np.array(digits["pngs"], dtype=np.object_), binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput("logits", binary_data=True, class_count=3),
        httpclient.InferRequestedOutput("attention_rollout", binary_data=True),
    ]
    result = triton.infer(MODEL, [tensor], outputs=outputs)
    top = result.as_numpy("logits")  # classification extension: "score:index:label"
    assert top.shape == (6, 3)
    predicted = [int(row[0].decode().split(":")[1]) for row in top]
    assert predicted == digits["logits"].argmax(1).tolist()
    assert top[0, 0].decode().split(":")[2] == str(predicted[0])  # labels are the digits
    maps = result.as_numpy("attention_rollout")
    assert maps.shape == (6, 8, 8) and np.isclose(maps.max(axis=(1, 2)), 1.0).all()


def test_triton_json_images_are_base64(triton, digits):
    import tritonclient.http as httpclient

    encoded = np.array([base64.b64encode(p).decode() for p in digits["pngs"][:2]], dtype=np.object_)
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(encoded, binary_data=False)
    result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)])
    np.testing.assert_allclose(result.as_numpy("logits"), digits["logits"][:2], atol=1e-5)


def test_triton_errors_are_v2_errors(triton, digits):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    wrong = np.zeros((1, 3, 16, 16), np.float32)
    tensor = httpclient.InferInput("pixel_values", list(wrong.shape), "FP32")
    tensor.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException, match=r"shape \[1, 3, 16, 16\]"):
        triton.infer(MODEL, [tensor])
    with pytest.raises(InferenceServerException, match="not loaded"):
        triton.infer("no-such-model", [tensor])


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "not valid JSON"),
        (
            b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP64", "data": [0]}]}',
            {},
            "must be FP32",
        ),
        (
            b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0, 1]}]}',
            {},
            "needs 3072 values",
        ),
        (BINARY_HEADER + b"\0" * 100, {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, "binary_data_size"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}', {}, "base64"),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}',
            {},
            "could not decode the image",
        ),
        (b'{"inputs": [{"name": "mystery", "shape": [1], "datatype": "FP32", "data": [1]}]}', {}, "unknown input"),
        (
            b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": '
            + str([0.0] * 3072).encode()
            + b'}], "outputs": [{"name": "nope"}]}',
            {},
            "unknown output",
        ),
    ],
)
def test_bad_v2_requests_get_400_with_a_message(server, body, headers, message):
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200  # still serving


@in_child  # kserve defines inference.* in protobuf's pool, as tritonclient.grpc does (tests/service/test_grpc.py)
def test_kserve_client(server, digits):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def run():  # type: ignore[no-untyped-def]
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            assert await client.is_server_live(server.url)
            assert await client.is_server_ready(server.url)
            assert await client.is_model_ready(server.url, MODEL)
            x = digits["pixels"][:3]
            tensor = InferInput("pixel_values", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            response = await client.infer(server.url, InferRequest(MODEL, infer_inputs=[tensor]), model_name=MODEL)
            outputs = {o.name: o.as_numpy() for o in response.outputs}
            json_tensor = InferInput("pixel_values", list(x.shape), "FP32")
            json_tensor.set_data_from_numpy(x, binary_data=False)
            json_response = await client.infer(
                server.url, InferRequest(MODEL, infer_inputs=[json_tensor]), model_name=MODEL
            )
            return outputs, {o.name: o.as_numpy() for o in json_response.outputs}
        finally:
            await client.close()

    binary_out, json_out = asyncio.run(run())
    for out in (binary_out, json_out):
        np.testing.assert_allclose(np.asarray(out["logits"]).reshape(3, -1), digits["logits"][:3], atol=1e-5)
        assert np.asarray(out["probabilities"]).shape == (3, 10)


def test_server_metadata_lists_exactly_the_extensions_served(server):
    from service.settings import Settings
    from service.v2.core import extensions

    assert httpx.get(f"{server.url}/v2").json()["extensions"] == ["classification", "binary_tensor_data", "statistics"]
    everything = Settings(admin_keys=["admin"], system_shared_memory=True)
    assert extensions(everything) == [
        "classification",
        "binary_tensor_data",
        "statistics",
        "model_repository",
        "system_shared_memory",
    ]
