"""Soak: a long mixed load over loopback; no unexpected error, honest 503s, and memory that stays put.

    PYTHONPATH=. python benchmarks/soak.py                               # 20,000 requests, 64 clients
    PYTHONPATH=. python benchmarks/soak.py --requests 1500 --concurrency 32 --env VITSERVE_MAX_QUEUE_SIZE=16 --env VITSERVE_MAX_BATCH_FILES=8
    PYTHONPATH=. python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234   # a server already running

Starts `python -m service` on the default model (unless `--url`), then `--concurrency` closed-loop clients send
`--requests` requests in all, a fixed shuffled mix (`MIX`): classify (raw and multipart), attention (JSON, PNG
overlay, one layer and head), batches of 2-8 images, Open Inference Protocol (JSON pixels, binary and base64
images, attention outputs), and bad inputs (undecodable, refused format, bad query, unknown model, an image
claiming 48 megapixels, a malformed V2 request), each with the statuses it may get.

Checks (each failure is a line in `problems`; exit status 1 if any):
- every answer is one its request may get, or 503 `overloaded` with `Retry-After`; no other 5xx, no timeout,
  no dropped connection, and every 200 carries what it should (predictions, one result per batch file, ...);
- the 503s are the server's two overload refusals and nothing else: the model's queue was full
  (`vitserve_rejected_total`, one count per image turned away, so a batch can count several) or
  VITSERVE_MAX_CONCURRENT_REQUESTS was reached (`vitserve_http_refused_total{reason="concurrency"}`, one count
  per request); the counters moved if and only if 503s were seen, and agree with their number;
- the server's resident memory (VmRSS of /proc/<pid>/status, sampled every 0.2 s): its peak over the last 10%
  of requests is within `--max-growth` (10%) of its peak over the first half; a leak climbs through the second
  half, so the end of the run is where it shows, while the working set of a server that admits every request
  its latency budget allows (images of up to `--concurrency` requests at once, allocator arenas per thread)
  levels off only after the first tenth.
Prints a summary and writes benchmarks/results/soak.json (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import servers
from benchmarks.loadgen import percentile

RESULTS = Path(__file__).parent / "results"
MODEL = "digits-vit"
WARMUP_FRACTION = 0.5  # the working set levels off within it (see `_memory`)
END_FRACTION = 0.1  # the end of the run, where a leak shows
OVERLOAD_WORDS = re.compile(r"requests queued|requests in progress")  # the two Overloaded messages
RSS_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Call:
    """One request of the mix: what to send, the statuses it may get, and a check of a 200's body."""

    kind: str
    method: str
    path: str
    expect: frozenset[int]
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    check: Callable[[httpx.Response], bool] | None = None


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _has(key: str, count: int | None = None) -> Callable[[httpx.Response], bool]:
    def check(response: httpx.Response) -> bool:
        value = response.json().get(key)
        return bool(value) and (count is None or len(value) == count)

    return check


def _is_png(response: httpx.Response) -> bool:
    return response.headers.get("content-type") == "image/png" and response.content.startswith(b"\x89PNG")


def _v2_outputs(*names: str) -> Callable[[httpx.Response], bool]:
    def check(response: httpx.Response) -> bool:
        return [o["name"] for o in response.json()["outputs"]] == list(names)

    return check


