"""Latency at concurrency 1: classify and attention, the default model and ViT-B/16, over HTTP.

    PYTHONPATH=. python benchmarks/latency.py [--requests 40] [--vit-requests 12]

One request at a time (no batching can help), classify and attention (JSON rollout) interleaved so machine
noise hits both alike; medians and p95 of the client-measured time, with the server's own breakdown (decode,
preprocess, queue, inference). Writes benchmarks/results/latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.artifacts import digit_uploads, photo_uploads, vit_b16_repository
from benchmarks.servers import vitserve
from tests.conftest import MODELS

RESULTS = Path(__file__).parent / "results"
ROUTES = {"classify": "classify", "attention": "attention"}


def measure(url: str, model: str, uploads: list[bytes], count: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {r: [] for r in ROUTES}
    server: dict[str, list[dict]] = {r: [] for r in ROUTES}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(count + 2):  # the first two are warm-up
            for route in ROUTES:
                data = uploads[i % len(uploads)]
                t0 = time.perf_counter()
                r = client.post(f"/v1/models/{model}/{route}", content=data, headers={"content-type": "image/jpeg"})
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                if i >= 2:
                    samples[route].append(elapsed * 1e3)
                    server[route].append(r.json()["timings"])
    out = {}
    for route, values in samples.items():
        values.sort()
        parts = {
            k: statistics.median(t[k] for t in server[route])
            for k in ("decode_ms", "preprocess_ms", "queue_ms", "inference_ms")
        }
        out[route] = {
            "median_ms": round(statistics.median(values), 2),
            "p95_ms": round(values[min(len(values) - 1, int(0.95 * len(values)))], 2),
            **{k: round(v, 2) for k, v in parts.items()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="per route, default model")
    parser.add_argument("--vit-requests", type=int, default=12, help="per route, ViT-B/16")
    args = parser.parse_args()
    vit = vit_b16_repository()
    cases = [
        ("digits-vit (32x32)", MODELS, "digits-vit", digit_uploads(), args.requests),
        ("ViT-B/16 FP32 (224x224, 640 px JPEGs)", vit.directory, vit.fp32, photo_uploads(), args.vit_requests),
        ("ViT-B/16 INT8", vit.directory, vit.int8, photo_uploads(), args.vit_requests),
    ]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, directory, model, uploads, count in cases:
            with vitserve(directory, model, Path(tmp) / f"{model}.log") as server:
                rows[label] = measure(server.url, model, uploads, count)
    lines = [
        "| model | route | median ms | p95 ms | decode | preprocess | queue | inference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, routes in rows.items():
        for route, m in routes.items():
            lines.append(
                f"| {label} | {route} | {m['median_ms']} | {m['p95_ms']} | {m['decode_ms']} | "
                f"{m['preprocess_ms']} | {m['queue_ms']} | {m['inference_ms']} |"
            )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "latency.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
