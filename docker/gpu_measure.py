"""The GPU check's measurements, run by docker/gpu_check.py (`run`) in the environment it installed there.

In one process, on the unpacked bundle (`check.json` names the provider and the two measured models, FP32 and
FP16; `models/` holds them and the default model; `uploads/` the JPEG photos; `openloop` the load generator):

1. Parity: each model's probabilities on the photos from the service's own sessions on the provider (loaded by
   service.core.runtime, IO binding and all) against a plain CPU session of the FP32 graph: at most PARITY_MAX apart.
2. Bare onnxruntime on the provider, as a user would call it (default session options, `session.run` on a host
   array): images/s at each batch size of the sweep, and the best. At that batch, the split of the service's own
   path in this process: the copy of the rows into its bound buffer, and the bound run (on CUDA also a run on an
   input already on the device, i.e. compute alone).
3. The service (`python -m service`, the provider, one HTTP worker per core, queue admission as for any
   closed-loop capacity measurement, the measured models' serving.json set to the bare best batch), checked to
   run every model on the provider and to answer V2 pixel tensors as step 1's CPU sessions do; then, for each
   measured model, closed-loop load from the C load generator (benchmarks/openloop.c, several processes) with V2
   FP32 `pixel_values` and with 640 px JPEG uploads to /v1/models/<name>/classify: images/s over bare's best, and
   where the time goes (from /metrics over the timed window: queue wait, batch size, runtime per batch and how
   busy the runtime was; for JPEG, the server's own decode and preprocess times, sampled during the load).

The report (JSON) is rewritten after every step, so a run cut short still shows what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARITY_MAX = 1e-3  # on probabilities, the bound (FP16 against the FP32 graph on the CPU too)
GOALS = {"v2 pixels": 0.80, "jpeg": 0.60}  # service images/s over bare onnxruntime's best, on a GPU
KINDS = tuple(GOALS)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and how hard the check measures, by provider."""

    batch_sizes: tuple[int, ...]  # the bare sweep
    sweep_s: float  # timed seconds at each batch size
    warmup_s: float  # untimed load before each point
    timed_s: float  # each point's timed window
    clients: int  # load generator processes per point
    workers: int  # VITSERVE_WORKERS
    in_flight: int  # closed-loop requests in flight per image of a full batch (2 instances each running one)


SCHEDULES = {
    # A GPU: batches up to 128; 4 in flight per batch place keeps both instances' batches full (one computing,
    # one being copied in) with as many on their way; four generator processes, each sending up to 2.4 GB/s of
    # pixel tensors at the target rate, keep the client off the critical path.
    "cuda": Schedule((8, 16, 32, 64, 128), 1.0, 4.0, 12.0, 4, os.cpu_count() or 16, 4),
    # The dry run: the default model on 2 shared cores, short enough for the test suite.
    "cpu": Schedule((1, 4, 16), 0.3, 1.0, 2.0, 2, 2, 1),
}


class Report:
    """The report as it grows; written to `path` after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"checks": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.started = time.monotonic()

    def check(self, name: str, ok: bool) -> bool:
        self.data["checks"][name] = bool(ok)
        log(f"{'ok  ' if ok else 'FAIL'} {name}")
        return ok

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.data["passed"] = bool(self.data["checks"]) and all(self.data["checks"].values())
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def log(message: str) -> None:
    print(f"[gpu-measure] {message}", flush=True)


def environment(provider: str) -> dict[str, Any]:
    import onnxruntime as ort

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "available_providers": ort.get_available_providers(),
        "provider": provider,
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
        facts["gpu"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return facts


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def photo_pixels(directory: Path, uploads: Path) -> np.ndarray:
    """The JPEG photos as the model's input (N, 3, H, W), preprocessed as the service does."""
    from service.core.pipeline import prepare
    from vit_artifact.metadata import read_metadata

    meta = read_metadata(directory, verify_hashes=False)
    photos = sorted(uploads.glob("*.jpg"))
    return np.stack([prepare(p.read_bytes(), meta, max_pixels=40_000_000).pixels for p in photos])