def build_mix(info: dict[str, Any], seed: int = 0) -> list[Call]:
    """The calls of one round of the mix (100 calls), for the model described by `GET /v1/models/{name}`."""
    rng = np.random.default_rng(seed)
    height, width = info["input_size"]
    pngs = [
        _encode(Image.fromarray(rng.integers(0, 256, (height * s, width * s, 3), dtype=np.uint8))) for s in (1, 1, 2, 3)
    ]
    jpeg = _encode(Image.open(io.BytesIO(pngs[3])).convert("RGB"), "JPEG")
    pixels = rng.standard_normal((1, 3, height, width)).astype(np.float32)
    named = f"/v1/models/{info['name']}"
    infer = f"/v2/models/{info['name']}/infer"
    ok = frozenset({200})

    def raw(data: bytes, kind: str = "image/png") -> dict[str, Any]:
        return {"content": data, "headers": {"content-type": kind}}

    def v2_json(body: dict[str, Any]) -> dict[str, Any]:
        return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}

    image_b64 = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(pngs[0]).decode()]}
    binary_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(pngs[1])},
                }
            ]
        }
    ).encode()
    batch = [("files", (f"{i}.png", pngs[i % len(pngs)], "image/png")) for i in range(8)]
    claiming_48_megapixels = _encode(Image.new("1", (8000, 6000)))  # a few kB: 1-bit, all zero

    mix: list[tuple[int, Call]] = [
        # (calls per 100, call)
        (17, Call("classify", "POST", "/v1/classify", ok, {"top_k": 3}, **raw(pngs[0]), check=_has("predictions"))),
        (8, Call("classify-jpeg", "POST", f"{named}/classify", ok, **raw(jpeg, "image/jpeg"), check=_has("predictions"))),
        (9, Call("classify-multipart", "POST", "/v1/classify", ok, files=[("file", ("a.png", pngs[2], "image/png"))], check=_has("predictions"))),
        (9, Call("attention", "POST", "/v1/attention", ok, **raw(pngs[1]), check=_has("map", info["grid"]["height"]))),
        (4, Call("attention-layer-head", "POST", "/v1/attention", ok, {"method": "layer", "layer": -1, "head": 0}, **raw(pngs[2]), check=_has("map"))),
        (5, Call("attention-png", "POST", "/v1/attention", ok, {"format": "png", "alpha": 0.6}, **raw(pngs[3]), check=_is_png)),
        (6, Call("batch-2", "POST", "/v1/classify/batch", ok, files=batch[:2], check=_has("results", 2))),
        (4, Call("batch-8", "POST", f"{named}/classify/batch", ok, files=batch, check=_has("results", 8))),
        (8, Call("v2-json-pixels", "POST", infer, ok, **v2_json({"inputs": [{"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.reshape(-1).tolist()}]}), check=_v2_outputs("logits", "probabilities"))),
        (6, Call("v2-binary-image", "POST", infer, ok, content=binary_header + struct.pack("<I", len(pngs[1])) + pngs[1], headers={"inference-header-content-length": str(len(binary_header))}, check=_v2_outputs("logits", "probabilities"))),
        (5, Call("v2-base64-attention", "POST", infer, ok, **v2_json({"inputs": [image_b64], "outputs": [{"name": "attention_rollout"}, {"name": "logits", "parameters": {"classification": 3}}]}), check=_v2_outputs("attention_rollout", "logits"))),
        (3, Call("bad-image", "POST", "/v1/classify", frozenset({400}), **raw(b"%PDF-1.4 not an image"))),
        (2, Call("bad-format", "POST", "/v1/classify", frozenset({415}), **raw(_encode(Image.new("RGB", (8, 8)), "TGA")))),
        (3, Call("bad-query", "POST", "/v1/attention", frozenset({422}), {"discard_ratio": "nan"}, **raw(pngs[0]))),
        (2, Call("bad-model", "POST", "/v1/models/missing/classify", frozenset({404}), **raw(pngs[0]))),
        (3, Call("bad-too-many-pixels", "POST", "/v1/classify", frozenset({413}), **raw(claiming_48_megapixels))),
        (3, Call("bad-v2", "POST", infer, frozenset({400}), **v2_json({"inputs": [{"name": "pixel_values", "shape": [1, 3, 7, 7], "datatype": "FP32", "data": [0.0] * 147}]}))),
        (3, Call("metadata", "GET", named, ok, check=_has("labels"))),
    ]  # fmt: skip
    calls = [call for count, call in mix for _ in range(count)]
    assert len(calls) == 100, len(calls)
    random.Random(seed).shuffle(calls)
    return calls


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no answer (timeout, dropped connection)
    latency_s: float
    problem: str | None = None  # why the answer was wrong, if it was
    overloaded: bool = False  # 503 overloaded, with Retry-After


async def send(client: httpx.AsyncClient, call: Call) -> Outcome:
    started = time.perf_counter()
    try:
        response = await client.request(
            call.method, call.path, params=call.params, content=call.content, headers=call.headers, files=call.files
        )
    except httpx.HTTPError as e:
        return Outcome(call.kind, 0, time.perf_counter() - started, f"no answer: {type(e).__name__}: {e}")
    latency = time.perf_counter() - started
    status = response.status_code
    if status == 503:
        error = response.json().get("error")
        # /v1 names the code; /v2 bodies carry only the message, which says which limit was hit
        overload = error.get("code") == "overloaded" if isinstance(error, dict) else OVERLOAD_WORDS.search(str(error))
        if overload:
            if response.headers.get("retry-after") is None:
                return Outcome(call.kind, status, latency, "503 overloaded without Retry-After")
            return Outcome(call.kind, status, latency, overloaded=True)
        return Outcome(call.kind, status, latency, f"503 that is not 'overloaded': {response.text[:200]}")
    if status not in call.expect:
        return Outcome(call.kind, status, latency, f"{status}, expected {sorted(call.expect)}: {response.text[:200]}")
    if status == 200 and call.check is not None and not call.check(response):
        return Outcome(call.kind, status, latency, f"200 with an unexpected body: {response.text[:200]}")
    return Outcome(call.kind, status, latency)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` (VmRSS of /proc/<pid>/status), MiB."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def refusals(url: str) -> tuple[float, float]:
    """(images turned away by batchers: full queues or adaptive admission; requests refused before routing at the
    fixed or the adaptive concurrency limit), from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def total(pattern: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{pattern} (\S+)$", text, re.MULTILINE))

    return total(r"vitserve_rejected_total\{[^}]*\}"), total(
        r'vitserve_http_refused_total\{reason="(?:concurrency|adaptive)"\}'
    )


@dataclass
class SoakResult:
    url: str
    requests: int
    concurrency: int
    elapsed_s: float
    throughput_rps: float
    statuses: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    overloaded_503: int
    rejected_total_delta: float  # images turned away by a full queue
    refused_concurrency_delta: float  # requests refused at VITSERVE_MAX_CONCURRENT_REQUESTS
    problems: list[str]
    latency_ms: dict[str, float]
    rss_mb: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_soak(
    url: str,
    *,
    pid: int | None,
    requests: int = 20_000,
    concurrency: int = 64,
    max_growth: float = 0.10,
    timeout_s: float = 60.0,
    seed: int = 0,
) -> SoakResult:
    """Drive the server at `url` (its process `pid`, for memory) and check everything the module says."""
    info = httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()
    mix = build_mix(info, seed)
    outcomes: list[Outcome] = []
    before = refusals(url)

    samples: list[tuple[int, float]] = []  # (requests answered so far, server RSS MiB)

    async def sample_memory() -> None:
        while pid is not None:
            samples.append((len(outcomes), rss_mb(pid)))
            await asyncio.sleep(RSS_INTERVAL_S)

    async def drive() -> float:
        # One client (one connection) per worker: httpx's shared pool would set the pace at 64 connections.
        clients = [httpx.AsyncClient(base_url=url, timeout=timeout_s) for _ in range(concurrency)]
        budget = iter(range(requests))

        async def worker(client: httpx.AsyncClient) -> None:
            for i in budget:
                outcomes.append(await send(client, mix[i % len(mix)]))

        sampler = asyncio.create_task(sample_memory())
        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker(c) for c in clients))
        finally:
            sampler.cancel()
            for c in clients:
                await c.aclose()
        return time.perf_counter() - started

    elapsed = asyncio.run(drive())
    if pid is not None:
        samples.append((len(outcomes), rss_mb(pid)))
    after = refusals(url)
    rejected, refused = after[0] - before[0], after[1] - before[1]

    problems = [f"{o.kind}: {o.problem}" for o in outcomes if o.problem]
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    overloaded = sum(o.overloaded for o in outcomes)
    queue_full = overloaded - refused  # the 503s the concurrency limit does not account for
    if queue_full < 0 or (queue_full > 0) != (rejected > 0) or rejected < queue_full:
        shown.append(
            f"{overloaded} responses were 503 overloaded, but the counters moved by {rejected:g} "
            f"(vitserve_rejected_total) and {refused:g} (vitserve_http_refused_total, concurrency)"
        )
    rss = _memory(samples, requests, max_growth, shown)
    by_kind: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[str(o.status)] += 1
    served = [o.latency_s * 1e3 for o in outcomes if o.status == 200]
    return SoakResult(
        url=url,
        requests=len(outcomes),
        concurrency=concurrency,
        elapsed_s=round(elapsed, 2),
        throughput_rps=round(len(outcomes) / elapsed, 1),
        statuses=dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        by_kind={k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        overloaded_503=overloaded,
        rejected_total_delta=rejected,
        refused_concurrency_delta=refused,
        problems=shown,
        latency_ms={f"p{q}": round(percentile(served, q), 2) for q in (50, 95, 99)}
        | {"max": round(max(served, default=0), 2)},
        rss_mb=rss,
    )


def _memory(samples: list[tuple[int, float]], requests: int, max_growth: float, problems: list[str]) -> dict[str, Any]:
    """Peak RSS over the first half of the requests (warm-up: the working set levelling off) against the peak over
    the last 10%."""

    def peak(low: float, high: float) -> float:  # MiB, over the samples taken between these request counts
        return max((mb for answered, mb in samples if low <= answered <= high), default=float("nan"))

    baseline = peak(0, requests * WARMUP_FRACTION)
    final = peak(requests * (1 - END_FRACTION), requests)
    if not baseline > 0 or not final > 0:  # NaN: no sample in one of the two windows
        problems.append(f"too few RSS samples ({len(samples)}) to compare warm-up and end")
        return {}
    growth = (final - baseline) / baseline
    if growth > max_growth:
        problems.append(
            f"RSS grew {growth:.1%} after warm-up ({baseline:.1f} -> {final:.1f} MiB); the bound is {max_growth:.0%}"
        )
    return {
        "start": round(samples[0][1], 1),
        "after_warmup": round(baseline, 1),
        "end": round(final, 1),
        "peak": round(max(mb for _, mb in samples), 1),
        "growth_pct": round(100 * growth, 2),
        "samples": len(samples),
        # the peak in each tenth of the run: a leak climbs through these, a warm-up levels off
        "by_tenth": [round(peak(i * requests / 10, (i + 1) * requests / 10), 1) for i in range(10)],
    }


def summary(result: SoakResult) -> str:
    rss = result.rss_mb
    lines = [
        f"soak: {result.requests} requests at concurrency {result.concurrency} in {result.elapsed_s:.1f} s "
        f"({result.throughput_rps:.0f} req/s); statuses {result.statuses}",
        f"  503 overloaded: {result.overloaded_503} (vitserve_rejected_total +{result.rejected_total_delta:g}, "
        f"vitserve_http_refused_total{{concurrency}} +{result.refused_concurrency_delta:g}); "
        f"latency of 200s p50 {result.latency_ms['p50']} ms, p99 {result.latency_ms['p99']} ms",
    ]
    if rss:
        lines.append(
            f"  server RSS: {rss['start']} MiB at start, {rss['after_warmup']} after warm-up, {rss['end']} at the end "
            f"(growth {rss['growth_pct']:+.2f}%), peak {rss['peak']}; peak by tenth of the run {rss['by_tenth']}"
        )
    for kind, statuses in result.by_kind.items():
        lines.append(f"    {kind:24s} {statuses}")
    lines.append("  problems: none" if result.ok else "  problems:\n    " + "\n    ".join(result.problems))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth after warm-up (0.10: 10%%)")
    parser.add_argument("--url", help="a running server (default: start one on the default model)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--env", action="append", default=[], help="VITSERVE_X=value for the server started here")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.env)

    if args.url:
        result = run_soak(
            args.url, pid=args.pid, requests=args.requests, concurrency=args.concurrency, max_growth=args.max_growth
        )
    else:
        log = Path(tempfile.gettempdir()) / f"vitserve-soak-{os.getpid()}.log"
        server = servers.vitserve(servers.ROOT / "models", MODEL, log)
        server.env.update(settings)
        with server:
            assert server.process is not None
            result = run_soak(
                server.url,
                pid=server.process.pid,
                requests=args.requests,
                concurrency=args.concurrency,
                max_growth=args.max_growth,
            )
        tracebacks = log.read_text().count("Traceback")
        if tracebacks:
            result.problems.append(f"the server logged {tracebacks} tracebacks (see {log})")
    result.settings = settings
    print(summary(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(result), "ok": result.ok}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
