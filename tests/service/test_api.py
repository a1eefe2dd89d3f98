"""The REST API of a running server: health, model facts, classification, batches, attention maps, OpenAPI.

Every test talks HTTP to a real `python -m service` on the committed model repository. Correctness is checked
against onnxruntime run directly on the same images, and against the held-out digit canvases' labels and boxes.
"""

from __future__ import annotations

import importlib
import io
import json
import pkgutil
import re
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.routing import APIRoute
from PIL import Image

import service.api
from model_export import digits
from tests.conftest import DEFAULT_MODEL, MODELS
from tests.service.conftest import (
    assert_same_probabilities,
    canvas_image,
    classify,
    encode,
    post_image,
    probabilities,
    top_label,
)
from vit_artifact.attention import attention_map
from vit_artifact.metadata import ATTENTIONS, INPUT_NAME, LOGITS, METADATA_FILE, Parity, Preprocessing, read_metadata
from vit_artifact.preprocessing import preprocess

SERVED = sorted(p.name for p in MODELS.iterdir() if (p / METADATA_FILE).is_file())


def artifact_record(name: str) -> dict[str, Any]:
    return json.loads((MODELS / name / METADATA_FILE).read_text())


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def direct() -> dict[str, Any]:
    """The default artifact run straight through onnxruntime, as the service should run it."""
    meta = read_metadata(DEFAULT_MODEL)
    return {
        "meta": meta,
        "classify": ort.InferenceSession(str(DEFAULT_MODEL / "model.onnx"), providers=["CPUExecutionProvider"]),
        "attention": ort.InferenceSession(str(DEFAULT_MODEL / "attention.onnx"), providers=["CPUExecutionProvider"]),
    }


