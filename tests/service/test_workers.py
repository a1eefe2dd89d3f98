"""Multi-process mode (`VITSERVE_WORKERS=2`): a supervisor, two HTTP workers and one inference engine, as real
processes. Batches form across workers, metrics add up across processes, every worker enforces keys and limits,
SIGTERM drains everything to exit 0, a killed worker is replaced, and a killed engine ends the server non-zero
with what was waiting on it answered 503."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import psutil
import pytest

from service.core.pipeline import prepare, softmax
from service.core.runtime import CPU, load_model
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS, ROOT, Server, free_port, metric, wait_until

pytestmark = pytest.mark.server

WORKERS = {"VITSERVE_WORKERS": "2"}


def children(server: Server, module: str) -> list[psutil.Process]:
    """The supervisor's children running `python -m <module>`."""
    return [p for p in psutil.Process(server.process.pid).children() if module in " ".join(p.cmdline())]


async def _classify_all(url: str, images: list[bytes], **headers: str) -> list[httpx.Response]:
    # One connection per request, so the kernel spreads them over both workers' accept loops.
    async def one(data: bytes) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await client.post("/v1/classify", content=data, headers={"content-type": "image/png", **headers})

    return list(await asyncio.gather(*(one(d) for d in images)))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    log = tmp_path_factory.mktemp("workers") / "server.log"
    # A 200 ms batch window: requests arriving from both workers within it meet in one batch.
    srv = Server(MODELS, log, VITSERVE_MAX_QUEUE_DELAY_MS="200", **WORKERS).wait_ready()
    yield srv
    assert srv.stop() == 0


def test_requests_from_both_workers_share_batches_and_match_in_process(two_workers, held_out_pngs):
    images = held_out_pngs[:48]
    assert len(children(two_workers, "service.procs.worker")) == 2
    # The kernel hands each new connection to whichever worker accepts first; on a busy machine one worker can
    # take a whole round, so send rounds until a batch has held both workers' requests (a few at most).
    for _ in range(5):
        responses = asyncio.run(_classify_all(two_workers.url, images))
        assert [r.status_code for r in responses] == [200] * len(images), responses[0].text
        text = httpx.get(f"{two_workers.url}/metrics").text
        batches = metric(text, "vitserve_batch_sources_count", model="digits-vit")
        single_source = metric(text, "vitserve_batch_sources_bucket", model="digits-vit", le="1.0")
        assert batches < 5 * len(images), "requests were not batched at all"
        if single_source < batches:
            break
    assert single_source < batches, "no batch held requests from both workers"
    # The answers are the model's: the same as running the committed artifact in this process.
    model = load_model(DEFAULT_MODEL, providers=[CPU], threads=1, cpu_rewrites=True)
    for data, response in zip(images[:8], responses[:8], strict=True):
        logits, _ = model.infer(prepare(data, model.meta, max_pixels=40_000_000).pixels[None], with_attention=False)
        expected = softmax(logits[0])
        got = {p["index"]: p["probability"] for p in response.json()["predictions"]}
        assert max(abs(got[i] - expected[i]) for i in got) < 1e-5


def test_metric_totals_count_every_process(two_workers, held_out_pngs):
    def totals() -> tuple[float, float, float]:
        text = httpx.get(f"{two_workers.url}/metrics").text
        return (
            metric(text, "nv_inference_count_total", model="digits-vit", version="1"),
            metric(text, "nv_inference_request_success_total", model="digits-vit", version="1"),
            metric(text, "vitserve_http_requests_total", route="/v1/classify", method="POST", status="200"),
        )

    before = totals()
    responses = asyncio.run(_classify_all(two_workers.url, held_out_pngs[:30]))
    assert all(r.status_code == 200 for r in responses)
    after = totals()
    assert [a - b for a, b in zip(after, before, strict=True)] == [30, 30, 30]
    # Each worker holds half of each memory budget; summed, they are the server-wide settings (the engine none).
    text = httpx.get(f"{two_workers.url}/metrics").text
    settings = Settings(model_dir=MODELS)
    assert metric(text, "vitserve_memory_budget_bytes", budget="body") == settings.body_budget_bytes
    assert metric(text, "vitserve_memory_budget_bytes", budget="decode") == settings.decode_budget_bytes