def graph(directory: Path) -> Path:
    from vit_artifact.metadata import read_metadata

    return directory / read_metadata(directory, verify_hashes=False).graphs["classify"].file


# --- bare onnxruntime, and the service's own path in this process ------------------------------------------


def timed(call: Any, seconds: float, least: int = 3) -> float:
    """Median seconds of `call()` over at least `least` calls and `seconds` seconds, after two untimed ones."""
    call()
    call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < least or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_sweep(path: Path, provider: str, sizes: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """Images/s of a session with onnxruntime's default options on `provider`, `run` on host arrays."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    used = session.get_providers()[0]
    source = session.get_inputs()[0]
    rng = np.random.default_rng(0)
    per_batch: dict[int, float] = {}
    for size in sizes:
        x = rng.standard_normal((size, *source.shape[1:]), dtype=np.float32)
        per_batch[size] = timed(lambda x=x: session.run(None, {source.name: x}), seconds)
    rates = {size: round(size / s, 1) for size, s in per_batch.items()}
    best = max(rates, key=rates.__getitem__)
    result: dict[str, Any] = {"provider": used, "images_per_s": rates, "best_batch": best}
    result["best_images_per_s"] = rates[best]
    result["ms_per_batch"] = {size: round(s * 1e3, 2) for size, s in per_batch.items()}
    if used == "CUDAExecutionProvider":
        result["device_resident_ms_at_best"] = device_resident_ms(session, best, seconds)
    return result


def device_resident_ms(session: Any, size: int, seconds: float) -> float | str:
    """Milliseconds of a batch whose input is already on the GPU and whose output stays there: compute alone."""
    import onnxruntime as ort

    try:
        source = session.get_inputs()[0]
        x = np.random.default_rng(1).standard_normal((size, *source.shape[1:]), dtype=np.float32)
        binding = session.io_binding()
        binding.bind_ortvalue_input(source.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", 0)
        return round(timed(lambda: session.run_with_iobinding(binding), seconds) * 1e3, 2)
    except Exception as e:  # a figure for the split, not a check
        return f"not measured: {type(e).__name__}: {str(e)[:200]}"


def service_path_split(model: Any, size: int, seconds: float) -> dict[str, float]:
    """The service's own classify path at `size`, in this process: copying the rows into the bound buffer
    (BoundBatch.stage) and the bound run (with its copies to and from the device, on CUDA)."""
    from service.core.runtime import BoundBatch

    shape = (3, *model.meta.input_size)
    rng = np.random.default_rng(2)
    rows = [rng.standard_normal(shape, dtype=np.float32) for _ in range(size)]  # separate arrays, as from slots
    bound = BoundBatch(model.classify, len(model.meta.labels), shape)
    copy = timed(lambda: bound.stage(rows), seconds / 2)
    run = timed(lambda: bound.run_staged(size), seconds)
    return {"batch": size, "copy_into_batch_ms": round(copy * 1e3, 2), "bound_run_ms": round(run * 1e3, 2)}


# --- the service -------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(repository: Path, log_file: Path, ready_s: float, **settings: str) -> Iterator[str]:
    """`python -m service` on `repository` with `settings` as VITSERVE_* variables, until the block ends; its URL."""
    port = free_port()
    env = {**os.environ, "VITSERVE_MODEL_DIR": str(repository), "VITSERVE_HOST": "127.0.0.1"}
    env["VITSERVE_PORT"] = str(port)
    env.update({f"VITSERVE_{k.upper()}": v for k, v in settings.items()})
    url = f"http://127.0.0.1:{port}"
    with log_file.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=ROOT, stdout=out, stderr=out)
        try:
            started = time.monotonic()
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the service exited with {process.returncode}: {tail(log_file)}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - started > ready_s:
                    raise RuntimeError(f"the service was not ready after {ready_s:g} s: {tail(log_file)}")
                time.sleep(0.2)
            log(f"service ready in {time.monotonic() - started:.1f} s on {url}")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()


def tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.is_file() else ""


_SAMPLE = re.compile(r'^(\w+)\{model="([^"]*)"\} (\S+)$')


def scrape(url: str, model: str) -> dict[str, float]:
    """The model's batching sums and counts from /metrics (every process's, summed)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(2) == model:
            found[m.group(1)] = float(m.group(3))
    return found


