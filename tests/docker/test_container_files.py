"""What can be checked of the container files without building them: the CUDA Dockerfile (no registry or GPU
here to build it) and the compose file (no Docker engine here to run it) agree with the CPU Dockerfile, which
tests/docker/test_image.py builds and runs, and with the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DOCKERFILES = {"cpu": ROOT / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_runs_the_service_as_non_root_with_a_readiness_healthcheck(variant: str) -> None:
    final = final_stage(DOCKERFILES[variant])
    ops = dict(final)  # last of each instruction
    assert ops["USER"] == "10001:10001"
    assert ops["EXPOSE"] == "8000"
    entrypoint = json.loads(ops["ENTRYPOINT"])  # exec form: python is PID 1 and gets SIGTERM
    assert entrypoint == ["/opt/venv/bin/python", "-m", "service"]
    assert "/readyz" in ops["HEALTHCHECK"] and "urllib.request" in ops["HEALTHCHECK"]
    env = " ".join(args for op, args in final if op == "ENV")
    assert "VITSERVE_HOST=0.0.0.0" in env and "VITSERVE_MODEL_DIR=/models" in env
    copied = [args for op, args in final if op == "COPY"]
    assert "models /models" in copied and "--from=build /opt/venv /opt/venv" in copied


def test_cuda_dockerfile_swaps_onnxruntime_for_onnxruntime_gpu() -> None:
    text = DOCKERFILES["cuda"].read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", text)
    assert "grep -v '^onnxruntime==' /tmp/serve.txt" in text
    version = re.search(r"ARG ORT_GPU_VERSION=(\d+\.\d+\.\d+)", text)
    gpu_check = (ROOT / "docker" / "gpu_check.py").read_text()
    assert version and f'ORT_GPU_VERSION = "{version.group(1)}"' in gpu_check, (
        "the GPU check tests what the image ships"
    )
    lines = (ROOT / "requirements" / "serve.txt").read_text().splitlines()
    pinned = {line.split("==")[0] for line in lines if "==" in line and not line.startswith("#")}
    assert "onnxruntime" in pinned, "the grep above removes this pin; keep them in step"


def test_cpu_dockerfile_defaults_to_the_official_slim_python() -> None:
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in instructions(DOCKERFILES["cpu"])
    froms = [args for op, args in instructions(DOCKERFILES["cpu"]) if op == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*", "an allow-list: everything else stays out of the build context"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for path in allowed:
        assert (ROOT / path).exists(), f".dockerignore allows {path}, which does not exist"
    copied = {args.split()[0] for op, args in instructions(DOCKERFILES["cpu"]) if op == "COPY" and "--from" not in args}
    for source in copied:
        assert any(source == a or source.startswith(a + "/") or a.startswith(source + "/") for a in allowed), source


def test_compose_builds_both_images_and_reserves_a_gpu_only_in_the_gpu_profile() -> None:
    compose_file = ROOT / "docker" / "compose.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    services = compose["services"]
    cpu, gpu = services["vitserve"], services["vitserve-gpu"]
    for service, dockerfile in ((cpu, DOCKERFILES["cpu"]), (gpu, DOCKERFILES["cuda"])):
        context = (compose_file.parent / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]).resolve() == dockerfile
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        (volume,) = service["volumes"]
        assert volume["target"] == "/models" and volume["read_only"] is True
        default = re.fullmatch(r"\$\{VITSERVE_MODELS:-(.+)\}", volume["source"]).group(1)
        assert (compose_file.parent / default).resolve() == ROOT / "models"
        assert service["ports"][0].endswith(":8000")
    assert "profiles" not in cpu and "deploy" not in cpu
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["VITSERVE_PROVIDER"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
