"""`POST /v1/attention/batch` on a running server: one map per image, in order, each the one-image route's map;
a bad image is its own error entry; a bad layer, a missing field or too many files fail the request with a 4xx."""

from __future__ import annotations

import numpy as np
import pytest

from tests.service.conftest import post_image

pytestmark = pytest.mark.server


def files(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]


def single_map(client, png: bytes, path: str = "/v1/attention", **params) -> dict:
    response = post_image(client, path, png, params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    "params", [{}, {"method": "cls", "head_fusion": "max"}, {"method": "layer", "layer": -1, "head": 2}], ids=str
)
def test_batch_maps_match_the_single_route_in_order_with_a_bad_file_in_place(client, held_out_pngs, params):
    pngs = [held_out_pngs[i] for i in (0, 7, 13)]
    upload = files(pngs)
    upload.insert(1, ("files", ("notes.txt", b"not an image at all", "text/plain")))
    response = client.post("/v1/attention/batch", files=upload, params={**params, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["method"] == params.get("method", "rollout") and body["grid"] == {"height": 8, "width": 8}
    assert body["params"]["layer"] == params.get("layer") and body["params"]["head"] == params.get("head")
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["0.png", "notes.txt", "1.png", "2.png"]
    bad = results[1]
    assert bad["error"]["code"] == "bad_image" and bad["map"] is None and bad["predictions"] is None
    for item, png in zip([results[0], *results[2:]], pngs, strict=True):
        one = single_map(client, png, **params, top_k=3)
        assert item["error"] is None and len(item["predictions"]) == 3
        np.testing.assert_allclose(np.asarray(item["map"]), np.asarray(one["map"]), atol=1e-4)
        assert [p["label"] for p in item["predictions"]] == [p["label"] for p in one["predictions"]]
    assert body["timings"]["inference_ms"] > 0 and body["timings"]["batch_size"] >= 1


def test_batch_on_a_named_model(client, held_out_pngs):
    response = client.post("/v1/models/digits-vit-int8/attention/batch", files=files(held_out_pngs[:2]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "digits-vit-int8"
    assert [np.asarray(r["map"]).shape for r in body["results"]] == [(8, 8), (8, 8)]


@pytest.mark.parametrize(
    ("params", "status", "code", "says"),
    [
        ({"method": "layer", "layer": 99}, 404, "not_found", "layer 99 does not exist"),
        ({"method": "layer"}, 422, "invalid_parameter", "needs a layer index"),
        ({"method": "cls", "discard_ratio": 0.5}, 422, "invalid_parameter", "discard_ratio applies"),
        ({"format": "png"}, 200, None, None),  # not a parameter of the batch route: ignored like any unknown one
    ],
)
def test_bad_parameters_fail_the_request(client, held_out_pngs, params, status, code, says):
    response = client.post("/v1/attention/batch", files=files(held_out_pngs[:2]), params=params)
    assert response.status_code == status, response.text
    if code is not None:
        error = response.json()["error"]
        assert error["code"] == code and says in error["message"]
    else:
        assert response.headers["content-type"] == "application/json"


def test_request_level_errors_are_4xx_with_json(client, held_out_pngs):
    unknown = client.post("/v1/models/no-such-model/attention/batch", files=files(held_out_pngs[:1]))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_field = client.post("/v1/attention/batch", files=[("file", ("a.png", held_out_pngs[0], "image/png"))])
    assert wrong_field.status_code == 400 and wrong_field.json()["error"]["code"] == "bad_request"
    too_many = client.post("/v1/attention/batch", files=files([held_out_pngs[0]] * 33))  # VITSERVE_MAX_BATCH_FILES 32
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "payload_too_large"
