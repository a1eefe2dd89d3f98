"""Shared fixtures: real photos from scikit-image, the committed default artifact, and tiny checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_MODEL = MODELS / "digits-vit"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> ...` from the repository root, as a user would."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="session")
def photos():
    """Real RGB photos that ship inside scikit-image's wheel."""
    import skimage.data
    from PIL import Image

    return {
        name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for name in ("astronaut", "chelsea", "coffee", "rocket")
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real `python -m service` process on a free loopback port."""

    def __init__(self, model_dir: Path, log: Path, **env: str) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "VITSERVE_MODEL_DIR": str(model_dir),
            "VITSERVE_HOST": "127.0.0.1",
            "VITSERVE_PORT": str(self.port),
            "VITSERVE_LOG_LEVEL": "warning",
            **env,
        }
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=ROOT,
            env=environment,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> Server:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log_file.close()
        return code


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The committed model repository, served as `make serve` serves it."""
    srv = Server(MODELS, tmp_path_factory.mktemp("server") / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def framework_models(tmp_path_factory):
    """Random-init HF ViT/DeiT and timm ViT/DeiT checkpoints, exported through the real CLI."""
    from tests.frameworks import build_framework_models

    return build_framework_models(tmp_path_factory.mktemp("frameworks"))
