"""The servers a benchmark compares, each a real process on a free loopback port, started and stopped alike.

- `vitserve`: `python -m service` over a model repository, with `VITSERVE_*` overrides.
- `torch_eager`: benchmarks/peers/torch_eager_app.py under uvicorn (FastAPI + PyTorch eager, one image per call).
- `bentoml`: benchmarks/peers/bentoml_service.py under `bentoml serve`, in its own virtual environment
  (~/.cache/vitserve/bench-bentoml-<hash>, created on first use) so BentoML's dependencies never touch ours.

Each is a `Server` with `url`, the `path` to POST an image to, the multipart `field` it reads, and `rss_mb()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
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
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        log = self.log.open("w")
        # A session of its own, so stop() ends the server's workers (BentoML forks them) and nothing else.
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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

    def rss_mb(self) -> float:
        """Resident memory of the server and its child processes, MiB."""
        import psutil

        if self.process is None:
            return 0.0
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def vitserve(model_dir: Path, model: str, log: Path, **settings: object) -> Server:
    """`python -m service` serving `model` from `model_dir`; keyword arguments become VITSERVE_* variables."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
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
