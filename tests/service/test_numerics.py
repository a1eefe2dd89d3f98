"""Batch invariance through the HTTP service: an image's answer does not depend on who shares its batch.

The same held-out canvas is sent alone, then in batch requests of 2, 7 and 16 images with other canvases (at
different positions). The server coalesces a batch request's images into one runtime call (a long queue delay
makes that certain), so FP32 really runs at batch 2, 7 and 16, and the batch-size histogram in /metrics shows
it. Dynamic INT8 picks its activation scales from the whole batch, so the service runs it one image per call:
its answers are identical, and its histogram holds only batches of one.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODELS, Server
from tests.service.conftest import probabilities
from tests.service.test_metrics import metric

FP32, INT8 = "digits-vit", "digits-vit-int8"
SIZES = (2, 7, 16)
FP32_ATOL = 1e-6


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    srv = Server(
        MODELS,
        tmp_path_factory.mktemp("numerics") / "server.log",
        VITSERVE_BATCHING="true",
        VITSERVE_MAX_BATCH_SIZE="16",
        VITSERVE_MAX_QUEUE_DELAY_MS="500",
    )
    yield srv.wait_ready()
    srv.stop()


def _alone(client: httpx.Client, model: str, png: bytes) -> dict[str, float]:
    response = client.post(
        f"/v1/models/{model}/classify", params={"top_k": 10}, content=png, headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["timings"]["batch_size"] == 1
    return probabilities(response.json())


def _in_batch(client: httpx.Client, model: str, pngs: list[bytes], at: int) -> tuple[dict[str, float], int]:
    """Probabilities of pngs[at] sent in one batch request with the others, and the runtime batch size."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    response = client.post(f"/v1/models/{model}/classify/batch", params={"top_k": 10}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    return probabilities(body["results"][at]), body["timings"]["batch_size"]


def _histogram(client: httpx.Client, model: str) -> dict[str, float]:
    """Cumulative count of runtime calls per `le` bucket of vitserve_batch_size, and the total."""
    text = client.get("/metrics").text
    buckets = {le: metric(text, "vitserve_batch_size_bucket", model=model, le=le) for le in ("1.0", "8.0", "16.0")}
    return {**buckets, "count": metric(text, "vitserve_batch_size_count", model=model)}


@pytest.mark.parametrize("model", [FP32, INT8])
def test_an_answer_does_not_depend_on_its_batch_neighbours(batching_server, held_out_pngs, model):
    with httpx.Client(base_url=batching_server.url, timeout=60) as client:
        before = _histogram(client, model)
        worst = 0.0
        for target in range(3):
            png = held_out_pngs[target]
            alone = _alone(client, model, png)
            for size in SIZES:
                others = [held_out_pngs[(target + 1 + k) % len(held_out_pngs)] for k in range(size - 1)]
                at = (target * 5 + size) % size  # the image's position moves too
                batch = [*others[:at], png, *others[at:]]
                got, batch_size = _in_batch(client, model, batch, at)
                assert got.keys() == alone.keys()
                if model == INT8:
                    assert batch_size == 1  # dynamic INT8 is never batched
                    assert got == alone, (size, at)  # bit for bit
                else:
                    assert batch_size == size  # the batch really formed
                    worst = max(worst, *(abs(got[k] - alone[k]) for k in alone))
        assert worst <= FP32_ATOL, f"FP32 probabilities moved by {worst:.2e} with the batch"
        after = _histogram(client, model)
    calls = after["count"] - before["count"]
    if model == INT8:
        assert after["1.0"] - before["1.0"] == calls  # every runtime call ran one image
    else:
        assert calls > 0 and after["8.0"] - before["8.0"] < after["16.0"] - before["16.0"]  # batches of 16 ran
        assert after["1.0"] - before["1.0"] < calls  # and not everything ran alone
