"""The client installs on its own: a fresh virtual environment, `pip install ./client`, nothing of the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


@pytest.mark.slow
def test_fresh_venv_gets_the_client_and_nothing_of_the_server(tmp_path: Path, server: Any, digit_dir: Path) -> None:
    # Installed from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "client"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    # The test run's PYTHONPATH points at the checkout (service/, client/): the new environment must not see it.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, script = venv / "bin" / "python", venv / "bin" / "vitserve-client"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr

    probe = (
        "import importlib.util, vitserve_client; "
        "print(vitserve_client.__version__); "
        "print(*[m for m in ('fastapi', 'onnxruntime', 'torch', 'service', 'PIL', 'numpy') "
        "if importlib.util.find_spec(m) is not None])"
    )
    # Run outside the checkout, so that nothing there (service/, model_export/) can be imported by accident.
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    version, importable = run.stdout.splitlines()
    assert version == "0.1.0"
    assert importable == ""  # no server stack, and the image extras are optional

    help_run = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert help_run.returncode == 0 and "classify" in help_run.stdout and "exit codes" in help_run.stdout
    # And it talks to the real server: files need neither Pillow nor numpy.
    classify = subprocess.run(
        [str(script), "--url", server.url, "classify", str(digit_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert classify.returncode == 0, classify.stderr
    assert len(classify.stdout.splitlines()) == len(list(digit_dir.glob("*.png")))