def window(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float | None]:
    """What the batcher did between two scrapes: mean queue wait, mean batch, runtime per batch, and the runtime's
    busy seconds per second (above 1: instances ran side by side)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("vitserve_batch_size_count")
    images = delta("vitserve_batch_size_sum")
    queued = delta("vitserve_queue_duration_seconds_count")
    runtime = delta("vitserve_runtime_duration_seconds_sum")
    return {
        "batches": batches,
        "mean_batch": round(images / batches, 2) if batches else None,
        "queue_ms": round(1e3 * delta("vitserve_queue_duration_seconds_sum") / queued, 2) if queued else None,
        "runtime_ms_per_batch": round(1e3 * runtime / batches, 2) if batches else None,
        "runtime_busy": round(runtime / seconds, 2),
    }


def raw_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    host = url.removeprefix("http://")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def requests_for(kind: str, url: str, model: str, pixels: np.ndarray, uploads: Path) -> list[bytes]:
    """One complete HTTP request per photo: its V2 `pixel_values` tensor, or its JPEG as a classify upload."""
    from benchmarks import h2load, openloop

    if kind == "jpeg":
        return openloop.raw_requests(url, f"/v1/models/{model}/classify", uploads, "file", {"top_k": "1"})
    made = [h2load.v2_pixels(model, pixels[i : i + 1]) for i in range(len(pixels))]
    return [raw_request(url, r.path, r.body, r.headers) for r in made]


def load(url: str, messages: list[bytes], program: Path, connections: int, clients: int, seconds: float) -> dict:
    """A closed loop of `connections` from `clients` load generator processes for `seconds`: the answers
    counted together (images/s, statuses, errors, latency percentiles)."""
    from benchmarks import openloop
    from benchmarks.loadgen import percentile

    shares = [connections // clients + (i < connections % clients) for i in range(clients)]

    def one(share: int) -> dict:
        return openloop.send(
            url, messages, concurrency=share, duration=seconds, requests=10**8, warmup=share, raw=True, program=program
        )

    with ThreadPoolExecutor(len(shares)) as pool:
        parts = list(pool.map(one, [s for s in shares if s]))
    ok = [latency * 1e3 for p in parts for _, latency, status in p["raw"] if status == 200]
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "images_per_s": round(sum(p["throughput"] for p in parts), 1),
        "ok": len(ok),
        "statuses": statuses,
        "errors": errors,
        "p50_ms": round(percentile(ok, 50), 1),
        "p99_ms": round(percentile(ok, 99), 1),
        "connections": connections,
        "clients": len(parts),
        "client_cpu_s": round(sum(p["client_cpu_s"] for p in parts), 2),
    }


def sample_timings(url: str, model: str, upload: bytes, until: threading.Event, every_s: float) -> dict[str, float]:
    """A classify request every `every_s` while the load runs (a few percent of it at most): the medians of the
    server's own timings (decode, preprocess, queue, inference, batch size, total)."""
    seen: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        while not until.wait(every_s):
            response = http.post(f"/v1/models/{model}/classify", params={"top_k": 1}, files={"file": upload})
            if response.status_code == 200:
                for key, value in response.json()["timings"].items():
                    seen.setdefault(key, []).append(value)
    return {key: round(statistics.median(values), 2) for key, values in seen.items()} | {
        "samples": len(next(iter(seen.values()), []))
    }


