"""Run a built vitserve image and check it from the host: the second half of docker/smoke.sh.

    python docker/smoke_check.py IMAGE [--report report.json]

The image's own entrypoint runs under `buildah run --isolation=chroot`, which needs neither a Docker engine
nor cgroups and shares the host's network, so the host talks to the server on a free port. Checked:

- the image: non-root `USER`, `EXPOSE 8000`, a `HEALTHCHECK` on the readiness route, size <= 400 MB;
- the start: ready (`GET /readyz` 200) <= 3 s after `buildah run`; the server process's real uid is not 0;
- the API, through the SDK (`vitserve_client`): classification of held-out digits equals onnxruntime on the
  committed artifact in this checkout, an attention map (JSON and PNG), V2 readiness;
- the contents: the image's own HEALTHCHECK command passes, the virtual environment holds exactly
  requirements/serve.txt (no torch), no compiler;
- the stop: SIGTERM to the server ends it gracefully (uvicorn's shutdown runs) within the grace period.

Exit code 0 when every check passed, 1 otherwise; `--report` gets the measurements either way (JSON).
Runs in the dev environment (it imports the checkout's `service`, `model_export` and the SDK).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_SIZE_BYTES = 400 * 10**6  # MB as `podman images` prints them
MAX_READY_S = 3.0
START_TIMEOUT_S = 60.0
GRACE_S = 35.0  # uvicorn's timeout_graceful_shutdown is 30 s


@dataclass
class Report:
    image: str
    checks: dict[str, str] = field(default_factory=dict)  # name -> "ok" or what went wrong
    measurements: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, problem: str = "") -> bool:
        self.checks[name] = "ok" if ok else (problem or "failed")
        return ok

    def attempt(self, name: str, fn: Callable[[], str | None]) -> None:
        """Run one check; it returns None when it passed, else the problem. An exception is a failure too."""
        try:
            problem = fn()
        except Exception as e:  # a smoke test reports every failure, never stops at the first one
            problem = f"{type(e).__name__}: {e}"
        self.check(name, problem is None, problem or "")

    @property
    def passed(self) -> bool:
        return all(v == "ok" for v in self.checks.values())


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields[0] is the state, fields[1] the parent
            found.append(int(stat.parent.name))
    return found


def find_process(root_pid: int, argv: list[str]) -> int | None:
    """The descendant of `root_pid` whose command line is exactly `argv` (buildah's helpers carry a prefix)."""
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            cmdline = []
        if [c.decode() for c in cmdline] == argv:
            return pid
        todo.extend(children(pid))
    return None


def process_started_s_ago(pid: int) -> float:
    """Seconds since the process started (its start time in clock ticks since boot, against /proc/uptime)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Uid line for process {pid}")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def inspect_image(image: str, report: Report) -> dict[str, Any]:
    info = json.loads(sh("podman", "image", "inspect", image).stdout)[0]
    config = info.get("Config") or {}
    size = int(info["Size"])
    report.measurements["size_bytes"] = size
    report.measurements["size_mb"] = round(size / 1e6, 1)
    report.check("size <= 400 MB", size <= MAX_SIZE_BYTES, f"image is {size / 1e6:.1f} MB; the target is 400 MB")
    user = str(config.get("User") or "")
    report.check(
        "USER is not root", user.split(":")[0] not in ("", "0", "root"), f"image USER is {user or 'unset (root)'}"
    )
    ports = config.get("ExposedPorts") or {}
    report.check("EXPOSE 8000", "8000/tcp" in ports, f"exposed ports: {sorted(ports)}")
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}
    test = health.get("Test") or []
    report.check(
        "HEALTHCHECK on /readyz",
        "/readyz" in " ".join(test),
        f"healthcheck is {test or 'missing'} (build with --format docker)",
    )
    return {"entrypoint": (config.get("Entrypoint") or []) + (config.get("Cmd") or []), "healthcheck": test}


def wait_ready(url: str, process: subprocess.Popen[bytes], started: float) -> float:
    import httpx

    deadline = started + START_TIMEOUT_S
    with httpx.Client(timeout=1.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the container exited with {process.returncode} before it was ready")
            try:
                if http.get(f"{url}/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"not ready after {START_TIMEOUT_S} s")


def check_api(url: str) -> str | None:
    """Held-out digits through the container must score as onnxruntime scores them on the checkout's artifact."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    from vitserve_client import Client

    from model_export.digits import held_out_set
    from vit_artifact.metadata import read_metadata
    from vit_artifact.preprocessing import preprocess_batch

    model_dir = ROOT / "models" / "digits-vit"
    meta = read_metadata(model_dir)
    held = held_out_set()
    images = [Image.fromarray(held.images[i]).convert("RGB") for i in range(8)]
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: preprocess_batch(images, meta.preprocessing)})
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)

    with Client(url, timeout=30) as client:
        if not client.ready().ok or client.health().status != "ok":
            return "readyz or healthz not ok"
        if client.models().default != "digits-vit":
            return f"default model is {client.models().default}"
        worst, correct = 0.0, 0
        for i, image in enumerate(images):
            png = io.BytesIO()
            image.save(png, format="PNG")
            result = client.classify(png.getvalue(), top_k=len(meta.labels))
            got = np.zeros(len(meta.labels))
            for p in result.predictions:
                got[p.index] = p.probability
            worst = max(worst, float(np.abs(got - expected[i]).max()))
            correct += result.top.label == str(held.labels[i])
        if worst > 1e-5:
            return f"probabilities differ from onnxruntime on the checkout's artifact by {worst:.2e} (> 1e-5)"
        if correct < 6:
            return f"only {correct} of 8 held-out digits classified correctly"

        attention = client.attention(png.getvalue(), method="rollout")
        grid = (attention.grid.height, attention.grid.width)
        values = np.asarray(attention.map)
        if grid != tuple(meta.grid) or values.shape != grid:
            return f"attention grid {grid}, map {values.shape}; the artifact's grid is {meta.grid}"
        if not (values.min() >= 0 and abs(values.max() - 1) < 1e-6):
            return f"attention map not normalised to [0, 1]: {values.min()}..{values.max()}"
        overlay = client.attention(png.getvalue(), format="png")
        if not overlay.data.startswith(b"\x89PNG\r\n\x1a\n"):
            return "format=png did not return a PNG"
        v2 = client._http.get("/v2/health/ready")  # the SDK speaks the REST API; V2 readiness is one GET
        if v2.status_code != 200:
            return f"GET /v2/health/ready answered {v2.status_code}"
    return None


