"""docker/gpu_check.py with no GPU at hand: how its bundle travels in parts and is put back together, the device
calls it plans, and the whole check as a dry run on this machine's CPU (what `make gpu-check PROVIDER=cpu` runs),
so the script cannot rot between GPU machines."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

DOCKER = ROOT / "docker"


def module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    assert spec and spec.loader
    loaded = sys.modules[name] = importlib.util.module_from_spec(spec)  # as `import` would: dataclasses look there
    spec.loader.exec_module(loaded)
    return loaded


bundle = module("gpu_bundle")
MIB = bundle.MIB


def sample(tmp_path: Path) -> dict[str, Path]:
    """A folder of files of a few sizes, one larger than a part, and a file on its own."""
    rng = __import__("random").Random(0)
    folder = tmp_path / "source" / "models"
    folder.mkdir(parents=True)
    for name, size in (("big.onnx", 3 * MIB + 17), ("small.json", 100), ("empty", 0)):
        (folder / name).write_bytes(rng.randbytes(size))
    single = tmp_path / "source" / "openloop"
    single.write_bytes(b"\x7fELF" + rng.randbytes(5000))
    single.chmod(0o755)
    return {"models": folder, "openloop": single}


def test_the_bundle_travels_in_parts_and_comes_back_whole(tmp_path):
    members = sample(tmp_path)
    out = tmp_path / "build" / "gpu-check"
    manifest = bundle.build(out, members, MIB, {"provider": "cpu"})
    parts = bundle.parts(manifest)
    assert len(parts) == 4 and all(p.bytes <= MIB for p in parts)
    assert all((out / p.folder / bundle.MANIFEST).is_file() for p in parts)  # any one call brings the manifest
    stash = tmp_path / "stash"
    device = tmp_path / "device"  # the checkout there: one part folder per call, the earlier ones may be gone
    for i, part in enumerate(parts):
        (device / part.folder).mkdir(parents=True)
        for file in (out / part.folder).iterdir():
            (device / part.folder / file.name).write_bytes(file.read_bytes())
        status = bundle.receive(device, stash)
        assert len(status["have"]) == i + 1 and not status["damaged"]
        assert not (device / part.path).exists()  # moved out of the checkout
    assert status["missing"] == []
    dest = tmp_path / "unpacked"
    bundle.unpack(stash, dest)
    for name in ("big.onnx", "small.json", "empty"):
        assert (dest / "models" / name).read_bytes() == (members["models"] / name).read_bytes()
    assert (dest / "openloop").read_bytes() == members["openloop"].read_bytes()
    assert (dest / "openloop").stat().st_mode & 0o100  # still executable


def test_a_damaged_part_is_refused_and_named(tmp_path):
    out = tmp_path / "bundle"
    manifest = bundle.build(out, sample(tmp_path), MIB, {})
    first = bundle.parts(manifest)[0]
    data = bytearray((out / first.path).read_bytes())
    data[100] ^= 1
    (out / first.path).write_bytes(bytes(data))
    status = bundle.receive(out, tmp_path / "stash")
    assert status["damaged"] == [first.path] and first.path in status["missing"]
    with pytest.raises(FileNotFoundError, match="not received"):
        bundle.unpack(tmp_path / "stash", tmp_path / "unpacked")


def test_each_call_carries_what_fits_beside_the_working_tree():
    parts = [
        {"folder": f"part-{i:02d}", "file": f"bundle.tar.{i:02d}", "bytes": size, "sha256": "0"}
        for i, size in ((1, 50 * MIB), (2, 50 * MIB), (3, 5 * MIB), (4, 5 * MIB))
    ]
    manifest = {"parts": parts}
    calls = bundle.plan(manifest, "build/gpu-check", tree_bytes=5 * MIB)
    assert calls == [
        ["build/gpu-check/part-01"],
        ["build/gpu-check/part-02", "build/gpu-check/part-03"],
        ["build/gpu-check/part-04"],
    ]
    assert bundle.part_size(5 * MIB) == 57 * MIB  # 64 MiB a call, less the tree and 2 MiB for it to grow
    assert bundle.part_size(0) == bundle.MAX_PART_BYTES  # never over 60 MiB, whatever the room
    with pytest.raises(ValueError, match="working tree alone"):
        bundle.part_size(63 * MIB)


def test_a_wheel_repacked_with_xz_installs_the_same_files(tmp_path):
    import zipfile

    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
        z.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
        z.writestr(
            "demo_pkg-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("demo_pkg-1.0.dist-info/RECORD", "")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    packed = bundle.pack_wheel(wheel, wheels)
    assert packed.name.endswith(".whl.xz") and not list(wheels.glob("*.stored"))
    site = tmp_path / "site"
    assert bundle.install(wheels, site) == [wheel.name]
    assert (site / "demo_pkg" / "__init__.py").read_text() == "VALUE = 42\n"


def test_make_gpu_check_prepares_here_or_runs_the_dry_run():
    def commands(*args: str) -> list[str]:
        made = subprocess.run(["make", "-n", "gpu-check", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return [line.split("docker/gpu_check.py ", 1)[1] for line in made.stdout.splitlines() if "gpu_check.py" in line]

    assert commands() == ["prepare --provider cuda"]
    assert commands("PROVIDER=cpu") == [
        "prepare --provider cpu",
        "run --bundle build/gpu-check-cpu --report test-artifacts/gpu-check-cpu.json",
    ]


@pytest.mark.server
@pytest.mark.slow
def test_the_check_runs_end_to_end_on_the_cpu(tmp_path):
    """`make gpu-check PROVIDER=cpu`: the same prepare and run as on a GPU machine, with the default model and its
    FP16 variant, the parts small so that several travel and are put back together."""
    script = [sys.executable, str(DOCKER / "gpu_check.py")]
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}{__import__('os').pathsep}{ROOT / 'client'}"}
    out = tmp_path / "bundle"
    prepared = subprocess.run(
        [*script, "prepare", "--provider", "cpu", "--out", str(out), "--part-mib", "1", "--work", str(tmp_path / "w")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert "1. run(carry=" in prepared.stdout and (out / "plan.md").is_file()
    report = tmp_path / "out" / "gpu-check.json"
    ran = subprocess.run(
        [*script, "run", "--bundle", str(out), "--stash", str(tmp_path / "stash"), "--report", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    record = json.loads(report.read_text())
    assert ran.returncode == 0 and record["passed"], ran.stdout[-4000:] + ran.stderr[-4000:]
    assert record["environment"]["provider"] == "cpu"
    assert set(record["parity"]) == {"digits-vit", "digits-vit-fp16"}
    for name in ("digits-vit", "digits-vit-fp16"):
        bare = record["bare"][name]
        assert bare["best_images_per_s"] > 0 and bare["service_path"]["bound_run_ms"] > 0
        for kind in ("v2 pixels", "jpeg"):
            point = record["points"][name][kind]
            assert point["images_per_s"] > 0 and point["ratio_to_bare"] > 0
            assert point["batcher"]["batches"] > 0
        assert record["points"][name]["jpeg"]["server_timings_ms"]["decode_ms"] > 0
    assert {row["kind"] for row in record["goals"]} == {"v2 pixels", "jpeg"}
    assert all(row["goal"] is None for row in record["goals"])  # goals are a GPU's
    assert "PASSED" in ran.stdout
    assert "PASSED" in (report.parent / "gpu-check-measure.log").read_text()  # what comes back from $OUT there
    assert "execution providers" in (report.parent / "gpu-check-service.log").read_text()
