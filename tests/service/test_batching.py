"""Dynamic batching: coalesced results equal per-image results, in order; a full queue answers 503 at once."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import MODELS, Server
from tests.service.conftest import encode


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    # A long queue delay makes coalescing certain: the first request waits for the others.
    srv = Server(
        MODELS,
        tmp_path_factory.mktemp("batching") / "server.log",
        VITSERVE_MAX_BATCH_SIZE="16",
        VITSERVE_MAX_QUEUE_DELAY_MS="300",
    )
    yield srv.wait_ready()
    srv.stop()


def _requests(held_out):  # type: ignore[no-untyped-def]
    """Mixed models, routes and image sizes: every request's expected result is computed one at a time."""
    out = []
    for i, canvas in enumerate(held_out.images[:12]):
        size = (32, 48, 97, 200)[i % 4]  # the server resizes each to the model's input
        data = encode(Image.fromarray(canvas).convert("RGB").resize((size, size)))
        model = ("digits-vit", "digits-vit-int8")[i % 2]
        route = "attention" if i % 3 == 0 else "classify"
        out.append((f"/v1/models/{model}/{route}", data))
    return out


async def _send_all(url: str, requests: list[tuple[str, bytes]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post(path, params={"top_k": 10}, content=data, headers={"content-type": "image/png"})
                for path, data in requests
            )
        )


def test_coalesced_batches_equal_one_at_a_time_results(batching_server, held_out):
    requests = _requests(held_out)
    with httpx.Client(base_url=batching_server.url, timeout=60) as client:
        alone = [
            client.post(p, params={"top_k": 10}, content=d, headers={"content-type": "image/png"}).json()
            for p, d in requests
        ]
    together = [r.json() for r in asyncio.run(_send_all(batching_server.url, requests))]
    assert max(r["timings"]["batch_size"] for r in together) > 1  # they really were coalesced
    assert all(r["timings"]["batch_size"] == 1 for r in alone)
    for (path, _), a, t in zip(requests, alone, together, strict=True):
        assert t["model"] == a["model"] == path.split("/")[3]
        pa = {p["label"]: p["probability"] for p in a["predictions"]}
        pt = {p["label"]: p["probability"] for p in t["predictions"]}
        # FP32: the same numbers. INT8 (dynamic quantization) picks one activation scale per tensor, i.e. per
        # batch, so a neighbour in the batch moves the result slightly; the prediction must not change.
        atol = 1e-5 if a["model"] == "digits-vit" else 5e-2
        assert max(abs(pa[k] - pt[k]) for k in pa) < atol, (path, a["model"])
        assert a["predictions"][0]["label"] == t["predictions"][0]["label"]
        if "map" in a:
            np.testing.assert_allclose(np.array(t["map"]), np.array(a["map"]), atol=1e-4 if atol < 1e-3 else 5e-2)


def test_full_queue_answers_503_with_retry_after(tmp_path, held_out):
    srv = Server(
        MODELS,
        tmp_path / "server.log",
        VITSERVE_MAX_BATCH_SIZE="1",
        VITSERVE_MAX_QUEUE_SIZE="1",
        VITSERVE_MAX_BATCH_FILES="1",
        VITSERVE_MAX_QUEUE_DELAY_MS="0",
    ).wait_ready()
    try:
        data = encode(Image.fromarray(held_out.images[0]).convert("RGB"))
        burst = [("/v1/models/digits-vit/attention", data)] * 64
        for _ in range(3):  # a burst of 64 on a queue of 1 overflows; retry in case the machine was idle
            responses = asyncio.run(_send_all(srv.url, burst))
            if any(r.status_code == 503 for r in responses):
                break
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "overloaded"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'vitserve_rejected_total{model="digits-vit"}' in metrics
        assert (
            httpx.post(f"{srv.url}/v1/classify", content=data, headers={"content-type": "image/png"}).status_code == 200
        )  # and it keeps serving
    finally:
        assert srv.stop() == 0


def test_batching_off_runs_one_image_per_call(tmp_path, held_out):
    srv = Server(MODELS, tmp_path / "server.log", VITSERVE_BATCHING="false").wait_ready()
    try:
        requests = [("/v1/classify", encode(Image.fromarray(c).convert("RGB"))) for c in held_out.images[:8]]
        assert {r.json()["timings"]["batch_size"] for r in asyncio.run(_send_all(srv.url, requests))} == {1}
    finally:
        srv.stop()