def in_image(container: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return sh("buildah", "run", "--isolation=chroot", container, "--", *argv)


def check_healthcheck(container: str, test: list[str]) -> str | None:
    """Run the image's own HEALTHCHECK command inside the container, against the running server."""
    argv = test[1:] if test[:1] == ["CMD"] else ["/bin/sh", "-c", *test[1:2]]  # CMD or CMD-SHELL
    done = in_image(container, *argv)
    return None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-500:]}"


# Serving requirements the Dockerfile uses at build time and leaves out of the image: the protobuf compiler that
# generates the gRPC stubs.
BUILD_ONLY = {"grpcio-tools"}


def check_contents(container: str, python: str) -> str | None:
    listing = in_image(
        container,
        python,
        "-c",
        "import importlib.metadata as m, importlib.util as u, json;"
        "print(json.dumps({'dists': sorted(f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions()),"
        " 'torch': u.find_spec('torch') is not None}))",
    )
    if listing.returncode:
        return f"could not list the image's packages: {listing.stderr.strip()}"
    found = json.loads(listing.stdout)
    if found["torch"]:
        return "torch is importable in the image"
    pins = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements" / "serve.txt").read_text().splitlines())
    pinned = {canonical(pin.split("==")[0]) + "==" + pin.split("==")[1] for pin in pins if "==" in pin}
    pinned = {pin for pin in pinned if pin.split("==")[0] not in BUILD_ONLY}
    installed = {canonical(d.split("==")[0]) + "==" + d.split("==")[1] for d in found["dists"]}
    if installed != pinned:
        return f"the image's packages differ from requirements/serve.txt: extra {sorted(installed - pinned)}, missing {sorted(pinned - installed)}"
    compilers = in_image(container, "/bin/sh", "-c", "for c in cc gcc g++ c++ clang; do command -v $c; done; true")
    if compilers.stdout.strip():
        return f"the image has a compiler: {compilers.stdout.split()}"
    if in_image(container, "/bin/sh", "-c", "test -e /run/secrets/pip_cert").returncode == 0:
        return "the build secret pip_cert was left in the image"
    return None


