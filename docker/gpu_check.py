"""GPU check: the service on onnxruntime's CUDA provider against its CPU provider, and ViT-B/16 throughput.

For a machine with an NVIDIA GPU (a driver for CUDA 13) and the dev environment (torch, transformers, onnx):

    python docker/gpu_check.py [--work DIR] [--wheels DIR] [--report FILE]

1. onnxruntime-gpu goes into a private folder (from PyPI, or from --wheels with no index) that only the service
   processes and the benchmark see; export keeps the dev environment's CPU onnxruntime. CUDA and cuDNN come
   from the system or from pip's nvidia-* packages (found and put on LD_LIBRARY_PATH).
2. A model repository: the committed digits-vit, and a random-init Hugging Face ViT-B/16 (saved locally, no
   download) exported by `python -m model_export hf ... --fp16` into vit-b16 and vit-b16-fp16.
3. `python -m service` twice on it, VITSERVE_PROVIDER=cuda and =cpu. Checked: the CUDA server's models really
   run on CUDAExecutionProvider; the same images give the same probabilities on both (max |difference| <= 1e-3)
   for digits-vit and ViT-B/16 FP32; FP16 on CUDA against FP32 on the CPU is reported.
4. ViT-B/16 throughput, FP32 and FP16: the bare onnxruntime CUDA session (batch 1 and 32) and the service end to
   end (concurrent JPEG requests through dynamic batching).

Exit code 0 when every check passed; the report (JSON, --report) holds the numbers either way.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # model_export, for the held-out digits
ORT_GPU_VERSION = "1.31.1"  # the newest onnxruntime-gpu on PyPI (CUDA 13, cuDNN 9); docker/Dockerfile.cuda pins it too
MAX_PROB_DIFF = 1e-3
CUDA = "CUDAExecutionProvider"


def log(message: str) -> None:
    print(f"[gpu-check {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


STARTED = time.monotonic()


def install_ort_gpu(site: Path, wheels: Path | None) -> None:
    if (site / "onnxruntime").is_dir():
        return
    source = [str(w) for w in sorted(wheels.glob("onnxruntime_gpu-*.whl"))] if wheels else []
    if wheels and not source:
        raise SystemExit(f"no onnxruntime_gpu-*.whl in {wheels}")
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site)]
    argv += ["--no-index", *source] if wheels else [f"onnxruntime-gpu=={ORT_GPU_VERSION}"]
    subprocess.run(argv, check=True)


def cuda_library_dirs() -> list[str]:
    """Folders of pip's nvidia-* CUDA/cuDNN libraries (as torch's wheels bring them), for the dynamic loader."""
    found = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            found += sorted({str(p.parent) for p in nvidia.glob("**/lib/lib*.so*")})
    return found


def gpu_env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*cuda_library_dirs(), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def probe(env: dict[str, str], model: Path) -> dict[str, Any]:
    """onnxruntime-gpu imports, and a session really gets the CUDA provider (not a silent CPU fallback)."""
    code = (
        "import json, onnxruntime as ort;"
        f"s = ort.InferenceSession({str(model)!r}, providers=['CUDAExecutionProvider', 'CPUExecutionProvider']);"
        "print(json.dumps({'version': ort.__version__, 'file': ort.__file__, 'device': ort.get_device(),"
        " 'available': ort.get_available_providers(), 'session': s.get_providers()}))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise SystemExit(f"onnxruntime-gpu does not load:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_vit_b16(work: Path, models: Path) -> None:
    """A random-init ViT-B/16 (transformers' ViTConfig defaults: 224 px, patch 16, 12 layers, width 768)."""
    if (models / "vit-b16-fp16" / "artifact.json").exists():
        return
    hf = work / "vit-b16-hf"
    make = (
        "import sys, torch; from transformers import ViTConfig, ViTForImageClassification;"
        "torch.manual_seed(0);"
        "labels = {i: f'class_{i}' for i in range(1000)};"
        "cfg = ViTConfig(num_labels=1000, id2label=labels, label2id={v: k for k, v in labels.items()});"
        "ViTForImageClassification(cfg).eval().save_pretrained(sys.argv[1])"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    subprocess.run([sys.executable, "-c", make, str(hf)], check=True, env=env)
    subprocess.run(
        [sys.executable, "-m", "model_export", "hf", str(hf), "--out", str(models / "vit-b16"), "--fp16"],
        check=True,
        env=env,
        cwd=ROOT,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`python -m service` on `repository`; `settings` become VITSERVE_* variables (models='["a"]' and so on)."""

    def __init__(self, repository: Path, env: dict[str, str], log_file: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **env,
            "VITSERVE_MODEL_DIR": str(repository),
            "VITSERVE_PORT": str(self.port),
            "VITSERVE_HOST": "127.0.0.1",
        }
        env.update({f"VITSERVE_{k.upper()}": v for k, v in settings.items()})
        self.log_file = log_file
        self._out = log_file.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT
        )
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"service exited with {self.process.returncode}:\n{log_file.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > 300:
                raise SystemExit(f"service not ready after 300 s:\n{log_file.read_text()[-3000:]}")
            time.sleep(0.2)
        self.ready_s = round(time.monotonic() - started, 2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._out.close()


def png_bytes(image: Any, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_images() -> dict[str, list[bytes]]:
    import skimage.data
    from PIL import Image

    from model_export.digits import held_out_set

    held = held_out_set()
    digits = [png_bytes(Image.fromarray(held.images[i]).convert("RGB")) for i in range(16)]
    photos = [
        png_bytes(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"), "JPEG")
        for n in ("astronaut", "chelsea", "coffee", "rocket")
    ]
    return {"digits-vit": digits, "vit-b16": photos, "vit-b16-fp16": photos}


def probabilities(url: str, model: str, images: list[bytes], classes: int) -> np.ndarray:
    rows = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for image in images:
            response = http.post(f"/v1/models/{model}/classify", params={"top_k": classes}, files={"file": image})
            response.raise_for_status()
            row = np.zeros(classes)
            for p in response.json()["predictions"]:
                row[p["index"]] = p["probability"]
            rows.append(row)
    return np.stack(rows)


async def _load(url: str, model: str, image: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def worker() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = await http.post(f"/v1/models/{model}/classify", params={"top_k": 1}, files={"file": image})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return {
        "images_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        "concurrency": concurrency,
    }


def service_throughput(url: str, model: str, image: bytes, seconds: float = 6.0) -> dict[str, float]:
    asyncio.run(_load(url, model, image, 32, 1.5))  # warm-up: CUDA kernels, arena growth, batch shapes
    return asyncio.run(_load(url, model, image, 32, seconds))


def bench_session(model: str, provider: str, batches: list[int]) -> None:
    """Bare onnxruntime on `provider`: images/s at each batch size, and its logits against the CPU provider's.

    Runs as a subprocess in the GPU environment (LD_LIBRARY_PATH is read when a process starts).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=[provider, "CPUExecutionProvider"])
    assert session.get_providers()[0] == provider, session.get_providers()
    name = session.get_inputs()[0].name
    size = session.get_inputs()[0].shape[2:]
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((4, 3, *size), dtype=np.float32)
    reference = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    got, want = session.run(None, {name: probe})[0], reference.run(None, {name: probe})[0]
    result: dict[str, float] = {
        "max_abs_logit_diff_vs_cpu": float(np.abs(got - want).max()),
        "logit_range": float(want.max() - want.min()),
    }
    for batch in batches:
        x = rng.standard_normal((batch, 3, *size), dtype=np.float32)
        for _ in range(3):
            session.run(None, {name: x})
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            session.run(None, {name: x})
            runs += 1
        result[f"batch_{batch}_images_per_s"] = round(runs * batch / (time.perf_counter() - t0), 1)
    print(json.dumps(result))


def check(report: dict[str, Any], work: Path, wheels: Path | None) -> None:
    """Fill `report` (checks, measurements) step by step, so a failure still leaves what was measured."""
    checks = report["checks"]
    site, models = work / "ort-gpu", work / "models"
    install_ort_gpu(site, wheels)
    env = gpu_env(site)
    models.mkdir(exist_ok=True)
    if not (models / "digits-vit").exists():
        shutil.copytree(ROOT / "models" / "digits-vit", models / "digits-vit")
    report["onnxruntime"] = probe(env, models / "digits-vit" / "model.onnx")
    log(f"onnxruntime: {report['onnxruntime']}")
    checks["a session gets the CUDA provider"] = report["onnxruntime"]["session"][0] == CUDA
    if not checks["a session gets the CUDA provider"]:
        return
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        report["gpu"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()

    log("exporting a random-init ViT-B/16 (FP32 and FP16)")
    t0 = time.monotonic()
    try:
        export_vit_b16(work, models)
        vit = ["vit-b16", "vit-b16-fp16"]
    except subprocess.CalledProcessError as e:  # the digits-vit comparison still runs
        checks["ViT-B/16 exported"] = False
        vit = []
        log(f"ViT-B/16 export failed ({e}); going on with digits-vit only")
    report["export_s"] = round(time.monotonic() - t0, 1)

    log("starting the service on CUDA and on the CPU")
    fp32 = ["digits-vit", *vit[:1]]
    cuda = Service(models, env, work / "cuda.log", provider="cuda", models=json.dumps(["digits-vit", *vit]))
    cpu = Service(models, env, work / "cpu.log", provider="cpu", models=json.dumps(fp32))
    report["ready_s"] = {"cuda": cuda.ready_s, "cpu": cpu.ready_s}
    try:
        listing = httpx.get(f"{cuda.url}/v1/models", timeout=30).json()["models"]
        served = {m["name"]: m["provider"] for m in listing}
        report["cuda_server_providers"] = served
        checks["every model on CUDAExecutionProvider"] = all(p == CUDA for p in served.values())

        images = test_images()
        classes = {"digits-vit": 10, "vit-b16": 1000, "vit-b16-fp16": 1000}
        diffs: dict[str, float] = {}
        report["max_prob_diff_vs_cpu"] = diffs
        on_cpu = {m: probabilities(cpu.url, m, images[m], classes[m]) for m in fp32}
        for model in ["digits-vit", *vit]:
            on_gpu = probabilities(cuda.url, model, images[model], classes[model])
            reference = on_cpu[model.removesuffix("-fp16")]
            diffs[model] = float(np.abs(on_gpu - reference).max())
            diffs[f"{model} top-1 agreement"] = float(np.mean(on_gpu.argmax(1) == reference.argmax(1)))
        for model in fp32:
            checks[f"{model}: CUDA vs CPU probabilities <= {MAX_PROB_DIFF}"] = diffs[model] <= MAX_PROB_DIFF
        log(f"probabilities, CUDA vs CPU: {diffs}")

        for model in vit:
            argv = [sys.executable, __file__, "--bench-session", str(models / model / "model.onnx"), CUDA]
            bench = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
            session = json.loads(bench.stdout.splitlines()[-1]) if bench.returncode == 0 else bench.stderr[-2000:]
            end_to_end = service_throughput(cuda.url, model, images[model][0])
            report["throughput"][model] = {"onnxruntime_cuda_session": session, "service_end_to_end": end_to_end}
            log(f"{model}: session {session}; service {end_to_end}")
        if vit:
            on_cpu_service = service_throughput(cpu.url, "vit-b16", images["vit-b16"][0], 4.0)
            report["throughput"]["vit-b16 on the CPU provider (service)"] = on_cpu_service
    finally:
        cuda.stop()
        cpu.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--wheels", type=Path, help="install onnxruntime-gpu from the wheels here, with no index")
    parser.add_argument("--report", type=Path, help="write the report here (JSON)")
    parser.add_argument("--bench-session", nargs=2, metavar=("MODEL", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bench_session:
        bench_session(args.bench_session[0], args.bench_session[1], [1, 32])
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="vitserve-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"checks": {}, "throughput": {}}
    try:
        check(report, work, args.wheels)
    except BaseException as e:  # the report is written whatever happened
        report["checks"]["completed"] = False
        report["error"] = f"{type(e).__name__}: {e}"[-3000:]
    report["passed"] = bool(report["checks"]) and all(report["checks"].values())
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