def test_attention_and_v2_work_through_the_engine(two_workers, held_out_pngs):
    attention = httpx.post(
        f"{two_workers.url}/v1/attention", content=held_out_pngs[0], headers={"content-type": "image/png"}
    )
    assert attention.status_code == 200, attention.text
    assert np.array(attention.json()["map"]).shape == (8, 8)
    pixels = np.zeros((2, 3, 32, 32), np.float32).tolist()
    body = {"inputs": [{"name": "pixel_values", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": pixels}]}
    v2 = httpx.post(f"{two_workers.url}/v2/models/digits-vit-int8/infer", json=body)
    assert v2.status_code == 200, v2.text
    assert [o["shape"] for o in v2.json()["outputs"]] == [[2, 10], [2, 10]]


def test_every_worker_checks_keys_and_limits(tmp_path, held_out_pngs):
    srv = Server(
        MODELS, tmp_path / "server.log", VITSERVE_API_KEYS="k1", VITSERVE_MAX_BODY_BYTES="100000", **WORKERS
    ).wait_ready()
    try:
        refused = asyncio.run(_classify_all(srv.url, held_out_pngs[:16]))
        assert [r.status_code for r in refused] == [401] * 16
        allowed = asyncio.run(_classify_all(srv.url, held_out_pngs[:16], authorization="Bearer k1"))
        assert [r.status_code for r in allowed] == [200] * 16
        too_big = asyncio.run(_classify_all(srv.url, [b"\0" * 200_000] * 8, authorization="Bearer k1"))
        assert [r.status_code for r in too_big] == [413] * 8
    finally:
        assert srv.stop() == 0


def serve_traffic(srv: Server, images: list[bytes]) -> None:
    """Classify on both workers (one connection each, so the kernel spreads them), an attention map and a batch:
    every kind of request the engine answers from the workers' slots."""
    assert [r.status_code for r in asyncio.run(_classify_all(srv.url, images))] == [200] * len(images)
    png = {"content-type": "image/png"}
    assert httpx.post(f"{srv.url}/v1/attention", content=images[0], headers=png).status_code == 200
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images[:4])]
    assert httpx.post(f"{srv.url}/v1/classify/batch", files=files).status_code == 200


def assert_clean_log(srv: Server) -> None:
    """A clean shutdown says nothing alarming: no ERROR line and no traceback from any process."""
    text = srv.log.read_text()
    assert "ERROR" not in text and "Traceback" not in text, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_drains_every_process_and_exits_0_with_a_clean_log(tmp_path, held_out_pngs, sig):
    # SIGTERM goes to the supervisor, as an orchestrator sends it; Ctrl+C in a terminal sends SIGINT to every
    # process of the group at once, the engine included, which must still outlive the workers' drain.
    srv = Server(MODELS, tmp_path / "server.log", **WORKERS).wait_ready()
    processes = [*children(srv, "service.procs.worker"), *children(srv, "service.procs.engine")]
    assert len(processes) == 3
    serve_traffic(srv, held_out_pngs[:16])
    for process in [psutil.Process(srv.process.pid), *processes] if sig == signal.SIGINT else [srv.process]:
        process.send_signal(sig)
    assert srv.process.wait(timeout=60) == 0  # the supervisor exits 0 only when every child exited 0
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive
    assert_clean_log(srv)


def test_a_killed_worker_is_replaced(tmp_path, held_out_pngs):
    srv = Server(MODELS, tmp_path / "server.log", **WORKERS).wait_ready()
    try:
        victim = children(srv, "service.procs.worker")[0]
        victim.kill()
        victim.wait(10)

        def replaced() -> bool:
            pids = [p.pid for p in children(srv, "service.procs.worker")]
            return len(pids) == 2 and victim.pid not in pids and httpx.get(f"{srv.url}/readyz").status_code == 200

        wait_until(replaced, "a new worker and readiness again")
        responses = asyncio.run(_classify_all(srv.url, held_out_pngs[:16]))
        assert [r.status_code for r in responses] == [200] * 16
    finally:
        assert srv.stop() == 0


def test_workers_killed_while_their_request_is_queued_leave_the_engine_serving(tmp_path, held_out_pngs):
    # A batch window of a minute holds a lone request in the engine's queue, its pixels a view of a worker's slots;
    # that worker dies. The engine lets the worker's slots go (unmapped once the queued view is dropped), serves
    # the replacements, and stops cleanly.
    srv = Server(MODELS, tmp_path / "server.log", VITSERVE_MAX_QUEUE_DELAY_MS="60000", **WORKERS).wait_ready()
    try:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                held = asyncio.ensure_future(
                    client.post("/v1/classify", content=held_out_pngs[0], headers={"content-type": "image/png"})
                )

                async def queued() -> bool:
                    text = (await client.get("/metrics")).text
                    return metric(text, "vitserve_queue_depth", model="digits-vit") >= 1

                while not await queued():
                    await asyncio.sleep(0.05)
                workers = children(srv, "service.procs.worker")
                for worker in workers:  # the one that holds the request among them
                    worker.kill()
                psutil.wait_procs(workers, timeout=10)
                with pytest.raises(httpx.TransportError):
                    await held

        asyncio.run(scenario())
        wait_until(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, "two new workers and readiness again")
        # Fifteen more fill a batch of 16 with the dead worker's queued request, so it runs at once.
        assert [r.status_code for r in asyncio.run(_classify_all(srv.url, held_out_pngs[:15]))] == [200] * 15
    finally:
        assert srv.stop() == 0
    text = srv.log.read_text()
    assert "Traceback" not in text and "BufferError" not in text, text


def test_a_killed_engine_answers_503_and_ends_the_server_non_zero(tmp_path, held_out_pngs):
    # A batch window of a minute holds a lone request in the engine's queue.
    srv = Server(MODELS, tmp_path / "server.log", VITSERVE_MAX_QUEUE_DELAY_MS="60000", **WORKERS).wait_ready()

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            held = asyncio.ensure_future(
                client.post("/v1/classify", content=held_out_pngs[0], headers={"content-type": "image/png"})
            )

            async def queued() -> bool:
                text = (await client.get("/metrics")).text
                return metric(text, "vitserve_queue_depth", model="digits-vit") >= 1

            while not await queued():
                await asyncio.sleep(0.05)
            children(srv, "service.procs.engine")[0].kill()
            return await held

    answer = asyncio.run(scenario())
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    assert srv.process.wait(timeout=60) == 1


def test_an_engine_that_cannot_load_the_models_ends_the_start_with_its_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VITSERVE_PORT": str(free_port()), **WORKERS}
    env["VITSERVE_MODEL_DIR"] = str(tmp_path)  # no artifacts in it
    result = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no artifacts in" in result.stderr
