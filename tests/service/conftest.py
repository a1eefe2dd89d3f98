"""Helpers for the HTTP tests: images made in memory, held-out digit canvases, and calls to a running server.

The `server` and `client` fixtures (tests/conftest.py) run the real `python -m service` on the committed model
repository; these helpers only build requests and read responses.
"""

from __future__ import annotations

import functools
import io
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model_export import digits

HELD_OUT_SAMPLE = 30  # canvases per correctness check: enough to measure, few enough for a fast suite
MEMORY_SLACK_KB = 48 * 1024  # the smallest image the refusal tests claim would take ~140 MB to decode


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def post_image(
    client: httpx.Client,
    path: str,
    data: bytes,
    *,
    content_type: str = "image/png",
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST the raw image bytes as the body, the way `curl --data-binary` does."""
    return client.post(path, content=data, params=params, headers={"content-type": content_type, **(headers or {})})


def classify(client: httpx.Client, data: bytes, *, path: str = "/v1/classify", **params: Any) -> dict[str, Any]:
    """A successful classification of `data` (every class, unless `top_k` is given)."""
    response = post_image(client, path, data, params={"top_k": 10, **params})
    assert response.status_code == 200, response.text
    return response.json()


def probabilities(body: dict[str, Any]) -> dict[str, float]:
    """label -> probability of a classification (or one batch item)."""
    return {p["label"]: p["probability"] for p in body["predictions"]}


def top_label(body: dict[str, Any]) -> str:
    return str(body["predictions"][0]["label"])


def assert_same_probabilities(actual: dict[str, Any], expected: dict[str, Any], atol: float = 1e-6) -> None:
    got, want = probabilities(actual), probabilities(expected)
    assert got.keys() == want.keys()
    worst = max(abs(got[label] - want[label]) for label in want)
    assert worst <= atol, f"probabilities differ by {worst:.2e}: {got} vs {want}"


def canvas_image(canvas: np.ndarray, scale: int = 1) -> Image.Image:
    """One (32, 32) uint8 canvas as an RGB image, optionally enlarged (nearest neighbour keeps it exact)."""
    image = Image.fromarray(canvas).convert("RGB")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image


@pytest.fixture(scope="session")
def held_out() -> digits.Canvases:
    """`HELD_OUT_SAMPLE` held-out canvases spread over the whole set, so every digit appears."""
    full = digits.held_out_set()
    pick = np.linspace(0, len(full.labels) - 1, HELD_OUT_SAMPLE).round().astype(int)
    return digits.Canvases(
        images=full.images[pick], labels=full.labels[pick], boxes=full.boxes[pick], sources=full.sources[pick]
    )


@pytest.fixture(scope="session")
def held_out_pngs(held_out: digits.Canvases) -> list[bytes]:
    return [encode(canvas_image(c)) for c in held_out.images]


def proc_status(pid: int) -> dict[str, int]:
    """kB figures of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


@contextmanager
def allocates_no_image(pid: int) -> Iterator[None]:
    """Fail unless process `pid`'s peak memory rose by less than `MEMORY_SLACK_KB` during the block: nothing the
    size of a claimed image was decoded. Where the peak cannot be reset, the block's own checks still run and
    the test then skips, saying why."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
        unavailable = None
    except OSError as e:
        unavailable = f"cannot reset the server's peak RSS here: {e}"
    before = proc_status(pid)["VmRSS"]
    yield
    if unavailable:
        pytest.skip(unavailable)
    peak = proc_status(pid)["VmHWM"]
    assert peak - before < MEMORY_SLACK_KB, f"peak RSS rose by {(peak - before) / 1024:.0f} MB"


def in_child(test: Callable[..., None]) -> Callable[..., None]:
    """Run `test` in a forked child process and fail with its traceback: for clients whose generated protobuf
    modules clash in one process (tritonclient.grpc and kserve both define `inference.*`), so that pytest's own
    process imports neither."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, and leave without pytest's teardown
            os.close(read)
            try:
                test(*args, **kwargs)
                report = b""
            except BaseException:
                report = traceback.format_exc().encode()
            with os.fdopen(write, "wb") as out:
                out.write(report)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read()
        _, status = os.waitpid(pid, 0)
        if report or status:
            pytest.fail(report.decode() or f"the test's process ended with status {status}", pytrace=False)

    return run
