"""V2 over gRPC against V2 over REST (binary tensors, and JSON), one server, the same images, side by side.

    PYTHONPATH=. python benchmarks/grpc_rest.py [--vit-b16] [--duration 10] [--connections 16]

One vitserve process serves HTTP and gRPC (`VITSERVE_GRPC_PORT`). For each input (`image`: one PNG/JPEG as
BYTES; `pixels`: one preprocessed FP32 image) and each transport, a closed loop of `--connections` clients
runs `--warmup` untimed then `--duration` timed seconds, in a process apart from the server: REST by h2load (C,
benchmarks/h2load.py), gRPC by tritonclient.grpc.aio (`ghz` is on neither PyPI nor Debian), one channel per
client, in this script's `--client` mode. A Python client costs more CPU per call than h2load, which on a small
machine takes CPU from the server, so the table shows the server's CPU per image (all its processes, from
/proc) beside throughput: that ratio is the transport's cost, whatever the client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import artifacts, h2load, servers
from benchmarks.loadgen import percentile
from service.v2.core import IMAGE_INPUT
from vit_artifact.metadata import INPUT_NAME, read_metadata
from vit_artifact.preprocessing import preprocess_batch

RESULTS = Path(__file__).parent / "results"


def json_request(model: str, name: str, datatype: str, shape: list[int], data: list) -> h2load.Request:
    body = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}).encode()
    return h2load.Request(f"/v2/models/{model}/infer", body, {"content-type": "application/json"})


def grpc_load(
    url: str, model: str, kind: str, payload: bytes, connections: int, duration: float, warmup: float
) -> dict:
    """The `--client` side: `connections` closed loops of ModelInfer (raw contents, as tritonclient sends)."""
    import tritonclient.grpc.aio as aioclient

    async def main() -> dict:
        clients = [aioclient.InferenceServerClient(url) for _ in range(connections)]
        if kind == "image":
            value, name, datatype = np.array([payload], dtype=np.object_), IMAGE_INPUT, "BYTES"
        else:
            value, name, datatype = np.load(_bytes_file(payload)), INPUT_NAME, "FP32"
        latencies: list[float] = []
        failed = 0
        start = time.monotonic()
        timed_from, until = start + warmup, start + warmup + duration

        async def loop(client: aioclient.InferenceServerClient) -> None:
            nonlocal failed
            tensor = aioclient.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            while (now := time.monotonic()) < until:
                try:
                    await client.infer(model, [tensor])
                except Exception:
                    failed += 1
                    continue
                if now >= timed_from:
                    latencies.append((time.monotonic() - now) * 1e3)

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(loop(c) for c in clients))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        for c in clients:
            await c.close()
        cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
        return {"ok": len(latencies), "failed": failed, "cpu_s": cpu, "latencies": latencies}

    return asyncio.run(main())


def _bytes_file(payload: bytes):  # np.load wants a file
    import io

    return io.BytesIO(payload)


def run_grpc(server: servers.Server, grpc_url: str, model: str, kind: str, payload: bytes, args) -> dict:
    command = [sys.executable, __file__, "--client", grpc_url, model, kind, str(args.connections)]
    command += [str(args.duration), str(args.warmup)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(payload)
    process.stdin.close()
    time.sleep(args.warmup)  # sample the server's CPU when the timed window starts, as h2load.run does
    cpu_before = server.cpu_seconds()
    assert process.stdout is not None
    out = json.loads(process.stdout.read())
    cpu_after = server.cpu_seconds()
    process.wait()
    ok = out["latencies"]
    return {
        "throughput": round(len(ok) / args.duration, 2),
        "p50_ms": round(percentile(ok, 50), 2),
        "p99_ms": round(percentile(ok, 99), 2),
        "failed": out["failed"],
        "server_cpu_ms_per_image": round((cpu_after - cpu_before) * 1e3 / max(len(ok), 1), 3),
        "client_cpu_ms_per_request": round(out["cpu_s"] * 1e3 / max(out["ok"] + out["failed"], 1), 3),
    }


def measure(repo_dir: Path, model: str, upload: bytes, args, log: Path) -> dict:
    meta = read_metadata(repo_dir / model)
    import io

    from PIL import Image

    pixels = preprocess_batch([Image.open(io.BytesIO(upload)).convert("RGB")], meta.preprocessing)  # (1, 3, H, W)
    grpc_port = servers.free_port()
    results: dict = {}
    with servers.vitserve(repo_dir, model, log, grpc_port=grpc_port, **servers.past_budget(model)) as server:
        grpc_url = f"127.0.0.1:{grpc_port}"
        requests = {
            "image": {
                "rest binary": h2load.v2_image(model, upload),
                "rest json": json_request(model, IMAGE_INPUT, "BYTES", [1], [base64.b64encode(upload).decode()]),
            },
            "pixels": {
                "rest binary": h2load.v2_pixels(model, pixels),
                "rest json": json_request(model, INPUT_NAME, "FP32", list(pixels.shape), pixels.ravel().tolist()),
            },
        }
        npy = io.BytesIO()
        np.save(npy, pixels)
        payloads = {"image": upload, "pixels": npy.getvalue()}
        for kind, by_transport in requests.items():
            for transport, request in by_transport.items():
                summary = h2load.run(
                    server.url,
                    request,
                    connections=args.connections,
                    duration=args.duration,
                    warmup=args.warmup,
                    cpu=server.cpu_seconds,
                )
                results[(kind, transport)] = summary
                print(f"{model} {kind} {transport}: {summary['throughput']} img/s", flush=True)
            results[(kind, "grpc")] = run_grpc(server, grpc_url, model, kind, payloads[kind], args)
            print(f"{model} {kind} grpc: {results[(kind, 'grpc')]['throughput']} img/s", flush=True)
    return results


def markdown(all_results: dict[str, dict], args) -> str:
    lines = [
        f"{args.connections} closed-loop clients, {args.warmup:g} s warm-up + {args.duration:g} s timed per point "
        "(ViT-B/16: 4x and 3x that); one image per request.",
        "",
        "| model | input | transport | img/s | p50 ms | p99 ms | server CPU ms/img | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = [
        "",
        "| model | input | gRPC / REST binary img/s | gRPC / REST JSON img/s | "
        "gRPC / REST binary server CPU per img | gRPC / REST JSON server CPU per img |",
        "|---|---|---|---|---|---|",
    ]
    for model, results in all_results.items():
        for kind in ("image", "pixels"):
            for transport in ("grpc", "rest binary", "rest json"):
                r = results[(kind, transport)]
                lines.append(
                    f"| {model} | {kind} | {transport} | {r['throughput']:,} | {r['p50_ms']} | {r['p99_ms']} | "
                    f"{r['server_cpu_ms_per_image']} | {r['client_cpu_ms_per_request']} |"
                )
            g, b, j = (results[(kind, t)] for t in ("grpc", "rest binary", "rest json"))

            def ratio(a: float, c: float) -> str:
                return f"{a / c:.2f}x" if c else "-"

            ratios.append(
                f"| {model} | {kind} | {ratio(g['throughput'], b['throughput'])} | "
                f"{ratio(g['throughput'], j['throughput'])} | "
                f"{ratio(g['server_cpu_ms_per_image'], b['server_cpu_ms_per_image'])} | "
                f"{ratio(g['server_cpu_ms_per_image'], j['server_cpu_ms_per_image'])} |"
            )
    return "\n".join(lines + ratios) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, model, kind, connections, duration, warmup = sys.argv[2:8]
        out = grpc_load(url, model, kind, sys.stdin.buffer.read(), int(connections), float(duration), float(warmup))
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-b16", action="store_true", help="also ViT-B/16 FP32 (exported on first use)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="timed seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first")
    parser.add_argument("--out", type=Path, default=RESULTS / "grpc_rest.md")
    args = parser.parse_args()
    logs = Path(servers.CACHE) / "bench-logs"
    default = artifacts.default_repository()
    all_results = {
        default.fp32: measure(
            default.directory, default.fp32, artifacts.digit_uploads(1)[0], args, logs / "grpc_rest-default.log"
        )
    }
    if args.vit_b16:
        repo = artifacts.vit_b16_repository()
        # A ViT-B/16 request waits about a second at 16 clients: longer windows, so the timed one is steady (as
        # benchmarks/frontend.py does).
        slow = argparse.Namespace(**{**vars(args), "duration": args.duration * 3, "warmup": args.warmup * 4})
        all_results[repo.fp32] = measure(
            repo.directory, repo.fp32, artifacts.photo_uploads()[0], slow, logs / "grpc_rest-vit-b16.log"
        )
    table = markdown(all_results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
