"""Triton's statistics and model repository extensions, through `tritonclient.http` against the real server, in
one process and with two HTTP workers; and hot reload across workers under traffic.

Statistics are read from the `/metrics` counters, so the counts are checked against both the requests sent and
`/metrics`; with two workers, every reading (each on a fresh connection, so either worker may answer) must give
the whole server's totals.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import DEFAULT_MODEL, MODELS, Server, metric, wait_until
from tests.service import inprocess
from tests.service.test_reload import INT8, PNG, publish, reloads, truncate

pytestmark = pytest.mark.server

MODEL = "digits-vit"


def admin() -> dict[str, str]:
    """Headers with the admin key: a new dict each call, since tritonclient adds its own to the one it is given."""
    return {"Authorization": "Bearer admin-key"}


def user() -> dict[str, str]:
    return {"Authorization": "Bearer user-key"}


KEYS = {"VITSERVE_ADMIN_KEYS": "admin-key", "VITSERVE_API_KEYS": "user-key"}


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "two-workers"])
def served(request, tmp_path_factory) -> Iterator[Server]:
    repository = tmp_path_factory.mktemp("models") / "models"
    shutil.copytree(MODELS, repository)
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = Server(repository, log, VITSERVE_WORKERS=request.param, **KEYS).wait_ready()
    srv.repository = repository  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0


def triton(server: Server) -> httpclient.InferenceServerClient:
    """A new client, so a new connection: with two workers, either may answer it."""
    return httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))


def readings(server: Server, model: str = MODEL, times: int = 4) -> dict[str, Any]:
    """The model's statistics, read `times` over fresh connections; all readings must agree."""
    seen = []
    for _ in range(times):
        with triton(server) as client:
            (stats,) = client.get_inference_statistics(model, headers=user())["model_stats"]
        stats.pop("last_inference")
        seen.append(stats)
    assert all(s == seen[0] for s in seen), seen
    return seen[0]


def infer(server: Server, images: int, model: str = MODEL) -> None:
    pixels = np.zeros((images, 3, 32, 32), np.float32)
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    with triton(server) as client:
        client.infer(model, [tensor], headers=user())


def test_statistics_count_real_requests_in_every_process(served):
    before = readings(served)
    with triton(served) as client:
        before_ms = client.get_inference_statistics(MODEL, headers=user())["model_stats"][0]["last_inference"]
    for images in (2, 1, 1, 3):  # 4 requests of 7 images, on 4 connections
        infer(served, images)
    wrong = httpclient.InferInput("pixel_values", [1, 3, 16, 16], "FP32")  # a failed request: the wrong shape
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException), triton(served) as client:
        client.infer(MODEL, [wrong], headers=user())
    after = readings(served)

    def delta(*path: str) -> int:
        a: Any = after
        b: Any = before
        for key in path:
            a, b = a[key], b[key]
        return int(a - b)

    assert after["name"] == MODEL and after["version"] == "1"
    assert delta("inference_count") == 7
    assert delta("inference_stats", "success", "count") == 4
    assert delta("inference_stats", "fail", "count") == 1
    assert delta("inference_stats", "queue", "count") == delta("inference_stats", "compute_infer", "count") == 7
    assert delta("inference_stats", "success", "ns") > 0 and delta("inference_stats", "compute_infer", "ns") > 0
    assert delta("inference_stats", "fail", "ns") > 0
    executions = delta("execution_count")
    assert 1 <= executions <= 4
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert sum(sizes.values()) == after["execution_count"]
    assert sum(size * count for size, count in sizes.items()) == after["inference_count"]
    with triton(served) as client:
        assert client.get_inference_statistics(MODEL, headers=user())["model_stats"][0]["last_inference"] > before_ms
        # The same counters as /metrics: one home for the numbers.
        text = httpx.get(f"{served.url}/metrics", headers=user()).text
        assert metric(text, "nv_inference_count_total", model=MODEL, version="1") == after["inference_count"]
        assert metric(text, "nv_inference_exec_count_total", model=MODEL, version="1") == after["execution_count"]
        every = client.get_inference_statistics(headers=user())["model_stats"]
        assert sorted(s["name"] for s in every) == ["digits-vit", "digits-vit-int8"]
        assert client.get_inference_statistics(MODEL, "1", headers=user())["model_stats"][0]["inference_count"] >= 7
        with pytest.raises(InferenceServerException, match="no statistics of '9'"):
            client.get_inference_statistics(MODEL, "9", headers=user())
        with pytest.raises(InferenceServerException, match="not loaded"):
            client.get_inference_statistics("no-such-model", headers=user())
        assert "statistics" in client.get_server_metadata(headers=user())["extensions"]
        assert "model_repository" in client.get_server_metadata(headers=user())["extensions"]


