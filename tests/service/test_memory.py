"""Memory: worst-case images within the default limits, and bodies in bursts, against the shipped memory limit.

Issue 16's probe took a fresh server to 1,085 MiB with one 254 KB float TIFF, 2,872 MiB with eight, and kept
2,128 MiB after a burst of 20 MB bodies. Here the same images (made in memory: they compress to a few hundred
KB) must keep the server's peak RSS (`VmHWM`) under the Kubernetes manifest's memory limit, read from the
manifest, and RSS must come back near where it was after a burst. `decode_cost`, which the decode budget
reserves, must cover what a decode really takes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from service.core.budgets import trim_heap, tune_allocator
from service.core.imaging import decode_cost, decode_image
from service.settings import Settings
from tests.conftest import MODELS, ROOT, Server
from tests.service.rawhttp import metric, proc_status_kib, reset_peak_rss, wait_for

POD = ROOT / "docker" / "k8s" / "components" / "pod-defaults" / "pod.yaml"
MAX_PIXELS = Settings.model_fields["max_pixels"].default
MAX_BODY = Settings.model_fields["max_body_bytes"].default
CONCURRENT = 8
NEAR_BASELINE_MIB = 64  # RSS after a burst: within this of where it was before (allocator slack, warm caches)
MIB = 2**20


def manifest_memory_limit() -> int:
    """The serving container's memory limit in the shipped Kubernetes manifests, in bytes."""
    pod = yaml.safe_load(POD.read_text())
    (container,) = pod["spec"]["containers"]
    value = container["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def side(ratio: float = 1.0) -> tuple[int, int]:
    """(width, height) of an image just within the pixel limit, `ratio` = height / width."""
    width = int((MAX_PIXELS / ratio) ** 0.5)
    return width, int(MAX_PIXELS // width)


def float_tiff() -> bytes:
    """The probe's bomb: 40 MP of 32-bit float, deflated to a few hundred KB."""
    width, height = side(1.1)
    values = np.zeros((height, width), np.float32)
    values[::7] = 0.5
    return encoded(Image.fromarray(values, "F"), "TIFF", compression="tiff_deflate")


def rgba_png() -> bytes:
    return encoded(Image.new("RGBA", side(), (10, 200, 30, 128)), "PNG", compress_level=9)


def grey16_png() -> bytes:
    return encoded(Image.new("I;16", side(), 40000), "PNG", compress_level=9)


def la_png() -> bytes:
    return encoded(Image.new("LA", side(), (90, 60)), "PNG", compress_level=9)


WORST_CASES: dict[str, Callable[[], bytes]] = {
    "float-tiff": float_tiff,
    "rgba-png": rgba_png,
    "grey16-png": grey16_png,
    "la-png": la_png,
}


def measure_decode(name: str) -> tuple[int, int, str]:
    """(bytes a decode of the named image took at its peak, what decode_cost says, the decoded mode), measured
    in the process it runs in: call it in a process of its own."""
    data = WORST_CASES[name]()
    tune_allocator()  # as the server does: freed blocks go back, so a decode's pages show in RSS
    trim_heap()
    pid = os.getpid()
    before = proc_status_kib(pid, "VmRSS") * 1024
    reset_peak_rss(pid)
    image = decode_image(data, max_pixels=MAX_PIXELS)
    took = proc_status_kib(pid, "VmHWM") * 1024 - before
    return took, decode_cost(Image.open(io.BytesIO(data))), image.mode


@pytest.mark.parametrize("name", WORST_CASES)
def test_decode_cost_covers_what_a_decode_takes(name: str) -> None:
    # In a fresh process: peak RSS is the whole process's, and in the suite's process threads that earlier tests
    # left (pools, log writers) may allocate during the decode (9 MiB once, in a full run).
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        took, cost, mode = pool.apply(measure_decode, (name,))
    assert mode == "RGB"
    assert took <= cost, f"{name}: a decode took {took / MIB:.0f} MiB, decode_cost says {cost / MIB:.0f} MiB"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with every default, as the manifests run it."""
    srv = Server(MODELS, tmp_path_factory.mktemp("memory") / "server.log").wait_ready()
    yield srv
    assert srv.stop() == 0


def _post_all(url: str, requests: list[tuple[str, bytes, str]], workers: int) -> list[httpx.Response]:
    def post(request: tuple[str, bytes, str]) -> httpx.Response:
        path, body, content_type = request
        return httpx.post(f"{url}{path}", content=body, headers={"content-type": content_type}, timeout=120)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(post, requests))


@pytest.mark.server
def test_concurrent_worst_case_images_stay_under_the_manifest_memory_limit(fresh: Server) -> None:
    limit = manifest_memory_limit()
    tiff, png = float_tiff(), rgba_png()
    requests = [("/v1/attention?format=png", tiff, "image/tiff")] * CONCURRENT
    requests += [("/v1/classify", png, "image/png")] * CONCURRENT
    responses = _post_all(fresh.url, requests, workers=len(requests))
    peak = proc_status_kib(fresh.process.pid, "VmHWM") * 1024  # since the start, model loading included
    statuses = Counter((path, r.status_code) for (path, _, _), r in zip(requests, responses, strict=True))
    for response in responses:  # the decode budget may make one wait, then refuse it: never an OOM kill
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.headers["retry-after"]
    assert statuses[("/v1/attention?format=png", 200)] >= 1 and statuses[("/v1/classify", 200)] >= 1, statuses
    assert peak < limit, f"peak RSS {peak / MIB:.0f} MiB, limit {limit / MIB:.0f} MiB; {statuses}"


@pytest.mark.server
def test_rss_comes_back_after_a_burst_of_large_bodies(fresh: Server) -> None:
    pid = fresh.process.pid
    body = b"\0" * (MAX_BODY - 100 * 1024)  # no image: read whole, then refused (400) by the decoder
    _post_all(fresh.url, [("/v1/classify", body, "image/png")] * 2, workers=2)  # warm the path once
    wait_for("the body budget to empty", lambda: metric(fresh.url, "vitserve_memory_budget_used_bytes") == 0)
    before = proc_status_kib(pid, "VmRSS") * 1024
    responses = _post_all(fresh.url, [("/v1/classify", body, "image/png")] * 32, workers=16)
    assert {r.status_code for r in responses} <= {400, 503}, Counter(r.status_code for r in responses)
    wait_for(
        f"RSS within {NEAR_BASELINE_MIB} MiB of the {before / MIB:.0f} MiB before the burst",
        lambda: proc_status_kib(pid, "VmRSS") * 1024 <= before + NEAR_BASELINE_MIB * MIB,
        timeout=15,
    )