def point(
    url: str, model: str, kind: str, messages: list[bytes], program: Path, schedule: Schedule, batch: int, upload: bytes
) -> dict[str, Any]:
    """One model at one kind: warm-up load, then the timed window with /metrics before and after it."""
    connections = schedule.in_flight * batch
    load(url, messages, program, connections, schedule.clients, schedule.warmup_s)
    before = scrape(url, model)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as side:
        every = schedule.timed_s / 50  # 50 samples a window
        sampled = side.submit(sample_timings, url, model, upload, stop, every) if kind == "jpeg" else None
        result = load(url, messages, program, connections, schedule.clients, schedule.timed_s)
        stop.set()
        if sampled is not None:
            result["server_timings_ms"] = sampled.result()
    result["batcher"] = window(before, scrape(url, model), schedule.timed_s)
    return result


# --- the check ---------------------------------------------------------------------------------------------


def main(work: Path, report_path: Path) -> int:
    check = json.loads((work / "check.json").read_text())
    provider = check["provider"]
    schedule = SCHEDULES[provider]
    report = Report(report_path)
    report.data.update(bundle=check, schedule=dataclasses.asdict(schedule))
    try:
        measure(report, work, check, schedule)
    except Exception as e:  # the report says what happened, with what was measured before
        report.data["checks"]["completed"] = False
        report.data["error"] = f"{type(e).__name__}: {e}"[-4000:]
        log(f"FAILED: {report.data['error']}")
    report.save()
    print(summary(report.data), flush=True)
    return 0 if report.data["passed"] else 1


