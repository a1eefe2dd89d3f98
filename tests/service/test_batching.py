"""Dynamic batching: coalesced results equal per-image results, in order; a full queue answers 503 at once; a
request of several images is admitted whole or refused before any of them runs."""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.core.batching import DynamicBatcher
from service.errors import Overloaded
from tests.conftest import MODELS, Server
from tests.service import inprocess
from tests.service.conftest import encode


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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
        # FP32: the same numbers within rounding. Dynamic INT8 is served one image per call (its activation
        # scale would otherwise depend on the batch), so its numbers are identical (tests/service/test_numerics.py).
        atol = 1e-5 if a["model"] == "digits-vit" else 0.0
        assert max(abs(pa[k] - pt[k]) for k in pa) <= atol, (path, a["model"])
        assert a["predictions"][0]["label"] == t["predictions"][0]["label"]
        if "map" in a:
            np.testing.assert_allclose(np.array(t["map"]), np.array(a["map"]), atol=1e-4)


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
        assert 'vitserve_rejected_total{model="digits-vit",reason=' in metrics
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


# --- all-or-nothing admission of multi-image requests -------------------------------------------------------

QUEUE = 4  # VITSERVE_MAX_QUEUE_SIZE, and VITSERVE_MAX_BATCH_FILES: the largest request fits an empty queue


def metric(text: str, name: str) -> float:
    """The value of one sample of the default model in a /metrics text (0 before it is first set)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model="digits-vit"' in line:
            return float(line.split()[-1])
    return 0.0


async def until_queued(client: httpx.AsyncClient, depth: int) -> None:
    """Wait on the queue depth gauge (the batcher sets it after each admission and each batch it takes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while metric((await client.get("/metrics")).text, "vitserve_queue_depth") != depth:
        assert loop.time() < deadline, f"the queue never held {depth} images"
        await asyncio.sleep(0.01)


def test_a_multi_image_request_is_admitted_whole_or_refused_before_any_image_runs(held_out_pngs):
    application = inprocess.app(
        inprocess.repository(),
        max_queue_size=QUEUE,
        max_batch_files=QUEUE,
        max_batch_size=1,  # the worker takes one image at a time, so what it holds is known exactly
        max_queue_delay_ms=0,
    )
    images = held_out_pngs[:QUEUE]

    def batch(n: int) -> dict[str, Any]:
        return {"files": [("files", (f"{i}.png", images[i], "image/png")) for i in range(n)]}

    def v2(n: int) -> dict[str, Any]:
        tensor = {"name": "image", "datatype": "BYTES", "shape": [n], "data": [b64(images[i]) for i in range(n)]}
        return {"json": {"inputs": [tensor]}}

    async def main() -> None:
        async with inprocess.serve(application) as client:
            state = application.state.vitserve
            gate = threading.Event()  # holds the model's one runtime thread: whatever the worker takes waits there
            state.batchers.running["digits-vit"].executor.submit(gate.wait)
            try:
                before = metric((await client.get("/metrics")).text, "nv_inference_count_total")
                # Three images in: the worker takes one and waits at the gate, two stay queued; 2 places are left.
                first = asyncio.create_task(client.post("/v1/classify/batch", **batch(3)))
                await until_queued(client, 2)
                for path, body in [
                    ("/v1/classify/batch", batch(3)),
                    ("/v1/models/digits-vit/classify/batch", batch(4)),
                    ("/v2/models/digits-vit/infer", v2(3)),
                ]:
                    refused = await client.post(path, **body)  # answered while the runtime is still held
                    assert refused.status_code == 503, refused.text
                    assert refused.headers["retry-after"] == "1"
                    message = refused.json()["error"] if path.startswith("/v2") else refused.json()["error"]["message"]
                    assert "2 of 4 places free" in message and "none was run" in message, message
                    await until_queued(client, 2)  # none of its images entered the queue
                second = asyncio.create_task(client.post("/v1/classify/batch", **batch(2)))  # fits exactly
                await until_queued(client, 4)
                full = await client.post("/v1/classify", content=images[0], headers={"content-type": "image/png"})
                assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded"
            finally:
                gate.set()
            for accepted, n in ((await first, 3), (await second, 2)):
                assert accepted.status_code == 200, accepted.text
                assert [r["error"] for r in accepted.json()["results"]] == [None] * n
            after = metric((await client.get("/metrics")).text, "nv_inference_count_total")
            assert after - before == 5  # the accepted requests' images, and not one of the refused ones'

    asyncio.run(main())


def test_the_batcher_queues_all_of_a_request_or_none():
    """Below the routes (no early check): the admission itself leaves the queue as it was when it refuses."""
    model = inprocess.load()
    pixels = [np.zeros((3, *model.meta.input_size), np.float32)] * 3

    async def main() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        gate = threading.Event()
        executor.submit(gate.wait)
        batcher = DynamicBatcher(model, inprocess.policy(max_batch_size=1, max_queue_size=QUEUE), executor)
        try:
            held = asyncio.ensure_future(batcher.submit_many(pixels, with_attention=False))
            deadline = asyncio.get_running_loop().time() + 30
            while batcher.queue.qsize() != 2:  # the worker took one and waits at the gate
                assert asyncio.get_running_loop().time() < deadline, "the worker never took an image"
                await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await batcher.submit_many(pixels, with_attention=False)
            assert batcher.queue.qsize() == 2
            fits = asyncio.ensure_future(batcher.submit_many(pixels[:2], with_attention=False))
            await asyncio.sleep(0)  # let it reach its puts (there is no await before them)
            assert batcher.queue.qsize() == 4
        finally:
            gate.set()
        assert [len(await held), len(await fits)] == [3, 2]
        await batcher.stop()
        executor.shutdown()

    asyncio.run(main())
