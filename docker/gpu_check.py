"""GPU check: the service on onnxruntime's CUDA provider against bare onnxruntime-CUDA, in one short run.

For a GPU machine reached through the device tool (one H100 or H200, 16 CPU cores, Python 3.12 with torch and
the CUDA 13 libraries as pip packages, onnxruntime 1.30 for the CPU only, no package registry). Three steps:

    python docker/gpu_check.py prepare [--out build/gpu-check]      # here: everything that must travel
    python3 docker/gpu_check.py receive --bundle build/gpu-check    # there, after each call that carries parts
    python3 docker/gpu_check.py run --bundle build/gpu-check --report $OUT/gpu-check.json   # there: the check

`prepare` (`make gpu-check`) puts into one ignored folder, as parts that fit the device tool's calls
(docker/gpu_bundle.py): the onnxruntime-gpu wheel (`ORT_GPU_VERSION`, its CUDA 13 needs already on that
machine), the service's other dependencies as cp312 wheels, the C load generator built statically
(benchmarks/openloop.c), a random-init ViT-B/16 exported here FP32 and FP16 by the real exporter (classify graphs
only: the check never asks for attention), the committed default model, and 640 px JPEG photos. It prints the
device calls that carry it there, each with its `carry` list, and writes them to `<out>/plan.md`.

`run` puts the parts back together, installs the wheels into a private folder without an index, and runs
docker/gpu_measure.py in that environment: parity CUDA vs CPU (probabilities, <= 1e-3), bare onnxruntime-CUDA
images/s at its best batch (FP32, FP16), then the service (`VITSERVE_PROVIDER=cuda`, `VITSERVE_WORKERS` at the
machine's cores) driven by the C load generator with V2 pixel tensors and with JPEG uploads, the ratios, and where
the time goes. One JSON report; exit code 0 when every check passed (the ratios' goals are reported, not gated).

`make gpu-check PROVIDER=cpu` is the same script end to end on this machine's CPU with the default model and its
FP16 variant (`prepare --provider cpu`, then `run`): under 2 minutes, in the test suite, so the check cannot rot
while no GPU machine is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_bundle, gpu_measure: beside this file

import gpu_bundle  # standard library only: `receive` and `run` start before anything is installed

ROOT = Path(__file__).resolve().parents[1]
ORT_GPU_VERSION = "1.31.1"  # the newest onnxruntime-gpu on PyPI (CUDA 13, cuDNN 9); docker/Dockerfile.cuda pins it too
DEFAULT_BUNDLE = {"cuda": "build/gpu-check", "cpu": "build/gpu-check-cpu"}
DEFAULT_STASH = Path(tempfile.gettempdir()) / "vitserve-gpu-check"
RUN_BUDGET_S = 360  # the whole check there, from the first part to the report (the 6 minutes)
# Served from requirements/serve.txt except these: onnxruntime (onnxruntime-gpu replaces it), numpy (the
# machine's own, which onnxruntime-gpu is built against too), and gRPC (off in the check; the machine has grpcio).
NOT_CARRIED = {"onnxruntime", "numpy", "grpcio", "grpcio-tools"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu-check {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


# --- here: what travels ------------------------------------------------------------------------------------


def prepare(provider: str, out: Path, part_mib: float | None, work: Path) -> dict[str, Any]:
    """Stage what travels, write it into `out` as parts and print the device calls that carry it. `work` keeps
    what is made once (downloads, exports) and the staging folder."""
    sys.path.insert(0, str(ROOT))
    staging = work / f"staging-{provider}"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    members: dict[str, Path] = {"openloop": _openloop(), **_uploads(staging)}
    members["models/digits-vit"] = ROOT / "models" / "digits-vit"
    if provider == "cuda":
        members.update(_wheels(work))
        fp32, fp16 = _vit_b16(work)
        members.update(_classify_only(fp32, staging))
        members.update(_classify_only(fp16, staging))
        measured = {"fp32": fp32.name, "fp16": fp16.name}
    else:
        fp16 = _fp16_variant(ROOT / "models" / "digits-vit", work)
        members[f"models/{fp16.name}"] = fp16
        measured = {"fp32": "digits-vit", "fp16": fp16.name}
    check = {"provider": provider, "default_model": "digits-vit", "measured": measured, "created": _now()}
    check["commit"] = _git("rev-parse", "HEAD")
    (staging / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    members["check.json"] = staging / "check.json"

    tree = gpu_bundle.travelling_bytes(ROOT)
    part_bytes = int(part_mib * gpu_bundle.MIB) if part_mib else gpu_bundle.part_size(tree)
    log(f"writing {len(members)} members into {out} as parts of at most {part_bytes / gpu_bundle.MIB:.1f} MiB")
    manifest = gpu_bundle.build(out, members, part_bytes, check)
    bundle = out.resolve().relative_to(ROOT).as_posix() if out.resolve().is_relative_to(ROOT) else str(out)
    calls = gpu_bundle.plan(manifest, bundle, tree)
    text = instructions(manifest, calls, bundle, tree)
    (out / "plan.md").write_text(text)
    print(text, flush=True)
    return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def _openloop() -> Path:
    from benchmarks import openloop

    return openloop.binary(static=True)


def _uploads(staging: Path) -> dict[str, Path]:
    """The JPEG uploads (640 px on the long side, as benchmarks/frontend.py sends ViT-B/16) of four photos."""
    from benchmarks.artifacts import jpeg, photos

    folder = staging / "uploads"
    folder.mkdir()
    for i, (name, image) in enumerate(list(photos().items())[:4]):
        (folder / f"{i:02d}-{name}.jpg").write_bytes(jpeg(image))
    return {"uploads": folder}


def _pip_download(target: Path, *requirements: str) -> None:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(target)]
    command += ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    done = subprocess.run([*command, *requirements], capture_output=True, text=True)
    # pip names every configured index that lacks a package (the Makefile's venv rule hides the same lines)
    said = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")]
    if said:
        print("\n".join(said), file=sys.stderr, flush=True)
    done.check_returncode()


def _wheels(work: Path) -> dict[str, Path]:
    """onnxruntime-gpu (re-packed smaller, gpu_bundle.pack_wheel) and the service's other dependencies, cp312."""
    downloads = work / "wheels"
    downloads.mkdir(parents=True, exist_ok=True)
    pins = []
    for line in (ROOT / "requirements" / "serve.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement and requirement.split("==")[0] not in NOT_CARRIED:
            pins.append(requirement)
    deps = downloads / "deps"
    log(f"downloading {len(pins)} cp312 wheels of requirements/serve.txt and onnxruntime-gpu {ORT_GPU_VERSION}")
    _pip_download(deps, *pins)
    _pip_download(downloads, f"onnxruntime-gpu=={ORT_GPU_VERSION}")
    (wheel,) = downloads.glob(f"onnxruntime_gpu-{ORT_GPU_VERSION}-*.whl")
    packed = downloads / f"{wheel.name}.xz"
    if not packed.is_file():
        log(f"re-packing {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB) with xz (once; a minute or two)")
        packed = gpu_bundle.pack_wheel(wheel, downloads)
    members = {f"wheels/{packed.name}": packed}
    wanted = {pin.split("==")[0].lower().replace("-", "_") for pin in pins}
    for dep in sorted(deps.glob("*.whl")):
        if dep.name.split("-")[0].lower() in wanted:
            members[f"wheels/{dep.name}"] = dep
    return members


def _vit_b16(work: Path) -> tuple[Path, Path]:
    """A random-init ViT-B/16 (benchmarks/artifacts.py's: Hugging Face's ViTConfig defaults, seed 0) exported by
    `python -m model_export hf ... --fp16`; cached by the exporter's sources, as the benchmarks cache theirs."""
    from benchmarks.artifacts import _save_hf_vit_b16, export_key

    base = _cache(work, "vit-b16", export_key())
    fp32, fp16 = base / "models" / "vit-b16", base / "models" / "vit-b16-fp16"
    if not (fp16 / "artifact.json").is_file():
        log(f"exporting a random-init ViT-B/16, FP32 and FP16, into {base} (once: several minutes)")
        if not (base / "hf" / "config.json").is_file():
            _save_hf_vit_b16(base / "hf")
        command = [sys.executable, "-m", "model_export", "hf", str(base / "hf"), "--out", str(fp32), "--fp16"]
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return fp32, fp16


def _fp16_variant(fp32: Path, work: Path) -> Path:
    """The default model's FP16 variant, by the exporter's own code: the dry run's stand-in for ViT-B/16 FP16."""
    import hashlib

    from benchmarks.artifacts import export_key

    key = hashlib.sha256((export_key() + (fp32 / "artifact.json").read_text()).encode()).hexdigest()[:12]
    out = _cache(work, "digits-vit-fp16", key) / "digits-vit-fp16"
    if not (out / "artifact.json").is_file():
        from model_export.variants import make_variant

        make_variant(fp32, out, precision="fp16", name=out.name)
    return out


def _cache(work: Path, name: str, key: str) -> Path:
    """`work/<name>-<key>`, the other keys' folders of `name` removed (an export is hundreds of MB)."""
    import shutil

    for old in work.glob(f"{name}-*"):
        if old.is_dir() and old.name != f"{name}-{key}" and len(old.name) == len(name) + 13:
            shutil.rmtree(old)
    return work / f"{name}-{key}"


def _classify_only(artifact: Path, staging: Path) -> dict[str, Path]:
    """The artifact with its classify graph alone: its artifact.json lists only that graph (which keeps its
    hash), so half the bytes travel."""
    meta = json.loads((artifact / "artifact.json").read_text())
    meta["graphs"] = {"classify": meta["graphs"]["classify"]}
    folder = staging / artifact.name
    folder.mkdir()
    (folder / "artifact.json").write_text(json.dumps(meta, indent=2) + "\n")
    name, file = f"models/{artifact.name}", meta["graphs"]["classify"]["file"]
    return {f"{name}/artifact.json": folder / "artifact.json", f"{name}/{file}": artifact / file}


def instructions(manifest: dict[str, Any], calls: list[list[str]], bundle: str, tree: int) -> str:
    """The device calls, in order, as the device tool takes them."""
    mib = gpu_bundle.MIB
    receive = f"python3 docker/gpu_check.py receive --bundle {bundle}"
    run = f"python3 docker/gpu_check.py run --bundle {bundle} --report $OUT/gpu-check.json"
    lines = [
        f"# GPU check: {len(manifest['parts'])} parts, {manifest['bytes'] / mib:.0f} MiB, in {len(calls)} device "
        f"calls (the working tree is {tree / mib:.1f} MiB of each call's {gpu_bundle.CALL_BYTES // mib} MiB)",
        "",
        f"Prepared {_now()} from commit {manifest['meta'].get('commit', '?')[:12]}. Make the calls back to back: the",
        "machine forgets everything once it is given back (30 s idle), and a later call starts a bare one. Each call",
        "but the last checks its parts and moves them out of the checkout; the last one runs the check (about 4",
        f"minutes; {RUN_BUDGET_S} s at most) and writes the report under $OUT. If a call reports a part missing or",
        "damaged, carry that part folder again before the last call.",
        "",
    ]
    for number, carried in enumerate(calls, 1):
        last = number == len(calls)
        size = sum(p["bytes"] for p in manifest["parts"] if f"{bundle}/{p['folder']}" in carried)
        lines.append(
            f"{number}. run(carry={json.dumps(carried)}, timeout_s={RUN_BUDGET_S + 60 if last else 120}, "
            f"command={json.dumps(run if last else receive)})  # {size / mib:.1f} MiB"
        )
    lines += ["", "Then give_back, unless the check is to be rerun at once (the parts stay while the machine does)."]
    return "\n".join(lines) + "\n"


# --- there: receive, unpack, install, measure --------------------------------------------------------------


def receive(bundle: Path, stash: Path) -> dict[str, Any]:
    status = gpu_bundle.receive(bundle, stash)
    log(
        f"parts: {len(status['have'])} of {status['parts']} received"
        + (f"; missing {status['missing']}" if status["missing"] else "")
        + (f"; DAMAGED (carry again): {status['damaged']}" if status["damaged"] else "")
    )
    return status


def cuda_library_dirs() -> list[str]:
    """Folders of pip's nvidia-* CUDA and cuDNN libraries (as torch's wheels bring them), for the dynamic loader:
    onnxruntime-gpu's CUDA provider links libcudart, libcublas, libcufft, libcurand and libcudnn by name."""
    found: list[str] = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            found += sorted({str(p.parent) for p in nvidia.glob("**/lib/lib*.so*")})
    return found


def run(bundle: Path, stash: Path, report: Path) -> int:
    """Everything there, within RUN_BUDGET_S: receive the last parts, unpack, install, measure (a child process
    in the installed environment), and make sure a report is written whatever happens."""
    report.parent.mkdir(parents=True, exist_ok=True)
    status = receive(bundle, stash)
    if status["missing"] or status["damaged"]:
        return _failed(report, f"parts not here: {status['missing'] + status['damaged']}; carry them first")
    work = stash / "work"
    manifest = gpu_bundle.read_manifest(stash)
    done = stash / "unpacked.json"
    if not done.is_file() or json.loads(done.read_text()) != manifest["parts"]:  # a rerun on the same machine skips
        import shutil

        for old in (work, stash / "site"):
            if old.exists():
                shutil.rmtree(old)
        log(f"unpacking {manifest['bytes'] / 1e6:.0f} MB")
        gpu_bundle.unpack(stash, work)
        installed = gpu_bundle.install(work / "wheels", stash / "site") if (work / "wheels").is_dir() else []
        log(f"installed {len(installed)} wheels into {stash / 'site'}")
        done.write_text(json.dumps(manifest["parts"]))
    env = dict(os.environ)
    path = [str(stash / "site"), str(ROOT), str(ROOT / "client"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*cuda_library_dirs(), env.get("LD_LIBRARY_PATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    left = RUN_BUDGET_S - (time.monotonic() - STARTED)
    command = [sys.executable, __file__, "measure", "--work", str(work), "--report", str(report)]
    log(f"measuring ({left:.0f} s left)")
    child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    copying = threading.Thread(target=_tee, args=(child, report.with_name(f"{report.stem}-measure.log")))
    copying.start()
    try:
        code = child.wait(timeout=max(left, 30))
    except subprocess.TimeoutExpired:
        child.kill()
        code = -1
    copying.join()
    if code == -1:
        return _failed(report, f"the measurement ran past the {RUN_BUDGET_S} s budget; the report holds what it had")
    return code


def _tee(child: subprocess.Popen[str], copy: Path) -> None:
    """The child's output to this one's (the device tool's reply shows its end) and to `copy` (under $OUT)."""
    assert child.stdout is not None
    with copy.open("w") as f:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            f.write(line)


def _failed(report: Path, error: str) -> int:
    """Add `error` to the report (keeping what the measurement had written), and say so."""
    record: dict[str, Any] = json.loads(report.read_text()) if report.is_file() else {"checks": {}}
    record.setdefault("checks", {})["completed"] = False
    record["passed"] = False
    record["error"] = error
    report.write_text(json.dumps(record, indent=2) + "\n")
    log(f"FAILED: {error}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prepare", help="here: write what travels, as parts, and print the device calls")
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda", help="cpu: the dry run's small bundle")
    p.add_argument("--out", type=Path, help="the folder (default: build/gpu-check, or build/gpu-check-cpu)")
    p.add_argument("--part-mib", type=float, help="part size (default: what fits a call beside the working tree)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-check-work", help="downloads, exports, staging")
    for name, text in (("receive", "there: check and keep the parts a call carried"), ("run", "there: the check")):
        p = steps.add_parser(name, help=text)
        p.add_argument("--bundle", type=Path, default=Path(DEFAULT_BUNDLE["cuda"]), help="the prepared folder")
        p.add_argument("--stash", type=Path, help=f"where the parts are kept and unpacked ({DEFAULT_STASH}/<bundle>)")
        if name == "run":
            p.add_argument("--report", type=Path, default=Path("test-artifacts/gpu-check.json"))
    p = steps.add_parser("measure", help=argparse.SUPPRESS)  # run's child, in the installed environment
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.provider, args.out or ROOT / DEFAULT_BUNDLE[args.provider], args.part_mib, args.work)
        return 0
    if args.step in ("receive", "run"):
        stash = args.stash or DEFAULT_STASH / args.bundle.name
        if args.step == "run":
            return run(args.bundle, stash, args.report)
        return 1 if receive(args.bundle, stash)["damaged"] else 0
    import gpu_measure

    return gpu_measure.main(args.work, args.report)


if __name__ == "__main__":
    sys.exit(main())
