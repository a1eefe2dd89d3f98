"""The servers a benchmark compares, each a real process on a free loopback port, started and stopped alike.

- `vitserve`: `python -m service` over a model repository, with `VITSERVE_*` overrides.
- `torch_eager`: benchmarks/peers/torch_eager_app.py under uvicorn (FastAPI + PyTorch eager, one image per call).
- `bentoml`: benchmarks/peers/bentoml_service.py under `bentoml serve`, in its own virtual environment
  (~/.cache/vitserve/bench-bentoml-<hash>, created on first use) so BentoML's dependencies never touch ours.
- `triton`: the `tritonserver` binary of the nvidia-pytriton wheel, serving benchmarks/peers/triton_model.py
  (Python backend) with Triton's dynamic batcher, from its own environment (~/.cache/vitserve/bench-triton-<hash>).

Each is a `Server` with `url`, the `path` to POST an image to, the multipart `field` it reads, `rss_mb()` and
`cpu_seconds()` (both over the server's whole process tree).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).parent / "peers"
CACHE = Path.home() / ".cache" / "vitserve"
BENTOML_REQUIREMENTS = ["bentoml==1.4.40", "onnxruntime==1.32.0", "numpy==2.4.6", "pillow==13.0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process on a free port; `start()` waits until `ready_path` answers 200."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        path: str,
        field: str,
        env: dict[str, str],
        ready_path: str,
        log: Path,
        port: int,
        start_timeout: float = 180.0,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.command = command
        self.path = path
        self.field = field
        self.env = env
        self.ready_path = ready_path
        self.log = log
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.start_timeout = start_timeout
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        log = self.log.open("w")
        # A session of its own, so stop() ends the server's workers (BentoML forks them) and nothing else.
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {self.start_timeout:.0f} s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _processes(self) -> list:
        """The server's process and all its descendants (psutil.Process), as they are now."""
        import psutil

        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        """Resident memory of the server and its child processes, MiB."""
        import psutil

        total = 0
        for p in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server has used so far, all its processes together (from /proc/<pid>/stat).

        Each live process counts its own time and that of its children that have exited and been waited for,
        so a worker that ran and ended between two samples is still counted, by its parent."""
        import psutil

        total = 0.0
        for p in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What a capacity benchmark runs vitserve with when it drives a slow model past its latency budget: ViT-B/16 on a
# CPU answers 10-20 images/s, so 64 closed-loop clients wait seconds, and the default admission refuses (503) what
# it predicts would miss VITSERVE_LATENCY_BUDGET_MS. Such a benchmark measures how much the server can do, as
# Triton's unbounded queue lets it, so it queues. The default model never needs it: its closed loops are answered
# far within the budget (benchmarks/overload.py measures the defaults).
QUEUEING = {"admission": "queue"}


def past_budget(model: str) -> dict[str, str]:
    """`QUEUEING` for the ViT-B/16 models (whose closed loops at 64 clients wait seconds), else the defaults."""
    return QUEUEING if model.startswith("vit-b16") else {}


def vitserve(model_dir: Path, model: str, log: Path, *, root: Path = ROOT, **settings: object) -> Server:
    """`python -m service` serving `model` from `model_dir`; keyword arguments become VITSERVE_* variables.

    `root` is the source tree to run (another checkout, to compare two versions of the service side by side)."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "VITSERVE_MODEL_DIR": str(model_dir),
        "VITSERVE_MODELS": f'["{model}"]',
        "VITSERVE_DEFAULT_MODEL": model,
        "VITSERVE_HOST": "127.0.0.1",
        "VITSERVE_PORT": str(port),
        "VITSERVE_LOG_LEVEL": "warning",
        **{f"VITSERVE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()},
    }
    return Server(
        "vitserve",
        [sys.executable, "-m", "service"],
        path=f"/v1/models/{model}/classify",
        field="file",
        env=env,
        ready_path="/readyz",
        log=log,
        port=port,
        cwd=root,
    )