def measure(report: Report, work: Path, check: dict[str, Any], schedule: Schedule) -> None:
    from service.core.runtime import CPU, CUDA, load_model, resolve_providers
    from service.settings import usable_cpus

    provider = check["provider"]
    models = work / "models"
    uploads = work / "uploads"
    measured = check["measured"]
    names = sorted(p.name for p in models.iterdir() if (p / "artifact.json").is_file())
    want = CUDA if provider == "cuda" else CPU
    report.data["environment"] = environment(provider)
    report.save()
    providers = resolve_providers(provider)
    cpus = usable_cpus()
    reference_of = {name: measured["fp32"] if name == measured["fp16"] else name for name in names}

    # 1. parity, through the service's own sessions
    log(f"parity: {', '.join(names)} on {want} against the CPU provider")
    expected: dict[str, np.ndarray] = {}
    pixels: dict[str, np.ndarray] = {}
    parity: dict[str, Any] = {}
    loaded = {}
    for name in names:
        pixels[name] = photo_pixels(models / name, uploads)
        reference = models / reference_of[name]
        expected[name] = softmax(cpu_session(graph(reference)).run(["logits"], {"pixel_values": pixels[name]})[0])
        # As the service's engine loads it (service.core.loading.load_repository, the default settings).
        model = load_model(models / name, providers=providers, threads=0, cpu_rewrites=True, instances=0, cpus=cpus)
        report.check(f"{name}: the service's sessions run on {want}", model.provider == want)
        got = softmax(model.infer(list(pixels[name]), with_attention=False)[0])
        diff = float(np.abs(got - expected[name]).max())
        agree = float(np.mean(got.argmax(1) == expected[name].argmax(1)))
        parity[name] = {"max_prob_diff": diff, "top1_agreement": agree, "reference": f"{reference_of[name]} on CPU"}
        report.check(f"{name}: {want} vs CPU probabilities <= {PARITY_MAX}", diff <= PARITY_MAX)
        parity[name]["io_binding"] = model.unbound or "bound"
        report.check(f"{name}: the service's batches run through IO binding", not model.unbound)
        loaded[name] = model
    report.data["parity"] = parity
    report.save()

    # 2. bare onnxruntime, and the service's path in this process
    bare: dict[str, Any] = {}
    for precision, name in measured.items():
        log(f"bare onnxruntime on {want}: {name} ({precision}) at batches {schedule.batch_sizes}")
        bare[name] = bare_sweep(graph(models / name), want, schedule.batch_sizes, schedule.sweep_s)
        bare[name]["precision"] = precision
        bare[name]["service_path"] = service_path_split(loaded[name], bare[name]["best_batch"], schedule.sweep_s)
        log(f"{name}: {json.dumps(bare[name])}")
    report.data["bare"] = bare
    report.save()
    loaded.clear()  # the service's engine takes the device from here

    # 3. the service
    for name in measured.values():  # the batch a GPU wants, from the sweep, as an operator would set it
        (models / name / "serving.json").write_text(json.dumps({"max_batch_size": bare[name]["best_batch"]}) + "\n")
    largest = max(bare[name]["best_batch"] for name in measured.values())
    settings = {
        "provider": provider,
        "workers": str(schedule.workers),
        "models": json.dumps(names),
        "default_model": check["default_model"],
        "admission": "queue",  # a closed loop measures capacity; the adaptive limits would refuse the excess
        "max_queue_size": str(max(256, schedule.in_flight * largest)),
    }
    report.data["service_settings"] = settings
    service_log = work / "service.log"  # the access log runs to tens of MB: an excerpt goes beside the report
    program = work / "openloop"
    photos = sorted(uploads.glob("*.jpg"))
    try:
        with service(models, service_log, 300.0 if provider == "cuda" else 90.0, **settings) as url:
            listing = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
            served = {m["name"]: m["provider"] for m in listing}
            report.data["service_providers"] = served
            report.check(f"the service runs every model on {want}", all(p == want for p in served.values()))
            report.data["service_parity"] = {}
            for name in names:
                diff = v2_parity(url, name, pixels[name], expected[name])
                report.data["service_parity"][name] = diff
                report.check(f"{name}: the service's V2 probabilities vs CPU <= {PARITY_MAX}", diff <= PARITY_MAX)
            report.save()
            points: dict[str, Any] = {}
            report.data["points"] = points
            for name in measured.values():
                for kind in KINDS:
                    messages = requests_for(kind, url, name, pixels[name], uploads)
                    batch = bare[name]["best_batch"]
                    log(f"load: {name} {kind}, {schedule.in_flight * batch} connections")
                    result = point(url, name, kind, messages, program, schedule, batch, photos[0].read_bytes())
                    result["ratio_to_bare"] = round(result["images_per_s"] / bare[name]["best_images_per_s"], 3)
                    result["split_ms_per_image"] = split(result, bare[name])
                    points.setdefault(name, {})[kind] = result
                    log(f"{name} {kind}: {json.dumps(result)}")
                    report.check(f"{name} {kind}: every request answered 200", result_clean(result))
                    report.save()
    finally:
        excerpt(service_log, report.path.with_name(report.path.stem + "-service.log"))
    fallbacks = [line for line in tail(service_log, 10**8).splitlines() if "IO binding failed" in line]
    report.data["service_io_binding"] = fallbacks[:4] or "bound"
    report.check("the service's batches ran through IO binding", not fallbacks)
    report.data["goals"] = goals(report.data, provider)


