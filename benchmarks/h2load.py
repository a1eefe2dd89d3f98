"""Closed-loop load from Debian's `h2load` (apt package nghttp2-client), and the requests it sends.

    python benchmarks/h2load.py --url http://127.0.0.1:8000/v2/models/digits-vit/infer --body request.bin \\
        -H 'Inference-Header-Content-Length: 244' -H 'Content-Type: application/octet-stream' \\
        --connections 64 --duration 10 --warmup 2

h2load is a C client: on a 2-core machine a Python client costs as much CPU per request as a fast server does,
so it would measure itself. `run()` holds `connections` HTTP/1.1 connections (`--h1`), each sending the next
request as soon as the previous answer arrives, for `warmup` untimed seconds and then `duration` timed ones.
h2load sends the same body every time, which is what a server's per-request cost is measured with.

Throughput counts 2xx answers in the timed window; latency percentiles come from h2load's per-request log
(`--log-file`: start, status, microseconds until the end of the answer), since its report has only
min/max/mean/sd. When given the server's CPU clock (`cpu`, e.g. `Server.cpu_seconds`), `run()` samples it when
the timed window starts and when h2load exits, and reports the server's CPU milliseconds per answered request.

The requests (`Request`): Open Inference Protocol (V2) bodies with the binary tensor extension (an `image`
BYTES tensor of encoded images or an FP32 `pixel_values` tensor, outputs asked for in binary), and
multipart/form-data uploads.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.loadgen import multipart_body, percentile
from service.v2.codec import HEADER_LENGTH, NUMPY_TYPES, encode_bytes_elements
from service.v2.core import DEFAULT_OUTPUTS, IMAGE_INPUT
from vit_artifact.metadata import INPUT_NAME

H2LOAD = "h2load"


@dataclass(frozen=True)
class Request:
    """A pre-built request: h2load POSTs `body` to `path` with `headers`, the same bytes every time."""

    path: str
    body: bytes
    headers: dict[str, str]


def v2_request(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> Request:
    """One binary input tensor; the default outputs (logits, probabilities) asked for in binary too."""
    header = json.dumps(
        {
            "inputs": [
                {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": out, "parameters": {"binary_data": True}} for out in DEFAULT_OUTPUTS],
        }
    ).encode()
    return Request(
        f"/v2/models/{model}/infer",
        header + raw,
        {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"},
    )


def v2_image(model: str, image: bytes) -> Request:
    """An encoded image as a BYTES `image` tensor of shape [1, 1]: the batch dimension and one element per row,
    the shape a batched Triton model with `dims: [1]` takes, and vitserve reads as one image."""
    return v2_request(model, IMAGE_INPUT, "BYTES", [1, 1], encode_bytes_elements([image]))


def v2_pixels(model: str, pixels: np.ndarray) -> Request:
    """Model-ready pixels (N, 3, H, W) as an FP32 `pixel_values` tensor."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return v2_request(model, INPUT_NAME, "FP32", list(pixels.shape), pixels.tobytes())


def multipart(path: str, filename: str, data: bytes, field: str) -> Request:
    boundary = uuid.uuid4().hex
    return Request(
        path,
        multipart_body(filename, data, field, boundary),
        {"content-type": f"multipart/form-data; boundary={boundary}"},
    )


def v2_outputs(content: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """A V2 response's numeric outputs by name, JSON or binary (to check that two servers answer alike)."""
    cut = int(header_length) if header_length else len(content)
    header, binary = json.loads(content[:cut]), content[cut:]
    outputs, offset = {}, 0
    for out in header["outputs"]:
        dtype = NUMPY_TYPES[out["datatype"]]
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            values = np.asarray(out["data"], dtype=dtype)
        else:
            values = np.frombuffer(binary[offset : offset + size], dtype=dtype)
            offset += size
        outputs[out["name"]] = values.reshape(out["shape"])
    return outputs


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_STATUSES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def run(
    url: str,
    request: Request,
    *,
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    cpu: Callable[[], float] | None = None,
) -> dict:
    """h2load against `url` + `request.path` for `warmup` + `duration` seconds; one summary dict."""
    if shutil.which(H2LOAD) is None:
        raise RuntimeError("h2load is not installed: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="vitserve-h2load-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "body").write_bytes(request.body)
        log = tmp / "requests.tsv"
        command = [
            H2LOAD,
            "--h1",
            f"--clients={connections}",
            f"--duration={round(duration * 1000)}ms",  # h2load takes whole units only
            f"--warm-up-time={round(warmup * 1000)}ms",
            f"--data={tmp / 'body'}",
            f"--log-file={log}",
            *(f"--header={k}: {v}" for k, v in request.headers.items()),
            url + request.path,
        ]
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # h2load connects at once and starts its timed window `warmup` seconds later: sample the server's
        # clock then, so the CPU per request covers the timed window only.
        time.sleep(warmup)
        cpu_before = cpu() if cpu else 0.0
        try:
            output, _ = process.communicate(timeout=warmup + duration + 120)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            raise RuntimeError(f"h2load did not finish:\n{output[-3000:]}") from None
        cpu_after = cpu() if cpu else 0.0
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            raise RuntimeError(f"h2load failed ({process.returncode}): {' '.join(command)}\n{output[-3000:]}")
        records = [line.split("\t") for line in log.read_text().splitlines() if line]
    ok = [int(us) / 1e3 for _, status, us in records if 200 <= int(status) < 300]
    counts = _REQUESTS.search(output)
    statuses = _STATUSES.search(output)
    if counts is None or statuses is None:
        raise RuntimeError(f"unexpected h2load output:\n{output[-3000:]}")
    client_cpu = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    summary = {
        "connections": connections,
        "duration_s": duration,
        "requests": int(counts[3]),
        "ok": len(ok),
        "failed": int(counts[5]),
        "errored": int(counts[6]),
        "statuses": dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, statuses.groups()), strict=True)),
        "throughput": round(len(ok) / duration, 2),
        "p50_ms": round(percentile(ok, 50), 2),
        "p90_ms": round(percentile(ok, 90), 2),
        "p99_ms": round(percentile(ok, 99), 2),
        "max_ms": round(max(ok), 2) if ok else float("nan"),
        "client_cpu_ms_per_request": round(client_cpu * 1e3 / max(len(records), 1), 3),
    }
    if cpu:
        summary["server_cpu_s"] = round(cpu_after - cpu_before, 3)
        summary["server_cpu_ms_per_image"] = round((cpu_after - cpu_before) * 1e3 / max(len(ok), 1), 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="full URL to POST to")
    parser.add_argument("--body", required=True, type=Path, help="file sent as every request's body")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="NAME: VALUE")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="timed seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    request = Request("", args.body.read_bytes(), {k.strip(): v.strip() for k, v in headers.items()})
    summary = run(args.url, request, connections=args.connections, duration=args.duration, warmup=args.warmup)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