def ready_everywhere(server: Server, model: str, times: int = 6) -> list[bool]:
    """Is the model ready, asked over `times` fresh connections (so of both workers, in all likelihood)."""
    answers = []
    for _ in range(times):
        with triton(server) as client:
            answers.append(client.is_model_ready(model, headers=user()))
    return answers


def test_repository_index_load_and_unload_in_every_process(served):
    int8 = "digits-vit-int8"
    with triton(served) as client:
        with pytest.raises(InferenceServerException, match="no admin key was sent"):
            client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="the admin key is not valid"):
            client.get_model_repository_index(headers=user())  # an API key is not an admin key
        index = client.get_model_repository_index(headers=admin())
        assert index == [
            {"name": MODEL, "version": "1", "state": "READY"},
            {"name": int8, "version": "1", "state": "READY"},
        ]

        client.unload_model(int8, headers=admin())
    assert ready_everywhere(served, int8) == [False] * 6  # every worker switched before unload returned
    with pytest.raises(InferenceServerException, match="was unloaded"):
        infer(served, 1, int8)
    with triton(served) as client:
        assert client.get_model_repository_index(headers=admin())[1] == {
            "name": int8,
            "state": "UNAVAILABLE",
            "reason": "unloaded",
        }
        client.unload_model(int8, headers=admin())  # again: nothing to do, not an error

        client.load_model(int8, headers=admin())
    assert ready_everywhere(served, int8) == [True] * 6
    infer(served, 2, int8)

    # A broken model, added while serving: refused with the reason; nothing else changes.
    broken = served.repository / "digits-broken"  # type: ignore[attr-defined]
    shutil.copytree(INT8, broken)
    truncate(broken)
    with triton(served) as client:
        with pytest.raises(InferenceServerException, match=r"failed to load model 'digits-broken'.*sha256 differs"):
            client.load_model("digits-broken", headers=admin())
        assert "/tmp" not in str(client.get_model_repository_index(headers=admin()))  # no server paths
        with pytest.raises(InferenceServerException, match="no model 'no-such-model' in the model repository"):
            client.load_model("no-such-model", headers=admin())
        with pytest.raises(InferenceServerException, match="overrides"):
            client.load_model(int8, headers=admin(), config='{"max_batch_size": 2}')
    assert ready_everywhere(served, MODEL) == [True] * 6
    assert ready_everywhere(served, int8) == [True] * 6
    assert not ready_everywhere(served, "digits-broken", times=2)[0]


def test_repository_extension_is_off_without_admin_keys():
    app = inprocess.app(inprocess.repository())

    async def main() -> None:
        async with inprocess.serve(app) as client:
            for path in ("/v2/repository/index", f"/v2/repository/models/{MODEL}/unload"):
                answer = await client.post(path, headers=admin())
                assert answer.status_code == 403
                assert "set VITSERVE_ADMIN_KEYS" in answer.json()["error"]
            assert (await client.get(f"/v2/models/{MODEL}/ready")).status_code == 200
            assert "model_repository" not in (await client.get("/v2")).json()["extensions"]

    asyncio.run(main())


# --- hot reload across workers -----------------------------------------------------------------------------


class Traffic:
    """Classify requests, one fresh connection each, from a thread, until stopped; keeps every answer."""

    def __init__(self, url: str, connections: int = 4) -> None:
        self.url = url
        self.connections = connections
        self.answers: list[tuple[int, str]] = []  # (status, version or error text)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        async def loop() -> None:
            while not self.stop.is_set():
                async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
                    r = await client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
                self.answers.append((r.status_code, r.json()["version"] if r.status_code == 200 else r.text))

        await asyncio.gather(*(loop() for _ in range(self.connections)))

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)

    def versions_since(self, start: int) -> list[str]:
        return [v for _, v in self.answers[start:]]