def split(result: dict[str, Any], bare: dict[str, Any]) -> dict[str, float | None]:
    """Where an image's time goes in the service, per image, beside bare onnxruntime's: decoding and
    preprocessing (JPEG; on an HTTP worker, side by side with the others), the wait in the batch queue, the copy
    into the batch and the bound run (in this process, at bare's best batch), and the service's runtime call at the
    batch it really formed; bare's time at its best batch, and at the size nearest that batch."""
    batcher, timings = result["batcher"], result.get("server_timings_ms", {})
    path = bare["service_path"]
    mean = batcher.get("mean_batch")
    nearest = min(bare["ms_per_batch"], key=lambda size: abs(int(size) - (mean or 0)))
    per_batch = batcher.get("runtime_ms_per_batch")
    return {
        "decode_and_preprocess": round(timings["decode_ms"] + timings["preprocess_ms"], 3) if timings else None,
        "queue": batcher.get("queue_ms"),
        "copy_into_batch": round(path["copy_into_batch_ms"] / path["batch"], 3),
        "bound_run": round(path["bound_run_ms"] / path["batch"], 3),
        "service_runtime": round(per_batch / mean, 3) if per_batch and mean else None,
        "bare_at_best_batch": round(1e3 / bare["best_images_per_s"], 3),
        "bare_at_the_service_batch": round(bare["ms_per_batch"][nearest] / int(nearest), 3),
    }


def excerpt(log_file: Path, to: Path, head: int = 2 * 2**20, end: int = 6 * 2**20) -> None:
    """The log's first `head` and last `end` bytes (the device tool brings back files of 16 MiB at most)."""
    if not log_file.is_file():
        return
    data = log_file.read_bytes()
    if len(data) > head + end:
        data = data[:head] + f"\n[... {len(data) - head - end} bytes left out ...]\n".encode() + data[-end:]
    to.write_bytes(data)


def v2_parity(url: str, model: str, pixels: np.ndarray, expected: np.ndarray) -> float:
    from benchmarks import h2load

    request = h2load.v2_pixels(model, pixels)
    response = httpx.post(url + request.path, content=request.body, headers=request.headers, timeout=120)
    response.raise_for_status()
    outputs = h2load.v2_outputs(response.content, response.headers.get(h2load.HEADER_LENGTH))
    return float(np.abs(outputs["probabilities"] - expected).max())


def result_clean(result: dict[str, Any]) -> bool:
    return result["ok"] > 0 and set(result["statuses"]) == {"200"} and not result["errors"]


def goals(data: dict[str, Any], provider: str) -> list[dict[str, Any]]:
    """The issue's goals, service images/s over bare onnxruntime's best, per model and kind (on a GPU only: on the
    CPU the server and the load generator share the cores the bare figure had to itself)."""
    rows = []
    for name, kinds in data.get("points", {}).items():
        for kind, result in kinds.items():
            goal = GOALS[kind] if provider == "cuda" else None
            ratio = result["ratio_to_bare"]
            row = {"model": name, "precision": data["bare"][name]["precision"], "kind": kind, "ratio": ratio}
            rows.append(row | {"goal": goal, "met": None if goal is None else ratio >= goal})
    return rows


def summary(data: dict[str, Any]) -> str:
    """The table the device tool's reply shows (it carries the end of the output)."""
    env = data.get("environment", {})
    lines = [
        "",
        f"GPU check ({env.get('provider', '?')}; {env.get('gpu') or 'no GPU'}; onnxruntime {env.get('onnxruntime')}): "
        f"{'PASSED' if data.get('passed') else 'FAILED'} in {data.get('elapsed_s')} s",
    ]
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in data.get("checks", {}).items()]
    if data.get("error"):
        lines.append(f"  error: {data['error'][:600]}")
    lines.append("model | precision | bare img/s (batch) | kind | service img/s | ratio | goal | batch | runtime busy")
    for name, bare in data.get("bare", {}).items():
        for kind, p in data.get("points", {}).get(name, {}).items():
            goal = GOALS[kind] if env.get("provider") == "cuda" else None
            met = "" if goal is None else (" met" if p["ratio_to_bare"] >= goal else " MISSED")
            b = p.get("batcher", {})
            lines.append(
                f"{name} | {bare['precision']} | {bare['best_images_per_s']} ({bare['best_batch']}) | {kind} | "
                f"{p['images_per_s']} | {p['ratio_to_bare']} | {goal or '-'}{met} | {b.get('mean_batch')} | "
                f"{b.get('runtime_busy')}"
            )
    return "\n".join(lines)
