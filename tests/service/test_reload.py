"""Model hot reload: a new version placed in the repository is loaded in the background and swapped in; requests
already under way finish on the old one; a broken version is rejected and the old one keeps serving.

New versions are published the recommended way: graph files first, then artifact.json replaced in one rename.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from service.app import create_app
from service.core.loading import _load_version, load_repository
from service.core.reload import RepositoryWatcher
from service.core.runtime import CPU
from service.core.state import ServiceState
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS, Server, metric, wait_until
from tests.service import inprocess
from tests.service.conftest import encode
from vit_artifact.metadata import METADATA_FILE, sha256_file

PNG = encode(Image.fromarray(skimage.data.camera()).resize((32, 32)))
INT8 = MODELS / "digits-vit-int8"
RAW: dict[str, Any] = {"content": PNG, "headers": {"content-type": "image/png"}}


def publish(directory: Path, source: Path, version: str, *, damage: Callable[[Path], None] | None = None) -> None:
    """Put `source`'s artifact in `directory` as `version`: graphs first, then artifact.json in one rename."""
    directory.mkdir(exist_ok=True)
    for graph in ("model.onnx", "attention.onnx"):
        shutil.copyfile(source / graph, directory / graph)
    record = json.loads((source / METADATA_FILE).read_text())
    record.update(name=directory.name, version=version)
    if damage is not None:
        damage(directory)
        record["graphs"]["classify"]["sha256"] = sha256_file(directory / "model.onnx")  # past the hash check
    staged = directory / f".{METADATA_FILE}.tmp"
    staged.write_text(json.dumps(record))
    os.replace(staged, directory / METADATA_FILE)


def truncate(directory: Path) -> None:
    graph = directory / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:4096])


def reloads(client: httpx.Client, model: str, outcome: str) -> float:
    return metric(client.get("/metrics").text, "vitserve_model_reload_total", model=model, outcome=outcome)


# --- the real process, polling every 0.5 s; the test waits on its reload counter ---------------------------------------------------------------------


