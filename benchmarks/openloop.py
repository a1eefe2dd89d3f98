"""Uploads from a C load generator (benchmarks/openloop.c), open loop or closed loop, with loadgen.drive's summary.

    PYTHONPATH=. python benchmarks/openloop.py --url http://127.0.0.1:8000 --path /v1/models/digits-vit/classify \\
        --images DIR --rate 3000 --requests 6000                     # open loop: arrivals on a fixed schedule
    PYTHONPATH=. python benchmarks/openloop.py ... --concurrency 16 --requests 1500 --duration 8 --warmup 32

On 2 shared cores a Python client costs about as much CPU per request as a fast server (httpx: 1.2-1.5 ms), and its
event loop's lag is inside every latency it records; openloop.c costs about 0.02 ms per request closed loop and
0.05 ms open loop (its timer's wake-ups), nearly all of it in the kernel, so the server is what gets measured. It is compiled with `cc -O2` on first use into ~/.cache/vitserve/bench-tools,
keyed by the source's hash (`binary(static=True)`: linked statically, to carry to a machine with no compiler, as
docker/gpu_check.py does). Each request uploads one image file from `--images` (taken in turn) as multipart field
`--field`, as loadgen.py does; the raw HTTP requests are built here, once, and the C program only sends them
(`send` takes requests built elsewhere, such as V2 tensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.artifacts import CACHE
from benchmarks.loadgen import multipart_bodies, percentile, upload_arguments

SOURCE = Path(__file__).with_name("openloop.c")


def binary(*, static: bool = False) -> Path:
    """openloop.c built with `cc -O2` (or $CC) into the benchmark cache, once per version of the source; `static`:
    linked statically (it then runs on any x86-64 Linux, whatever its C library)."""
    source = SOURCE.read_bytes()
    kind = "openloop-static" if static else "openloop"
    target = CACHE / "bench-tools" / f"{kind}-{hashlib.sha256(source).hexdigest()[:12]}"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(
            f"no C compiler: {SOURCE.name} is built with `cc -O2` on first use; install one (apt-get install gcc) "
            "or name it in $CC"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    flags = ["-O2", "-Wall", "-Wextra", *(["-static"] if static else [])]
    done = subprocess.run([compiler, *flags, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {SOURCE} failed:\n{done.stderr[-3000:]}")
    partial.replace(target)  # whole or absent: two benchmarks building at once each rename a complete binary
    return target


def raw_requests(url: str, path: str, images: Path, field: str, params: dict[str, str]) -> list[bytes]:
    """One complete HTTP/1.1 POST (head and multipart body) per image file in `images`, in name order."""
    files = sorted(p for p in images.iterdir() if p.is_file())
    if not files:
        raise ValueError(f"no image files in {images}")
    content_type, bodies = multipart_bodies(files, field)
    where = urlsplit(url)
    target = path + (f"?{urlencode(params)}" if params else "")
    return [
        f"POST {target} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for body in bodies
    ]


def drive(
    url: str,
    path: str,
    images: Path,
    *,
    field: str = "file",
    params: dict[str, str] | None = None,
    concurrency: int = 1,
    rate: float = 0.0,
    requests: int = 1000,
    duration: float = 60.0,
    warmup: int = 20,
    timeout: float = 60.0,
    max_connections: int = 2000,
    raw: bool = False,
) -> dict:
    """openloop.c against `url` + `path`; the summary loadgen.drive returns, and how the schedule was kept.

    Open loop when `rate` is given (`requests` arrivals at `rate` per second, up to `max_connections` connections;
    no warm-up), else a closed loop of `concurrency` (`warmup` untimed requests, then `requests` or `duration`
    seconds). `raw` adds every request's (start s, latency s, status; 0 = no answer)."""
    return send(
        url,
        raw_requests(url, path, images, field, params or {}),
        concurrency=concurrency,
        rate=rate,
        requests=requests,
        duration=duration,
        warmup=warmup,
        timeout=timeout,
        max_connections=max_connections,
        raw=raw,
    )