def torch_eager(source: str, log: Path, *, hf_checkpoint: Path | None = None, artifact: Path | None = None) -> Server:
    """The tutorial-style FastAPI + PyTorch eager peer (`source`: "digits" or "hf")."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PEER_SOURCE": source,
        "PEER_HF_CHECKPOINT": str(hf_checkpoint or ""),
        "PEER_ARTIFACT": str(artifact or ""),
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.peers.torch_eager_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return Server(
        "torch-eager", command, path="/predict", field="file", env=env, ready_path="/health", log=log, port=port
    )


def bentoml_env(log: Callable[[str], object] = print) -> Path:
    """The BentoML virtual environment (created and filled from PyPI on first use); returns its python."""
    key = hashlib.sha256("\n".join(BENTOML_REQUIREMENTS).encode()).hexdigest()[:12]
    venv = CACHE / f"bench-bentoml-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    log(f"creating the BentoML environment {venv} (first run only)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *BENTOML_REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"installing {BENTOML_REQUIREMENTS} into {venv} failed:\n{done.stderr[-3000:]}")
    (venv / ".complete").write_text("\n".join(BENTOML_REQUIREMENTS) + "\n")
    return python


def bentoml(artifact: Path, log: Path, *, max_batch_size: int = 16, max_latency_ms: int = 10_000) -> Server:
    """benchmarks/peers/bentoml_service.py serving the ONNX artifact with BentoML's adaptive batching."""
    python = bentoml_env()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        "PATH": f"{python.parent}:{os.environ.get('PATH', '')}",
        "BENTOML_HOME": str(CACHE / "bench-bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "PEER_ARTIFACT": str(artifact),
        "PEER_MAX_BATCH_SIZE": str(max_batch_size),
        "PEER_MAX_LATENCY_MS": str(max_latency_ms),
    }
    command = [
        str(python.parent / "bentoml"),
        "serve",
        "bentoml_service:Classifier",
        "--working-dir",
        str(PEERS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return Server(
        "bentoml", command, path="/classify", field="images", env=env, ready_path="/readyz", log=log, port=port
    )


# ---------------------------------------------------------------------------------------------------- Triton

# The tritonserver binary comes from the nvidia-pytriton wheel; its Python API (gRPC, zmq, tritonclient) is not
# used, so the wheel goes in without its dependencies. numpy 1: the wheel's Python-backend stub was built against
# numpy 1, and under numpy 2 its BYTES inputs arrive garbled and its FP32 outputs empty. The rest are the
# versions vitserve's own environment runs (onnxruntime, Pillow), and what `service.core.imaging` and
# `vit_artifact.metadata` import (pydantic, starlette).
TRITON_WHEEL = "nvidia-pytriton==0.7.0"
TRITON_REQUIREMENTS = [
    "onnxruntime==1.32.0",
    "numpy==1.26.4",
    "pillow==13.0.0",
    "pydantic==2.14.4",
    "starlette==1.10.0",
]
# The stub links the system's libpython3.11 (Debian's), so the environment must be a venv of that very build:
# on another 3.11 build a model fails to load ('_thread.RLock' object has no attribute '_recursion_count').
TRITON_PYTHON = Path("/usr/bin/python3.11")
TRITON_MODEL = PEERS / "triton_model.py"


def triton_env(log: Callable[[str], object] = print) -> Path:
    """The Triton virtual environment (made from PyPI on first use); returns its `tritonserver` directory.

    The directory is the wheel's `pytriton/tritonserver` with the Python-backend stub for Python 3.11 put in
    `backends/python/`, where the backend looks for it (as pytriton itself prepares it at each start)."""
    key = hashlib.sha256("\n".join([str(TRITON_PYTHON), TRITON_WHEEL, *TRITON_REQUIREMENTS]).encode()).hexdigest()[:12]
    venv = CACHE / f"bench-triton-{key}"
    server = venv / "tritonserver"
    if (venv / ".complete").is_file():
        return server
    if not TRITON_PYTHON.is_file():
        raise RuntimeError(f"the Triton peer needs {TRITON_PYTHON} (Debian's python3.11, which its stub links)")
    log(f"creating the Triton environment {venv} (first run only)")
    subprocess.run([str(TRITON_PYTHON), "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in (["--no-deps", TRITON_WHEEL], TRITON_REQUIREMENTS):
        done = subprocess.run([*pip, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"installing {args} into {venv} failed:\n{done.stderr[-3000:]}")
    wheel = _site_packages(venv) / "pytriton" / "tritonserver"
    shutil.copytree(wheel, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy2(wheel / "python_backend_stubs" / "3.11" / "triton_python_backend_stub", server / "backends" / "python")
    (venv / ".complete").write_text("\n".join([TRITON_WHEEL, *TRITON_REQUIREMENTS]) + "\n")
    return server


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / "python3.11" / "site-packages"


def triton_repository(
    directory: Path,
    artifact: Path,
    *,
    max_batch_size: int,
    max_queue_delay_ms: float,
    max_pixels: int,
    instances: int = 1,
    threads: int = 0,
) -> None:
    """Two Python-backend models of `artifact` in the model repository `directory`, both dynamically batched:
    `<name>` takes FP32 `pixel_values` [N, 3, H, W], `<name>-image` takes BYTES `image` [N, 1]. `instances`:
    the instance_group count (a stub process each); `threads`: each session's intra-op threads (0: onnxruntime's
    choice)."""
    from vit_artifact.metadata import INPUT_NAME, read_metadata

    meta = read_metadata(artifact, verify_hashes=False)
    height, width = meta.input_size
    classes = len(meta.labels)
    inputs = {
        meta.name: f'{{ name: "{INPUT_NAME}", data_type: TYPE_FP32, dims: [3, {height}, {width}] }}',
        f"{meta.name}-image": '{ name: "image", data_type: TYPE_STRING, dims: [1] }',
    }
    for name, tensor in inputs.items():
        version = directory / name / "1"
        version.mkdir(parents=True)
        shutil.copy2(TRITON_MODEL, version / "model.py")
        # The stub puts the version directory on sys.path (and passes no PYTHONPATH on), so the model imports
        # vitserve's decoding and preprocessing through links placed there.
        for package in ("service", "vit_artifact"):
            (version / package).symlink_to(ROOT / package)
        kind = "image" if name.endswith("-image") else INPUT_NAME
        (directory / name / "config.pbtxt").write_text(
            f"""backend: "python"
max_batch_size: {max_batch_size}
dynamic_batching {{ max_queue_delay_microseconds: {round(max_queue_delay_ms * 1000)} }}
instance_group [{{ count: {instances}, kind: KIND_CPU }}]
input [{tensor}]
output [
  {{ name: "logits", data_type: TYPE_FP32, dims: [{classes}] }},
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [{classes}] }}
]
parameters [
  {{ key: "artifact", value: {{ string_value: "{artifact.resolve()}" }} }},
  {{ key: "input", value: {{ string_value: "{kind}" }} }},
  {{ key: "max_pixels", value: {{ string_value: "{max_pixels}" }} }},
  {{ key: "threads", value: {{ string_value: "{threads}" }} }}
]
"""
        )


def triton(repository: Path, log: Path) -> Server:
    """`tritonserver` over a repository made by `triton_repository`, HTTP only (gRPC and metrics off)."""
    server = triton_env()
    venv = server.parent
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        # The backend starts each model's stub with the first python3 on PATH as its environment.
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": str(_site_packages(venv) / "nvidia_pytriton.libs"),
    }
    command = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={server / 'backends'}",
        f"--cache-directory={server / 'caches'}",
        f"--http-port={port}",
        "--http-address=127.0.0.1",
        "--allow-grpc=false",
        "--allow-metrics=false",
    ]
    return Server("triton", command, path="", field="", env=env, ready_path="/v2/health/ready", log=log, port=port)
