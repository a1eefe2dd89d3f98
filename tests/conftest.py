"""Shared fixtures: real photos from scikit-image, the committed default artifact, and tiny checkpoints; and the
markers that split the suite into layers.

`make test-fast` runs only tests with none of the markers in `pyproject.toml` (server, export, container,
browser, slow). A test gets its marker here, from the fixtures it uses (`MARK_BY_FIXTURE`) or its path
(`MARK_BY_PATH`), or from its own decorator; and a test that starts a server process or a CLI without the marker
fails at once (`require_mark`), so the fast layer cannot drift.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import layers
from tests.layers import require_mark

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_MODEL = MODELS / "digits-vit"

# Markers given to every test that uses one of these fixtures, directly or through another fixture.
MARK_BY_FIXTURE = {"server": "server", "framework_models": "export", "browser": "browser"}
# Markers given to every test under a path (relative to tests/), known before the file is imported: a run that
# deselects them does not import the file at all (timm and torch alone take seconds to import).
MARK_BY_PATH: dict[str, tuple[str, ...]] = {
    "docker": ("container",),
    "model_export/test_export_own.py": ("export",),
    "model_export/test_export_frameworks.py": ("export",),
    "model_export/test_export_relevance.py": ("export",),
    "model_export/test_sources.py": ("export",),
    "model_export/test_train.py": ("export",),
    "model_export/test_default_model.py": ("slow",),
    "model_export/test_parity_tolerance.py": ("export",),  # scores the whole held-out set, FP32 and INT8
    "service/test_framework_parity.py": ("server", "export"),
    "service/test_relevance.py": ("server", "export"),
    # Every test of these calls a server process (the `server` fixture or its own).
    "service/test_api.py": ("server",),
    "service/test_bad_inputs.py": ("server",),
    "service/test_batching.py": ("server",),
    "service/test_demo_page.py": ("server",),
    "service/test_errors.py": ("server",),
    "service/test_formats.py": ("server",),
    "service/test_fuzz_api.py": ("server",),
    "service/test_metrics.py": ("server",),
    "service/test_numerics.py": ("server",),
    "service/test_soak.py": ("server",),
    "service/test_v2.py": ("server",),
    "service/test_workers.py": ("server",),
    "client/test_client_install.py": ("server", "slow"),
}


def _path_marks(path: Path) -> set[str]:
    relative = path.relative_to(ROOT / "tests").as_posix()
    return {m for prefix, marks in MARK_BY_PATH.items() if f"{relative}/".startswith(f"{prefix}/") for m in marks}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing a file or directory whose every test `-m` would deselect anyway."""
    from _pytest.mark.expression import Expression  # what `-m` itself evaluates

    expression = config.getoption("markexpr")
    if not expression or not collection_path.is_relative_to(ROOT / "tests"):
        return None
    marks = _path_marks(collection_path)
    if not marks:
        return None
    # Its tests may carry more marks than its path gives (fixtures, decorators): only if no combination of the
    # names the expression mentions would select one of them is the file surely left out.
    compiled = Expression.compile(expression)
    others = sorted(set(re.findall(r"[A-Za-z_]\w*", expression)) - {"and", "or", "not"} - marks)
    combinations = itertools.chain.from_iterable(itertools.combinations(others, n) for n in range(len(others) + 1))
    if any(compiled.evaluate(_has(marks | set(extra))) for extra in combinations):
        return None
    return True


def _has(marks: set[str]) -> Callable[..., bool]:
    return lambda name, **_: name in marks


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)
        for mark in sorted(_path_marks(item.path)):
            item.add_marker(mark)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    layers.running = item
    try:
        return (yield)
    finally:
        layers.running = None


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> ...` from the repository root, as a user would."""
    if args[:2] == ("-m", "service"):
        require_mark("server", "starts `python -m service`")
    elif args[:2] == ("-m", "model_export"):
        require_mark("export", "runs the export CLI")
    else:
        require_mark("slow", f"runs `python {' '.join(args[:2])}` in a subprocess")
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


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample of `name` with exactly these labels in a `/metrics` page (0 when absent)."""
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if found == labels:
            return float(m.group(2))
    return 0.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll `condition` (a real signal: a metric, a status, a log line) until it holds; fail after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting until {what}"
        time.sleep(0.02)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real `python -m service` process on a free loopback port."""

    def __init__(self, model_dir: Path, log: Path, **env: str) -> None:
        import os

        require_mark("server", "starts a server process")
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