def send(
    url: str,
    messages: list[bytes],
    *,
    concurrency: int = 1,
    rate: float = 0.0,
    requests: int = 1000,
    duration: float = 60.0,
    warmup: int = 20,
    timeout: float = 60.0,
    max_connections: int = 2000,
    raw: bool = False,
    program: Path | None = None,
) -> dict:
    """`drive` with the complete HTTP requests given (`messages`, taken in turn), from `program` (default: built
    here by `binary`)."""
    where = urlsplit(url)
    with tempfile.TemporaryDirectory(prefix="vitserve-openloop-") as tmp:
        names = []
        for i, request in enumerate(messages):
            names.append(Path(tmp) / f"{i:04d}.http")
            names[-1].write_bytes(request)
        mode = [f"--rate={rate}"] if rate else [f"--concurrency={concurrency}", f"--duration={duration}"]
        command = [
            str(program or binary()),
            f"--host={where.hostname or '127.0.0.1'}",
            f"--port={where.port or 80}",
            *mode,
            f"--requests={requests}",
            f"--warmup={0 if rate else warmup}",
            f"--timeout={timeout}",
            f"--max-connections={max_connections}",
            *map(str, names),
        ]
        sending = requests / rate if rate else warmup * timeout + duration
        limit = sending + timeout + 120  # a hung client is killed, never waited on forever
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"openloop failed ({done.returncode}): {' '.join(command[:8])} ...\n{done.stderr[-3000:]}")
    records, info = parse_output(done.stdout)
    return summary(records, info, concurrency=0 if rate else concurrency, rate=rate, raw=raw)


def parse_output(text: str) -> tuple[list[tuple[float, float, int]], dict[str, str]]:
    """openloop.c's stdout: one "start latency status" line per request, then "# name value" summary lines."""
    records, info = [], {}
    for line in text.splitlines():
        if line.startswith("# "):
            name, value = line[2:].split(" ", 1)
            info[name] = value
        elif line:
            start, latency, status = line.split()
            records.append((float(start), float(latency), int(status)))
    return records, info


def summary(records: list[tuple[float, float, int]], info: dict[str, str], **meta: object) -> dict:
    """loadgen.py's summary keys (counts by status, errors, throughput, percentiles of 200s), plus the schedule."""
    raw = meta.pop("raw")
    statuses = Counter(status for _, _, status in records)
    ok = [latency * 1e3 for _, latency, status in records if status == 200]
    elapsed = float(info["elapsed_s"])
    errors = {name.removeprefix("error_"): int(v) for name, v in info.items() if name.startswith("error_") and v != "0"}
    if info["resent"] != "0":
        errors["resent (stale kept-alive connection)"] = int(info["resent"])
    result: dict = {
        "mode": info["mode"],
        **meta,
        "requests": len(records),
        "ok": len(ok),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "throughput": round(len(ok) / elapsed, 3) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(ok, 50), 2),
        "p95_ms": round(percentile(ok, 95), 2),
        "p99_ms": round(percentile(ok, 99), 2),
        "max_ms": round(max(ok), 2) if ok else float("nan"),
        "connections": {"opened": int(info["connections_opened"]), "max_open": int(info["connections_max"])},
        "client_cpu_s": float(info["cpu_s"]),
    }
    if info["mode"] == "open":
        result["schedule"] = {
            "offered_rate": float(info["offered_rate"]),
            "late_p50_ms": float(info["late_p50_ms"]),
            "late_p99_ms": float(info["late_p99_ms"]),
            "late_max_ms": float(info["late_max_ms"]),
            "waited_for_connection": int(info["waited_for_connection"]),
        }
    if raw:
        result["raw"] = records
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    upload_arguments(parser)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second")
    parser.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight")
    parser.add_argument("--max-connections", type=int, default=2000, help="open loop: connections at most")
    parser.add_argument("--duration", type=float, default=60.0, help="closed loop: timed seconds at most")
    parser.add_argument("--warmup", type=int, default=20, help="closed loop: untimed requests first")
    args = parser.parse_args()
    result = drive(
        args.url,
        args.path,
        args.images,
        field=args.field,
        params=dict(p.split("=", 1) for p in args.param),
        concurrency=args.concurrency,
        rate=args.rate,
        requests=args.requests,
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        max_connections=args.max_connections,
        raw=args.raw,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