def run_container(image: str, spec: dict[str, Any], report: Report, log_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"vitserve-smoke-{os.getpid()}"
    created = sh("buildah", "from", "--pull=never", "--name", name, image)
    if created.returncode:
        report.check("container created", False, created.stderr.strip())
        return
    container = created.stdout.strip()
    process = None
    server = None
    try:
        sh("buildah", "config", "--env", f"VITSERVE_PORT={port}", "--env", "VITSERVE_LOG_LEVEL=info", container)
        argv = spec["entrypoint"]
        with log_path.open("wb") as log:
            started = time.monotonic()
            process = subprocess.Popen(
                ["buildah", "run", "--isolation=chroot", container, "--", *argv], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            ready_s = wait_ready(url, process, started)
        except (RuntimeError, TimeoutError) as e:
            report.check("ready", False, f"{e}\n{log_path.read_text()[-3000:]}")
            return
        server = find_process(process.pid, argv)
        report.measurements["ready_s"] = round(ready_s, 2)
        report.check("ready <= 3 s", ready_s <= MAX_READY_S, f"ready after {ready_s:.2f} s; the target is 3 s")
        if server is None:
            report.check("server process found", False, f"no process {argv} under buildah run ({process.pid})")
        else:
            since_ready = time.monotonic() - (started + ready_s)
            report.measurements["server_ready_s"] = round(process_started_s_ago(server) - since_ready, 2)
            uid = real_uid(server)
            report.measurements["server_uid"] = uid
            report.check("server runs as non-root", uid != 0, f"the server process {server} runs as uid 0")

        report.attempt("API: classify (parity), attention, V2", lambda: check_api(url))
        report.attempt("HEALTHCHECK command passes", lambda: check_healthcheck(container, spec["healthcheck"]))
        report.attempt(
            "only serve.txt installed; no torch, compiler or build secret", lambda: check_contents(container, argv[0])
        )

        if server is not None:
            stopping = time.monotonic()
            os.kill(server, signal.SIGTERM)
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                report.check("graceful shutdown on SIGTERM", False, f"still running {GRACE_S} s after SIGTERM")
            else:
                report.measurements["shutdown_s"] = round(time.monotonic() - stopping, 2)
                report.measurements["exit_code"] = process.returncode  # buildah run's: the server's, or 1 if signalled
                log_text = log_path.read_text()
                report.check(
                    "graceful shutdown on SIGTERM",
                    "Finished server process" in log_text,
                    f"no uvicorn shutdown in the log:\n{log_text[-2000:]}",
                )
    finally:
        if process is not None and process.poll() is None:
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server, signal.SIGKILL)
            process.kill()
            process.wait(timeout=30)
        sh("buildah", "rm", container)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image")
    parser.add_argument("--report", type=Path, help="write the measurements and checks here (JSON)")
    args = parser.parse_args(argv)
    report = Report(args.image)
    with tempfile.TemporaryDirectory(prefix="vitserve-smoke-") as tmp:
        spec = inspect_image(args.image, report)
        run_container(args.image, spec, report, Path(tmp) / "server.log")
    if args.report:
        args.report.write_text(json.dumps({"passed": report.passed, **vars(report)}, indent=2) + "\n")
    width = max(map(len, report.checks))
    for name, outcome in report.checks.items():
        print(f"  {name:<{width}}  {outcome}")
    print("  " + ", ".join(f"{k}={v}" for k, v in report.measurements.items()))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