def direct_input(png: bytes, direct: dict[str, Any]) -> np.ndarray:
    """The same PNG bytes, decoded by Pillow and preprocessed with the artifact's record: (1, 3, H, W)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return preprocess(image, direct["meta"].preprocessing)[None]


# --- health and model facts ---------------------------------------------------------------------------------


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_lists_every_model_as_ready(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["models"] == dict.fromkeys(SERVED, True)


def test_models_lists_every_artifact_with_its_recorded_facts(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "digits-vit"
    assert [m["name"] for m in body["models"]] == SERVED
    for info in body["models"]:
        record = artifact_record(info["name"])
        assert info["default"] is (info["name"] == "digits-vit")
        assert info["provider"] == "CPUExecutionProvider"
        assert info["grid"] == {"height": 8, "width": 8}
        assert (info["layers"], info["heads"]) == (record["num_layers"], record["num_heads"]) == (4, 4)
        assert info["labels"] == record["labels"] and info["labels_count"] == 10
        assert info["precision"] == record["precision"]
        # As the service reads the record: a record from before `crop_offset` gets the rule its resize implied.
        assert info["preprocessing"] == Preprocessing.model_validate(record["preprocessing"]).model_dump(mode="json")
        assert info["parity"] == Parity.model_validate(record["parity"]).model_dump(mode="json")
        assert info["parity"]["passed"] is True
        assert info["attention"] is True


@pytest.mark.parametrize("name", SERVED)
def test_model_by_name_is_its_entry_in_the_list(client, name):
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    response = client.get(f"/v1/models/{name}")
    assert response.status_code == 200
    assert response.json() == listed[name]


# --- classification -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/models/digits-vit/classify"])
@pytest.mark.parametrize("upload", ["multipart", "raw"])
def test_classify_accepts_multipart_and_raw_bodies(client, held_out_pngs, direct, path, upload):
    png = held_out_pngs[0]
    if upload == "multipart":
        response = client.post(path, files={"file": ("canvas.png", png, "image/png")}, params={"top_k": 10})
    else:
        response = post_image(client, path, png, params={"top_k": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("digits-vit", "1")
    (logits,) = direct["classify"].run([LOGITS], {INPUT_NAME: direct_input(png, direct)})
    expected = softmax(logits[0])
    got = probabilities(body)
    assert max(abs(got[str(i)] - expected[i]) for i in range(10)) <= 1e-5


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_is_respected_and_sorted(client, held_out_pngs, k):
    body = classify(client, held_out_pngs[1], top_k=k)
    probs = [p["probability"] for p in body["predictions"]]
    assert len(probs) == k
    assert probs == sorted(probs, reverse=True)
    assert len({p["label"] for p in body["predictions"]}) == k


def test_top_k_above_the_label_count_returns_every_label(client, held_out_pngs):
    assert len(classify(client, held_out_pngs[1], top_k=50)["predictions"]) == 10


def test_probabilities_over_all_classes_sum_to_one(client, held_out_pngs):
    for png in held_out_pngs[:5]:
        body = classify(client, png, top_k=10)
        assert {p["index"] for p in body["predictions"]} == set(range(10))
        assert sum(probabilities(body).values()) == pytest.approx(1.0, abs=1e-6)
        assert all(p["label"] == str(p["index"]) for p in body["predictions"])


def test_request_id_in_body_equals_header(client, held_out_pngs):
    first = post_image(client, "/v1/classify", held_out_pngs[0])
    second = post_image(client, "/v1/classify", held_out_pngs[0])
    for response in (first, second):
        assert response.status_code == 200
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
        assert response.json()["request_id"] == response.headers["x-request-id"]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_client_request_id_is_echoed_and_an_unsafe_one_replaced(client, held_out_pngs):
    sent = post_image(client, "/v1/classify", held_out_pngs[0], headers={"x-request-id": "trace-42.a_b"})
    assert sent.headers["x-request-id"] == "trace-42.a_b" == sent.json()["request_id"]
    unsafe = post_image(client, "/v1/classify", held_out_pngs[0], headers={"x-request-id": "a b<script>"})
    assert unsafe.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/healthz", None),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
        ("GET", "/", None),  # the demo page and its files
        ("GET", "/static/app.js", None),
        ("GET", "/v2/health/ready", None),
        ("GET", "/v1/models/none-such", None),  # 404, an unknown model
        ("GET", "/no-such-route", None),  # 404, no route
        ("DELETE", "/v1/models", None),  # 405
        ("POST", "/v1/classify", b"not an image"),  # a client mistake
        ("POST", "/v2/models/digits-vit/infer", b"{not json"),  # the same, in the V2 protocol
    ],
)
def test_security_headers_on_every_kind_of_response(client, method, path, body):
    response = client.request(method, path, content=body)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-request-id"]


def test_timings_are_reported(client, held_out_pngs):
    timings = classify(client, held_out_pngs[0])["timings"]
    assert {"decode_ms", "preprocess_ms", "inference_ms", "total_ms"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert timings["inference_ms"] > 0
    assert timings["total_ms"] >= timings["inference_ms"]


def test_held_out_canvases_match_onnxruntime_and_are_mostly_correct(client, held_out, held_out_pngs, direct):
    correct = 0
    for png, label in zip(held_out_pngs, held_out.labels, strict=True):
        body = classify(client, png)
        (logits,) = direct["classify"].run([LOGITS], {INPUT_NAME: direct_input(png, direct)})
        expected = softmax(logits[0])
        got = probabilities(body)
        assert max(abs(got[str(i)] - expected[i]) for i in range(10)) <= 1e-5
        correct += top_label(body) == str(label)
    assert correct >= 27, f"{correct}/{len(held_out_pngs)} held-out canvases classified correctly"


# --- batches ------------------------------------------------------------------------------------------------


def test_batch_keeps_order_and_reports_a_bad_file_in_place(client, held_out_pngs):
    files = [
        ("files", ("a.png", held_out_pngs[0], "image/png")),
        ("files", ("notes.txt", b"not an image at all", "text/plain")),
        ("files", ("b.png", held_out_pngs[10], "image/png")),
        ("files", ("c.png", held_out_pngs[20], "image/png")),
    ]
    response = client.post("/v1/classify/batch", files=files, params={"top_k": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["a.png", "notes.txt", "b.png", "c.png"]
    bad = results[1]
    assert bad["predictions"] is None and bad["error"]["code"] == "bad_image" and bad["error"]["message"]
    for item, png in zip([results[0], results[2], results[3]], [held_out_pngs[i] for i in (0, 10, 20)], strict=True):
        assert item["error"] is None
        assert_same_probabilities(item, classify(client, png), atol=1e-5)


def test_batch_on_a_named_model(client, held_out_pngs):
    files = [("files", (f"{i}.png", held_out_pngs[i], "image/png")) for i in range(3)]
    response = client.post("/v1/models/digits-vit-int8/classify/batch", files=files, params={"top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "digits-vit-int8"
    assert [len(r["predictions"]) for r in body["results"]] == [2, 2, 2]


# --- attention maps -----------------------------------------------------------------------------------------

ATTENTION_PARAMS = [
    {},
    {"method": "rollout", "head_fusion": "max"},
    {"method": "rollout", "head_fusion": "min"},
    {"method": "rollout", "discard_ratio": 0.5},
    {"method": "cls"},
    {"method": "cls", "head_fusion": "max"},
    {"method": "layer", "layer": 1},
    {"method": "layer", "layer": -1, "head": 2},
    {"method": "layer", "layer": 0, "head_fusion": "min"},
]


@pytest.mark.parametrize(
    "params", ATTENTION_PARAMS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "default"
)
def test_attention_map_matches_the_attention_graph(client, held_out_pngs, direct, params):
    png = held_out_pngs[3]
    response = post_image(client, "/v1/attention", png, params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["method"] == params.get("method", "rollout")
    assert body["grid"] == {"height": 8, "width": 8}
    heatmap = np.asarray(body["map"])
    assert heatmap.shape == (8, 8)
    assert heatmap.min() >= 0.0 and heatmap.max() == 1.0
    meta = direct["meta"]
    _, attentions = direct["attention"].run([LOGITS, ATTENTIONS], {INPUT_NAME: direct_input(png, direct)})
    options = {k: v for k, v in params.items() if k != "method"}
    expected = attention_map(
        attentions[0],
        method=params.get("method", "rollout"),
        num_prefix_tokens=meta.num_prefix_tokens,
        grid=meta.grid,
        **options,
    )
    np.testing.assert_allclose(heatmap, expected, atol=1e-4)
    assert body["predictions"] and body["timings"]["inference_ms"] > 0


def test_negative_layer_counts_from_the_end(client, held_out_pngs):
    def heatmap(layer: int) -> list[list[float]]:
        params = {"method": "layer", "layer": layer, "head": 1}
        response = post_image(client, "/v1/attention", held_out_pngs[4], params=params)
        assert response.status_code == 200, response.text
        return response.json()["map"]

    assert heatmap(-1) == heatmap(3)
    assert heatmap(-1) != heatmap(0)


def test_rollout_points_at_the_digit(client, held_out, held_out_pngs):
    maps = []
    for png in held_out_pngs:
        response = post_image(client, "/v1/attention", png, params={"method": "rollout"})
        assert response.status_code == 200, response.text
        maps.append(response.json()["map"])
    hits = digits.pointing_hits(np.asarray(maps), held_out.boxes, image_size=32)
    assert hits.mean() >= 0.9, f"rollout points at the digit in {hits.sum()}/{len(hits)} canvases"


def test_attention_png_overlay(client, held_out_pngs):
    def overlay(alpha: float) -> np.ndarray:
        response = post_image(client, "/v1/attention", held_out_pngs[5], params={"format": "png", "alpha": alpha})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-request-id"]
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG"
        assert image.width > 32 and image.height > 32
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    faint, strong = overlay(0.0), overlay(1.0)
    assert faint.shape == strong.shape
    assert np.abs(faint - strong).max() > 50


def test_int8_model_classifies_and_explains(client, held_out, held_out_pngs):
    correct = 0
    for png, label in zip(held_out_pngs, held_out.labels, strict=True):
        body = classify(client, png, path="/v1/models/digits-vit-int8/classify")
        assert body["model"] == "digits-vit-int8"
        correct += top_label(body) == str(label)
    assert correct >= 27, f"INT8: {correct}/{len(held_out_pngs)} held-out canvases classified correctly"
    response = post_image(client, "/v1/models/digits-vit-int8/attention", held_out_pngs[0])
    assert response.status_code == 200, response.text
    assert np.asarray(response.json()["map"]).shape == (8, 8)


def test_enlarged_canvas_is_classified_like_the_original(client, held_out_pngs, held_out):
    # The artifact's preprocessing (read from artifact.json) resizes any size down to the model's 32x32.
    small = classify(client, held_out_pngs[6])
    large = classify(client, encode(canvas_image(held_out.images[6], scale=8)))
    assert top_label(large) == top_label(small)


# --- OpenAPI ------------------------------------------------------------------------------------------------

OPERATIONS = {
    ("GET", "/healthz"): "healthz",
    ("GET", "/readyz"): "readyz",
    ("GET", "/v1/models"): "list_models",
    ("GET", "/v1/models/{name}"): "get_model",
    ("POST", "/v1/classify"): "classify_default",
    ("POST", "/v1/models/{name}/classify"): "classify",
    ("POST", "/v1/classify/batch"): "classify_batch_default",
    ("POST", "/v1/models/{name}/classify/batch"): "classify_batch",
    ("POST", "/v1/attention"): "attention_default",
    ("POST", "/v1/models/{name}/attention"): "attention",
    ("POST", "/v1/attention/batch"): "attention_batch_default",
    ("POST", "/v1/models/{name}/attention/batch"): "attention_batch",
}


def declared_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the modules in service/api declare."""
    found = set()
    for module in pkgutil.iter_modules(service.api.__path__):
        router = getattr(importlib.import_module(f"service.api.{module.name}"), "router", None)
        for route in getattr(router, "routes", []):
            if isinstance(route, APIRoute) and route.include_in_schema:
                found |= {(method, route.path) for method in route.methods or ()}
    return found


def test_openapi_documents_every_route(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    documented = {
        (method.upper(), path): operation["operationId"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert documented.items() >= OPERATIONS.items()
    assert all(documented.values()) and len(set(documented.values())) == len(documented)
    assert set(documented) == declared_routes()


@pytest.mark.parametrize("path", [p for (m, p) in OPERATIONS if m == "POST"])
def test_openapi_documents_the_request_bodies(client, path):
    operation = client.get("/openapi.json").json()["paths"][path]["post"]
    content = operation["requestBody"]["content"]
    assert operation["requestBody"]["required"] is True
    if path.endswith("/batch"):
        assert set(content) == {"multipart/form-data"}
        assert content["multipart/form-data"]["schema"]["required"] == ["files"]
    else:
        assert set(content) == {"multipart/form-data", "image/*"}
        assert content["multipart/form-data"]["schema"]["required"] == ["file"]
    parameters = {p["name"] for p in operation.get("parameters", [])}
    assert "top_k" in parameters
    assert {"400", "404", "413", "415", "422"} <= set(operation["responses"])
