"""A load generator for image-classification servers: asyncio + httpx, in a process of its own.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --path /v1/models/digits-vit/classify \\
        --images DIR --concurrency 16 --requests 2000 --duration 15 --warmup 50

A closed loop of `--concurrency` workers: each sends a request, waits for its answer, sends the next, until
`--requests` answers or `--duration` seconds, whichever comes first, after `--warmup` untimed requests. Open-loop
arrivals (a fixed schedule, whatever the server does) come from benchmarks/openloop.c, a C client that costs the
shared CPU far less than Python would.

Each request uploads one image file from `--images` (taken in turn) as multipart field `--field`. The multipart
bodies are built once, up front, so the client spends its CPU on HTTP and not on encoding. Prints one JSON
object: counts by status, throughput, latency percentiles, and (with `--timings`) the medians of the server's
`timings` fields; `--raw` adds every request's (start, latency, status).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

TIMING_FIELDS = ("decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "batch_size", "total_ms")


def multipart_bodies(images: list[Path], field: str) -> tuple[str, list[bytes]]:
    boundary = uuid.uuid4().hex
    bodies = [multipart_body(path.name, path.read_bytes(), field, boundary) for path in images]
    return f"multipart/form-data; boundary={boundary}", bodies


def multipart_body(filename: str, data: bytes, field: str, boundary: str) -> bytes:
    """One file as the only part of a multipart/form-data body."""
    media = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {media}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        images = sorted(p for p in Path(args.images).iterdir() if p.is_file())
        if not images:
            raise SystemExit(f"no image files in {args.images}")
        self.content_type, self.bodies = multipart_bodies(images, args.field)
        self.sent = 0
        self.records: list[tuple[float, float, int]] = []  # (start offset s, latency s, status; 0 = no answer)
        self.errors: Counter[str] = Counter()
        self.timings: dict[str, list[float]] = {k: [] for k in TIMING_FIELDS}
        self.origin = 0.0

    async def one(self, client: httpx.AsyncClient, timed: bool) -> None:
        body = self.bodies[self.sent % len(self.bodies)]
        self.sent += 1
        started = time.perf_counter()
        try:
            response = await client.post(
                self.args.path, content=body, headers={"content-type": self.content_type}, params=self.args.params
            )
            status = response.status_code
        except httpx.TimeoutException:
            status, response = 0, None
            self.errors["timeout"] += 1
        except httpx.TransportError as e:
            status, response = 0, None
            self.errors[type(e).__name__] += 1
        latency = time.perf_counter() - started
        if not timed:
            return
        self.records.append((started - self.origin, latency, status))
        if self.args.timings and response is not None and status == 200:
            answer = response.json()
            reported = answer.get("timings", {}) if isinstance(answer, dict) else {}
            for key in TIMING_FIELDS:
                if key in reported:
                    self.timings[key].append(float(reported[key]))

    def client(self, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.args.url,
            timeout=httpx.Timeout(self.args.timeout, connect=self.args.timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def closed(self) -> float:
        # One client (one connection) per worker: httpx's shared pool costs time that grows with its size, and
        # at 64 connections the client, not the server, would set the pace.
        clients = [self.client(1) for _ in range(self.args.concurrency)]
        try:
            warm = iter(range(self.args.warmup))

            async def warm_worker(client: httpx.AsyncClient) -> None:
                for _ in warm:
                    await self.one(client, timed=False)

            await asyncio.gather(*(warm_worker(c) for c in clients))
            self.origin = time.perf_counter()
            stop_at = self.origin + self.args.duration
            budget = iter(range(self.args.requests))

            async def worker(client: httpx.AsyncClient) -> None:
                for _ in budget:
                    if time.perf_counter() >= stop_at:
                        return
                    await self.one(client, timed=True)

            await asyncio.gather(*(worker(c) for c in clients))
            return time.perf_counter() - self.origin
        finally:
            for c in clients:
                await c.aclose()

    def summary(self, elapsed: float) -> dict:
        statuses = Counter(status for _, _, status in self.records)
        ok = [latency * 1e3 for _, latency, status in self.records if status == 200]
        result: dict = {
            "concurrency": self.args.concurrency,
            "requests": len(self.records),
            "ok": len(ok),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors": dict(self.errors),
            "elapsed_s": round(elapsed, 3),
            "throughput": round(len(ok) / elapsed, 3) if elapsed > 0 else 0.0,
            "p50_ms": round(percentile(ok, 50), 2),
            "p95_ms": round(percentile(ok, 95), 2),
            "p99_ms": round(percentile(ok, 99), 2),
            "max_ms": round(max(ok), 2) if ok else float("nan"),
        }
        if self.args.timings:
            result["server_timings_median"] = {k: round(statistics.median(v), 3) for k, v in self.timings.items() if v}
        if self.args.raw:
            result["raw"] = [(round(t, 5), round(latency, 5), status) for t, latency, status in self.records]
        return result


def drive(
    url: str,
    path: str,
    images: Path,
    *,
    field: str = "file",
    concurrency: int = 1,
    requests: int = 1000,
    duration: float = 60.0,
    warmup: int = 20,
    timeout: float = 60.0,
    timings: bool = False,
    raw: bool = False,
) -> dict:
    """Run this file as a separate process (its own event loop and interpreter) and return its summary."""
    command = [
        sys.executable,
        __file__,
        f"--url={url}",
        f"--path={path}",
        f"--images={images}",
        f"--field={field}",
        f"--concurrency={concurrency}",
        f"--requests={requests}",
        f"--duration={duration}",
        f"--warmup={warmup}",
        f"--timeout={timeout}",
        *(["--timings"] if timings else []),
        *(["--raw"] if raw else []),
    ]
    limit = warmup * timeout + duration + timeout + 120  # a hung client is killed, never waited on forever
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def upload_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments both load generators take (this one and benchmarks/openloop.py): where to
    upload which images, how many, and what to report."""
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", required=True, help="route to POST each image to")
    parser.add_argument("--images", required=True, type=Path, help="directory of image files to upload, in turn")
    parser.add_argument("--field", default="file", help="multipart field name (default: file)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="query parameter")
    parser.add_argument("--requests", type=int, default=1000, help="timed requests at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as hung")
    parser.add_argument("--raw", action="store_true", help="include every request's (start, latency, status)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    upload_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=1, help="concurrent workers")
    parser.add_argument("--duration", type=float, default=60.0, help="timed seconds at most")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    parser.add_argument("--timings", action="store_true", help="collect the server's `timings` fields")
    args = parser.parse_args()
    args.params = dict(p.split("=", 1) for p in args.param)
    load = Load(args)
    run: Callable[[Coroutine[Any, Any, float]], float] = asyncio.run
    try:  # a faster event loop leaves more of the shared CPU to the server under test
        import uvloop

        run = uvloop.run
    except ImportError:
        pass
    elapsed = run(load.closed())
    print(json.dumps(load.summary(elapsed)))


if __name__ == "__main__":
    main()