@pytest.mark.server
def test_new_version_is_swapped_in_and_a_broken_one_rejected(tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(MODELS, repository)
    live = repository / "digits-vit"
    srv = Server(repository, tmp_path / "server.log", VITSERVE_RELOAD_INTERVAL_S="0.5").wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/v1/models/digits-vit").json()["version"] == "1"

            publish(live, INT8, "2")
            wait_until(lambda: reloads(c, "digits-vit", "loaded") == 1, "version 2 is loaded")
            info = c.get("/v1/models/digits-vit").json()
            assert info["version"] == "2" and info["precision"] == "int8"
            answer = c.post("/v1/classify", **RAW)
            assert answer.status_code == 200 and answer.json()["version"] == "2"
            assert reloads(c, "digits-vit", "loaded") == 1
            loads = [line for line in c.get("/metrics").text.splitlines() if "model_load_seconds{" in line]
            assert any('model="digits-vit",version="2"' in line for line in loads), loads
            assert not any('model="digits-vit",version="1"' in line for line in loads), loads
            assert c.get("/readyz").status_code == 200

            publish(live, DEFAULT_MODEL, "3", damage=truncate)
            wait_until(lambda: reloads(c, "digits-vit", "rejected") == 1, "version 3 is rejected")
            assert c.get("/v1/models/digits-vit").json()["version"] == "2"  # the old version keeps serving
            answer = c.post("/v1/classify", **RAW)
            assert answer.status_code == 200 and answer.json()["version"] == "2"
            assert c.get("/readyz").status_code == 200

            shutil.copytree(INT8, repository / ".incoming")  # hidden: being written, not a model
            os.rename(repository / ".incoming", repository / "digits-new")  # a new model, in one rename
            wait_until(lambda: reloads(c, "digits-new", "loaded") == 1, "the new model is loaded")
            assert "digits-new" in [m["name"] for m in c.get("/v1/models").json()["models"]]
            assert c.post("/v1/models/digits-new/classify", **RAW).status_code == 200
            assert reloads(c, "digits-vit", "rejected") == 1, "a rejected version is not tried again"
        log = srv.log.read_text()
        assert "version 2 keeps serving" in log and "onnxruntime cannot load it" in log
    finally:
        assert srv.stop() == 0


# --- in this process: the watcher, one poll at a time --------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path) -> Path:
    shutil.copytree(DEFAULT_MODEL, tmp_path / DEFAULT_MODEL.name)
    return tmp_path


Scenario = Callable[[httpx.AsyncClient, ServiceState, RepositoryWatcher], Awaitable[None]]


def run_with_watcher(model_dir: Path, scenario: Scenario, **options: Any) -> None:
    """The app on `model_dir`, and a watcher that the scenario polls by hand (it never polls on its own)."""
    settings = Settings(model_dir=model_dir, provider="cpu", **options)
    app = create_app(settings, load_repository(settings))

    async def main() -> None:
        async with inprocess.serve(app) as client:
            load = functools.partial(_load_version, settings, [CPU])
            await scenario(client, app.state.vitserve, RepositoryWatcher(app.state.vitserve, load, 1.0))

    asyncio.run(main())


def test_a_change_is_loaded_once_it_has_stayed_the_same_for_one_poll(model_dir):
    async def scenario(client: httpx.AsyncClient, state: ServiceState, watcher: RepositoryWatcher) -> None:
        assert await watcher.poll() == []
        publish(model_dir / "digits-vit", INT8, "2")
        assert await watcher.poll() == []  # just changed: the writer may not be done
        assert (await client.get("/v1/models/digits-vit")).json()["version"] == "1"
        assert await watcher.poll() == ["digits-vit"]
        assert (await client.get("/v1/models/digits-vit")).json()["version"] == "2"
        assert await watcher.poll() == []

        publish(model_dir / "digits-vit", DEFAULT_MODEL, "3", damage=truncate)
        assert await watcher.poll() == []
        assert await watcher.poll() == ["digits-vit"]  # tried, and rejected
        assert await watcher.poll() == []  # not again until the files change
        assert state.model("digits-vit").meta.version == "2"
        publish(model_dir / "digits-vit", DEFAULT_MODEL, "4")  # fixed
        await watcher.poll()
        assert await watcher.poll() == ["digits-vit"]
        answer = await client.post("/v1/classify", **RAW)
        assert answer.json()["version"] == "4"

    run_with_watcher(model_dir, scenario)


def test_a_model_skipped_at_start_is_loaded_once_it_is_fixed(model_dir):
    broken = model_dir / "digits-vit-int8"
    shutil.copytree(INT8, broken)
    truncate(broken)

    async def scenario(client: httpx.AsyncClient, state: ServiceState, watcher: RepositoryWatcher) -> None:
        assert (await client.post("/v1/models/digits-vit-int8/classify", **RAW)).status_code == 503
        publish(broken, INT8, "2")
        await watcher.poll()
        assert await watcher.poll() == ["digits-vit-int8"]
        assert (await client.post("/v1/models/digits-vit-int8/classify", **RAW)).status_code == 200
        assert (await client.get("/v1/models")).json()["unavailable"] == []

    run_with_watcher(model_dir, scenario, on_model_error="skip")


def test_requests_under_way_finish_on_the_version_they_started_on(model_dir):
    old = inprocess.load(DEFAULT_MODEL)
    pixels = np.zeros((3, 32, 32), np.float32)
    publish(model_dir / "digits-vit", INT8, "2")
    new = inprocess.load(model_dir / "digits-vit")
    # Version 1's requests wait for company in batches of 2 (a minute's delay): the test decides when they run.
    app = inprocess.app(inprocess.repository(old), max_batch_size=2, max_queue_delay_ms=60_000)
    state = app.state.vitserve
    logits, attentions = old.infer(pixels[None], with_attention=True)

    async def main() -> None:
        async with inprocess.serve(app) as client:
            before = asyncio.create_task(client.post("/v1/classify", params={"top_k": 10}, **RAW))
            await inprocess.eventually(lambda: _queued(client), "the request waits in version 1's batch queue")
            assert state.swap(new, dataclasses.replace(state.policy(new), max_queue_delay_ms=0)) is old
            after = await client.post("/v1/classify", params={"top_k": 10}, **RAW)
            assert after.json()["version"] == "2" and not before.done()
            # A request that looked version 1 up before the swap and reaches inference only now joins it there.
            joined = await state.infer(old, pixels, with_attention=True)
            assert (await before).json()["version"] == "1" and joined.batch_size == 2
            assert before.result().json()["predictions"] != after.json()["predictions"]  # FP32 and INT8 differ
            np.testing.assert_allclose(joined.logits, logits[0], rtol=0, atol=1e-6)

            async def retired() -> bool:
                return not state.batchers.retiring

            await inprocess.eventually(retired, "the old batcher stops once nothing waits on it")
            # Later still, with version 1's batcher gone, such a request still gets version 1.
            late = await state.infer(old, pixels, with_attention=True)
            np.testing.assert_allclose(late.logits, logits[0], rtol=0, atol=1e-6)
            assert late.attentions is not None and late.attentions.shape == attentions[0].shape

    asyncio.run(main())


async def _queued(client: httpx.AsyncClient) -> bool:
    return await inprocess.queued(client) == 1
