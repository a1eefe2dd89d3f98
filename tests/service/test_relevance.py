"""Relevance maps through real servers: parity with PyTorch autograd for a random-init Hugging Face ViT, a
random-init timm ViT and the default model; the 422s; V2 over REST and gRPC; one process and two workers."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model_export.digits import held_out_set
from tests.conftest import DEFAULT_MODEL, MODELS, Server, free_port
from tests.relevance_reference import autograd_relevance, hf_forward, normalised, own_forward, timm_forward
from tests.service.conftest import in_child
from vit_artifact.metadata import read_metadata
from vit_artifact.preprocessing import preprocess_batch

PARITY = 1e-4  # max |difference| of the served, normalised map from autograd's


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(framework_models, tmp_path_factory) -> Path:
    """hf-vit, timm-vit, the default model, its INT8 variant, and the default model as exported before
    relevance graphs (digits-old)."""
    root = tmp_path_factory.mktemp("relevance-models")
    for name in ("hf-vit", "timm-vit"):
        shutil.copytree(framework_models[name].artifact, root / name)
    for name in ("digits-vit", "digits-vit-int8"):
        shutil.copytree(MODELS / name, root / name)
    old = root / "digits-old"
    shutil.copytree(DEFAULT_MODEL, old)
    record = json.loads((old / "artifact.json").read_text())
    del record["graphs"]["relevance"]
    record["name"] = "digits-old"
    (old / "artifact.json").write_text(json.dumps(record))
    (old / "relevance.onnx").unlink()
    return root


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    grpc_port = free_port()
    srv = Server(
        model_dir,
        tmp_path_factory.mktemp("relevance") / "server.log",
        VITSERVE_DEFAULT_MODEL="digits-vit",
        VITSERVE_GRPC_PORT=str(grpc_port),
        VITSERVE_MAX_QUEUE_DELAY_MS="100",
    )
    srv.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    yield srv.wait_ready()
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def workers(model_dir, tmp_path_factory):
    srv = Server(
        model_dir,
        tmp_path_factory.mktemp("relevance-workers") / "server.log",
        VITSERVE_DEFAULT_MODEL="digits-vit",
        VITSERVE_WORKERS="2",
        VITSERVE_MAX_QUEUE_DELAY_MS="100",
    ).wait_ready()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def digit_images() -> list[Image.Image]:
    held = held_out_set()
    pick = np.linspace(0, len(held.labels) - 1, 4).round().astype(int)
    return [Image.fromarray(c).convert("RGB") for c in held.images[pick]]


def relevance(url: str, model: str, data: bytes, target: int | str | None = None) -> dict:
    params = {"method": "relevance", **({} if target is None else {"target": target})}
    r = httpx.post(f"{url}/v1/models/{model}/attention", params=params, files={"file": ("x.png", data)}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _forward(name: str, framework_models):
    if name == "hf-vit":
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(
            framework_models[name].source, attn_implementation="eager"
        ).eval()
        return hf_forward(model)
    if name == "timm-vit":
        from model_export.from_timm import load_timm
        from tests.frameworks import TIMM_KWARGS

        src = load_timm("vit_tiny_patch16_224", checkpoint=str(framework_models[name].source), model_kwargs=TIMM_KWARGS)
        return timm_forward(src.model)
    from model_export.from_artifact import load_own_from_artifact

    return own_forward(load_own_from_artifact(DEFAULT_MODEL).model.model)


@pytest.mark.parametrize("name", ["hf-vit", "timm-vit", "digits-vit"])
def test_served_maps_match_pytorch_autograd(server, model_dir, framework_models, photos, digit_images, name):
    images = digit_images if name == "digits-vit" else list(photos.values())[:4]
    meta = read_metadata(model_dir / name)
    pixels = preprocess_batch(images, meta.preprocessing)  # the service's own preprocessing
    forward = _forward(name, framework_models)
    worst = 0.0
    for target in (None, 0, 2, len(meta.labels) - 1):
        want, classes = autograd_relevance(
            forward, pixels, [target] * len(images), num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid
        )
        for image, expected, cls in zip(images, normalised(want), classes, strict=True):
            body = relevance(server.url, name, png(image), target)
            assert body["target"]["index"] == cls and body["target"]["label"] == meta.labels[cls]
            worst = max(worst, float(np.abs(np.asarray(body["map"]) - expected).max()))
    print(f"relevance parity {name}: max |served - autograd| on the normalised map {worst:.2e}")
    assert worst <= PARITY


def test_maps_differ_by_class_and_a_label_names_its_class(server, digit_images):
    data = png(digit_images[1])
    top = relevance(server.url, "digits-vit", data)
    by_label = relevance(server.url, "digits-vit", data, top["predictions"][0]["label"])
    assert by_label["map"] == top["map"] and top["target"] == top["predictions"][0] | {
        "probability": top["target"]["probability"]
    }
    other = relevance(server.url, "digits-vit", data, (top["target"]["index"] + 1) % 10)
    assert np.abs(np.asarray(other["map"]) - np.asarray(top["map"])).max() > 0.1


def test_concurrent_requests_with_other_targets_batch_and_answer_as_alone(server, digit_images):
    data = png(digit_images[2])
    alone = [relevance(server.url, "digits-vit", data, t)["map"] for t in range(10)]
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(lambda t: relevance(server.url, "digits-vit", data, t), range(10)))
    assert max(b["timings"]["batch_size"] for b in together) > 1  # coalesced into shared runtime calls
    for body, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(np.asarray(body["map"]), np.asarray(want), atol=1e-4)


def test_png_overlay_and_batch_route(server, digit_images):
    data = png(digit_images[0])
    r = httpx.post(
        f"{server.url}/v1/attention",
        params={"method": "relevance", "target": 3, "format": "png"},
        files={"file": ("x.png", data)},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size[0] > 100
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(digit_images)]
    r = httpx.post(f"{server.url}/v1/attention/batch", params={"method": "relevance", "target": 3}, files=files)
    assert r.status_code == 200, r.text
    for item, image in zip(r.json()["results"], digit_images, strict=True):
        assert item["target"]["index"] == 3
        one = relevance(server.url, "digits-vit", png(image), 3)
        np.testing.assert_allclose(np.asarray(item["map"]), np.asarray(one["map"]), atol=1e-4)


@pytest.mark.parametrize(
    ("model", "params", "says"),
    [
        ("digits-old", {"method": "relevance"}, "re-export"),
        ("digits-vit-int8", {"method": "relevance"}, "FP32 artifacts only"),
        ("digits-vit", {"method": "relevance", "target": "10"}, "class index 0-9"),
        ("digits-vit", {"method": "relevance", "target": "seven"}, "one of the model's labels"),
        ("digits-vit", {"method": "relevance", "layer": 1}, "does not apply to method 'relevance'"),
        ("digits-vit", {"method": "rollout", "target": 3}, "applies to method 'relevance'"),
    ],
)
def test_what_cannot_be_answered_is_a_422_that_says_why(server, digit_images, model, params, says):
    r = httpx.post(
        f"{server.url}/v1/models/{model}/attention", params=params, files={"file": ("x.png", png(digit_images[0]))}
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_parameter" and says in error["message"]
    if "target" in params and params["method"] == "relevance":
        assert error["detail"]["max_index"] == 9 and error["detail"]["labels"] == [str(d) for d in range(10)]


def test_models_route_says_which_models_have_relevance(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert {n: m["relevance"] for n, m in models.items()} == {
        "digits-old": False,
        "digits-vit": True,
        "digits-vit-int8": False,
        "hf-vit": True,
        "timm-vit": True,
    }


def test_v2_rest_output_with_request_and_per_image_targets(server, digit_images):
    import base64

    pngs = [png(im) for im in digit_images[:2]]
    inputs = [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(p).decode() for p in pngs]}
    ]
    for parameters, targets in [({"target": 3}, [3, 3]), ({"target": [5, "7"]}, [5, 7])]:
        body = {
            "inputs": inputs,
            "outputs": [{"name": "attention_relevance"}, {"name": "attention_rollout"}],
            "parameters": parameters,
        }
        r = httpx.post(f"{server.url}/v2/models/digits-vit/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        assert outputs["attention_relevance"]["shape"] == [2, 8, 8] and outputs["attention_rollout"]["shape"] == [
            2,
            8,
            8,
        ]
        maps = np.asarray(outputs["attention_relevance"]["data"]).reshape(2, 8, 8)
        for m, data, t in zip(maps, pngs, targets, strict=True):
            np.testing.assert_allclose(m, np.asarray(relevance(server.url, "digits-vit", data, t)["map"]), atol=1e-4)
    bad = {"inputs": inputs, "outputs": [{"name": "attention_relevance", "parameters": {"target": 12}}]}
    r = httpx.post(f"{server.url}/v2/models/digits-vit/infer", json=bad, timeout=60)
    assert r.status_code == 422 and "0-9" in r.json()["error"]


@in_child
def test_v2_grpc_output(server, digit_images):
    import tritonclient.grpc as grpcclient

    data = png(digit_images[3])
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    triton = grpcclient.InferenceServerClient(server.grpc_url)
    result = triton.infer(
        "digits-vit",
        [tensor],
        outputs=[grpcclient.InferRequestedOutput("attention_relevance")],
        parameters={"target": 6},
    )
    maps = result.as_numpy("attention_relevance")
    assert maps.shape == (1, 8, 8)
    np.testing.assert_allclose(maps[0], np.asarray(relevance(server.url, "digits-vit", data, 6)["map"]), atol=1e-4)


def test_two_workers_carry_each_image_its_own_target(workers, server, digit_images):
    data = png(digit_images[1])
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(lambda t: relevance(workers.url, "digits-vit", data, t), range(10)))
    assert max(b["timings"]["batch_size"] for b in together) > 1
    for t, body in enumerate(together):
        assert body["target"]["index"] == t
        want = relevance(server.url, "digits-vit", data, t)["map"]
        np.testing.assert_allclose(np.asarray(body["map"]), np.asarray(want), atol=1e-4)
    r = httpx.post(
        f"{workers.url}/v1/models/digits-old/attention", params={"method": "relevance"}, files={"file": ("x.png", data)}
    )
    assert r.status_code == 422 and "re-export" in r.json()["error"]["message"]
