"""What the SDK costs per call over plain httpx: median latency of `classify`, interleaved, on one server.

    PYTHONPATH=.:client python benchmarks/client_overhead.py                # serves models/ on a free port
    PYTHONPATH=.:client python benchmarks/client_overhead.py --url http://127.0.0.1:8000 --calls 500

Both sides send the same PNG bytes of a held-out digit canvas over one kept-alive connection and parse the
JSON answer; the SDK adds building the upload, the retry loop and the pydantic models. A third column times
the SDK with a numpy array, which adds the PNG encoding.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
try:
    from vitserve_client import Client
except ImportError:  # run from the checkout without client/ on PYTHONPATH
    sys.path.insert(0, str(ROOT / "client"))
    from vitserve_client import Client


@contextmanager
def served(url: str | None) -> Iterator[str]:
    """The given URL, or a fresh `python -m service` on a free loopback port for the duration."""
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VITSERVE_PORT": str(port), "VITSERVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"server at {url} not ready after 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def digit() -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from model_export.digits import held_out_set

    return held_out_set().images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant (default: 200)")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    array = digit()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()

    with served(args.url) as url, httpx.Client(base_url=url, timeout=30) as http, Client(url) as sdk:

        def plain() -> None:
            response = http.post("/v1/classify", params={"top_k": 5}, files={"file": ("digit.png", data, "image/png")})
            response.raise_for_status()
            response.json()

        variants: dict[str, Callable[[], object]] = {
            "httpx": plain,
            "sdk (bytes)": lambda: sdk.classify(data),
            "sdk (numpy)": lambda: sdk.classify(array),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.warmup + args.calls):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate, so no variant always goes first
                started = time.perf_counter()
                variants[name]()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - started)

    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{args.calls} classify calls per variant, interleaved, server {url}")
    for name, median in medians.items():
        print(f"  {name:<12} median {median:7.3f} ms")
    base = medians["httpx"]
    for name in ("sdk (bytes)", "sdk (numpy)"):
        print(f"  {name:<12} / httpx = {medians[name] / base:.3f}  ({(medians[name] - base) * 1e3:+.0f} us per call)")


if __name__ == "__main__":
    main()