def test_hot_reload_across_workers_under_traffic(tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(MODELS, repository)
    live = repository / MODEL
    srv = Server(repository, tmp_path / "server.log", VITSERVE_WORKERS="2", VITSERVE_RELOAD_INTERVAL_S="0.3")
    srv.wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c, Traffic(srv.url) as traffic:
            wait_until(lambda: len(traffic.answers) >= 20, "traffic flows")
            publish(live, INT8, "2")
            wait_until(lambda: reloads(c, MODEL, "loaded") == 1, "version 2 is loaded")
            switched = len(traffic.answers)
            wait_until(lambda: len(traffic.answers) >= switched + 40, "more traffic after the swap")
            # A broken version 3: rejected, and version 2 keeps answering.
            publish(live, DEFAULT_MODEL, "3", damage=truncate)
            wait_until(lambda: reloads(c, MODEL, "rejected") == 1, "version 3 is rejected")
            rejected = len(traffic.answers)
            wait_until(lambda: len(traffic.answers) >= rejected + 20, "more traffic after the rejection")
        assert [s for s, _ in traffic.answers if s != 200] == [], [a for a in traffic.answers if a[0] != 200][:3]
        # The reload counts once every worker has acknowledged the switch: later requests all get version 2, but
        # for those already under way then (one per connection at most), which finish on version 1.
        assert set(traffic.versions_since(switched + traffic.connections)) == {"2"}
        assert set(traffic.versions_since(0)) == {"1", "2"}
        assert set(traffic.versions_since(rejected)) == {"2"}
        for _ in range(8):  # fresh connections: both workers serve version 2's metadata
            with httpx.Client(base_url=srv.url, timeout=30) as one:
                assert one.get(f"/v1/models/{MODEL}").json()["precision"] == "int8"
    finally:
        assert srv.stop() == 0
    assert "version 2 keeps serving" in srv.log.read_text()


# --- unload drains ------------------------------------------------------------------------------------------


def test_unload_lets_admitted_requests_finish_and_refuses_new_ones():
    # Requests wait for company in batches of 2 (a minute's delay): the test decides when the admitted one runs.
    old = inprocess.load(DEFAULT_MODEL)
    app = inprocess.app(
        inprocess.repository(old), max_batch_size=2, max_queue_delay_ms=60_000, admin_keys=["admin-key"]
    )
    state = app.state.vitserve
    pixels = np.zeros((3, 32, 32), np.float32)

    async def main() -> None:
        async with inprocess.serve(app) as client:
            admitted = asyncio.create_task(
                client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
            )
            await inprocess.eventually(lambda: _queued(client), "the request waits in the batch queue")
            answer = await client.post(f"/v2/repository/models/{MODEL}/unload", headers=admin())
            assert answer.status_code == 200, answer.text
            refused = await client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
            assert refused.status_code == 404 and "was unloaded" in refused.json()["error"]["message"]
            assert (await client.get(f"/v2/models/{MODEL}/ready")).status_code == 404
            assert not admitted.done()
            # A request that looked the model up before the unload and reaches inference only now joins it.
            joined = await state.infer(old, pixels, with_attention=False)
            assert joined.batch_size == 2
            assert (await admitted).status_code == 200

    asyncio.run(main())


async def _queued(client: httpx.AsyncClient) -> bool:
    return await inprocess.queued(client) == 1


def test_unload_across_workers_lets_admitted_requests_finish(tmp_path):
    # A 5 s batch window holds a lone request in the engine's queue while the model is unloaded.
    srv = Server(
        MODELS,
        tmp_path / "server.log",
        VITSERVE_WORKERS="2",
        VITSERVE_MAX_QUEUE_DELAY_MS="5000",
        VITSERVE_ADMIN_KEYS="admin-key",
    ).wait_ready()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            admitted = asyncio.ensure_future(
                client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
            )

            async def queued() -> bool:
                text = (await client.get("/metrics")).text
                return metric(text, "vitserve_queue_depth", model=MODEL) >= 1

            await inprocess.eventually(queued, "the request waits in the engine's batch queue")
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as other:
                unload = await other.post(f"/v2/repository/models/{MODEL}/unload", headers=admin())
                assert unload.status_code == 200, unload.text
            for _ in range(6):  # fresh connections: every worker refuses it now
                async with httpx.AsyncClient(base_url=srv.url, timeout=60) as fresh:
                    refused = await fresh.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
                    assert refused.status_code == 404 and "was unloaded" in refused.json()["error"]["message"]
            assert not admitted.done()
            answer = await admitted
            assert answer.status_code == 200 and answer.json()["version"] == "1", answer.text

    try:
        asyncio.run(scenario())
    finally:
        assert srv.stop() == 0
