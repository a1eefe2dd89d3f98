"""Prometheus metrics exist, in Triton's names, and move with traffic."""

from __future__ import annotations

import httpx

from tests.conftest import metric


def test_metrics_move_with_traffic(client, held_out_pngs):
    before = client.get("/metrics").text
    for data in held_out_pngs[:3]:
        assert client.post("/v1/classify", content=data, headers={"content-type": "image/png"}).status_code == 200
    assert (
        client.post("/v1/classify", content=b"not an image", headers={"content-type": "image/png"}).status_code == 400
    )
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text
    model = {"model": "digits-vit", "version": "1"}
    assert (
        metric(after, "nv_inference_request_success_total", **model)
        >= metric(before, "nv_inference_request_success_total", **model) + 3
    )
    assert (
        metric(after, "nv_inference_request_failure_total", **model)
        >= metric(before, "nv_inference_request_failure_total", **model) + 1
    )
    assert metric(after, "nv_inference_count_total", **model) >= metric(before, "nv_inference_count_total", **model) + 3
    assert metric(after, "nv_inference_exec_count_total", **model) > 0
    assert metric(after, "nv_inference_compute_infer_duration_us_total", **model) > 0
    assert metric(after, "vitserve_http_requests_total", route="/v1/classify", method="POST", status="200") >= 3
    assert metric(after, "vitserve_http_requests_total", route="/v1/classify", method="POST", status="400") >= 1
    assert metric(after, "vitserve_batch_size_count", model="digits-vit") >= 3
    assert metric(after, "vitserve_model_load_seconds", **model) > 0
    for name in (
        "vitserve_queue_depth",
        "vitserve_requests_in_flight",
        "vitserve_queue_duration_seconds_bucket",
        "vitserve_runtime_duration_seconds_bucket",
        "vitserve_http_request_duration_seconds_bucket",
    ):
        assert name in after


def test_unknown_routes_do_not_create_label_values(client):
    httpx.get(f"{client.base_url}/no/such/path/12345")
    assert "/no/such/path" not in client.get("/metrics").text


def test_a_route_with_a_model_name_is_counted_by_its_template(client, held_out_pngs):
    client.post("/v1/models/digits-vit-int8/classify", content=held_out_pngs[0], headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert 'route="/v1/models/{name}/classify"' in text
    assert 'route="/v1/models/digits-vit-int8/classify"' not in text  # a label value per name would be unbounded
    assert metric(text, "nv_inference_request_success_total", model="digits-vit-int8", version="1") >= 1
