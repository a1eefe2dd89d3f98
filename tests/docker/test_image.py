"""The real image: docker/smoke.sh builds the root Dockerfile, runs it and checks it from the host.

No Docker engine or registry is needed: podman builds, buildah runs, debootstrap makes the base. Where they are
missing the test installs them with apt-get (CI runs as root on Debian); where that is impossible it fails and
says why. Set VITSERVE_SKIP_IMAGE_TEST=1 to skip it on purpose (a laptop without root, say).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TOOLS = {"podman": "podman", "buildah": "buildah", "debootstrap": "debootstrap"}  # command -> Debian package


def ensure_tools() -> None:
    missing = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            f"{', '.join(missing)} missing and not installable here (needs root and apt-get): install them, "
            "or set VITSERVE_SKIP_IMAGE_TEST=1 to skip the image test on purpose"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a first run builds the base image and installs the tools
def test_image_builds_starts_fast_and_serves_as_non_root(tmp_path: Path) -> None:
    if os.environ.get("VITSERVE_SKIP_IMAGE_TEST") == "1":
        pytest.skip("VITSERVE_SKIP_IMAGE_TEST=1")
    ensure_tools()
    report_path = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")]),
        "SMOKE_REPORT": str(report_path),
    }
    done = subprocess.run(
        [str(ROOT / "docker" / "smoke.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700
    )
    output = done.stdout + done.stderr
    assert report_path.exists(), f"smoke.sh exited {done.returncode} before running the image:\n{output[-6000:]}"
    report = json.loads(report_path.read_text())
    print(output)  # shown with -s or on failure: the checks, the image size and the time to ready

    failed = {name: outcome for name, outcome in report["checks"].items() if outcome != "ok"}
    assert not failed, json.dumps(failed, indent=2) + "\n" + output[-3000:]
    measured = report["measurements"]
    assert measured["size_bytes"] <= 400e6, f"image is {measured['size_mb']} MB"
    assert measured["ready_s"] <= 3.0, f"ready after {measured['ready_s']} s"
    assert measured["server_uid"] != 0
    assert done.returncode == 0, output[-6000:]
