"""The HTTP front end's cost: vitserve against Triton Inference Server, the same requests, side by side, by h2load.

    PYTHONPATH=. python benchmarks/frontend.py --quick                  # default model, about a minute
    PYTHONPATH=. python benchmarks/frontend.py                          # default model, 3 passes of 10 s points
    PYTHONPATH=. python benchmarks/frontend.py --vit-b16                # and ViT-B/16 FP32 + INT8
    PYTHONPATH=. python benchmarks/frontend.py --vit-b16 --model vit-b16 --duration 20  # ViT-B/16 FP32 only
    PYTHONPATH=. python benchmarks/frontend.py --vitserve-env WORKERS=2 # VITSERVE_WORKERS=2 for every vitserve
    PYTHONPATH=. python benchmarks/frontend.py --variant today root=/work/main --variant new WORKERS=2

For each model, at `--connections` (64) HTTP/1.1 connections from h2load (benchmarks/h2load.py):

- V2 image: an encoded image as a binary BYTES `image` tensor (a PNG digit canvas for the default model, a
  640 px JPEG photo for ViT-B/16), decoded and preprocessed by the server;
- V2 pixels: the same image's model-ready FP32 `pixel_values` tensor;
- /v1/classify: the image as a multipart upload (vitserve only; top-5 JSON answer).

Both V2 kinds send the very same bytes to vitserve and to Triton; before timing, each server answers each
request once and the logits are compared. Triton is the `tritonserver` of the nvidia-pytriton wheel
(benchmarks/servers.py) with two Python-backend models per artifact (benchmarks/peers/triton_model.py): the
pixel tensors go straight to onnxruntime; the images are decoded and preprocessed by vitserve's own functions.
Its dynamic batcher gets vitserve's batch policy (VITSERVE_MAX_BATCH_SIZE, VITSERVE_MAX_QUEUE_DELAY_MS and the
artifact's serving.json) and its instance layout (VITSERVE_INSTANCES and VITSERVE_THREADS as
service.core.runtime.session_layout resolves them here: the same count of sessions as Triton instances, each with the
same threads). It serves the artifact's graph as exported: vitserve's load-time rewrite for the CPU provider
(service/core/graph_rewrite.py) is vitserve's own, as a user deploying the artifact to both would find.

Every server runs for the whole run; each point (model, request kind, server) runs after the server has gone
idle again, and the order of points is reversed every other pass; figures are medians over passes, and ratios
are taken pass by pass and their median reported. Server CPU per image is the CPU time of all the server's
processes (/proc/<pid>/stat, children included) over the timed window, divided by the images answered.

For each ViT-B/16 model the run also measures, once a pass, as a point of its own beside the model's HTTP points
(before them, or after them in the reversed passes), with every server idle:

- the in-process reference (benchmarks/inprocess.py): onnxruntime called in this process at its best batch size
  (found once, before the first pass, among 1, 4, 8, 16, 32), through sessions loaded by vitserve's own start-up
  (service.core.loading.load_repository) with the first variant's settings: the CPU graph rewrite, the session layout and
  the intra-op threads that vitserve picks, each of its instances called at once. No HTTP, decoding,
  preprocessing or queueing: the most images/s any server of these sessions can reach on this machine now;
- the GEMM rates (benchmarks/roofline.py); the roofline is the fastest rate of the run (SGEMM for FP32, the INT8
  GEMM for INT8) over the model's FLOPs an image.

Each HTTP point is divided by its pass's reference and the median over passes reported (the issue's goal: at least
0.95 for FP32); V2 pixels images/s (the median) over the roofline (goal: at least 0.80 for FP32).

vitserve runs with its default settings (its default log level too, access log included), plus `--vitserve-env`;
the default model's 64 closed-loop connections are answered far within the default latency budget, and every
non-2xx answer is counted. The ViT-B/16 models queue (`servers.QUEUEING`): on a CPU, 64 connections wait
seconds for them, past the budget, and these points measure capacity, as Triton's unbounded queue lets it.
A vitserve variant is a label and `KEY=VALUE` items: VITSERVE_KEY=VALUE in its environment, or `root=PATH`
to run another checkout of the service (to compare today's service with a change, side by side; with
`MODEL_DIR=PATH/models` an older checkout serves its own copy of the default model, whose record it can read).

Writes benchmarks/results/frontend.json, frontend.md and frontend.png (`--tag TAG`: frontend-TAG.*; `--replot
JSON` redraws a run's plot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import artifacts, h2load, roofline, servers
from benchmarks.inprocess import InProcess
from service.core.pipeline import prepare
from service.core.runtime import CPU, session_layout
from service.settings import Settings, usable_cpus
from vit_artifact.metadata import read_metadata
from vit_artifact.serving import read_serving_config

RESULTS = Path(__file__).parent / "results"
LOGS = artifacts.CACHE / "bench-logs" / "frontend"  # server logs of the last run
TRITON = "triton"
KINDS = ("v2 image", "v2 pixels", "classify")
IDLE_CPU = 0.1  # a server is idle when it uses less than this share of a core (background threads only)
IN_PROCESS = "in-process"  # the point of a pass that measures the in-process reference and the GEMM rates
REFERENCE_SECONDS = 4.0  # a few calls of ViT-B/16 at its best batch size: steadier than one


@dataclass
class Variant:
    """A vitserve configuration: VITSERVE_* settings and the source tree to run."""

    label: str
    settings: dict[str, str]
    root: Path = servers.ROOT


@dataclass
class Model:
    """One served artifact, the upload that stands for its clients, and the timing of its points."""

    key: str
    artifact: Path
    upload: bytes
    filename: str
    duration: float
    warmup: float
    servers: dict[str, servers.Server] = field(default_factory=dict)
    requests: dict[tuple[str, str], h2load.Request] = field(default_factory=dict)  # (kind, server) -> request
    agreement: dict = field(default_factory=dict)
    triton_layout: str = ""  # the instances and threads Triton was given (vitserve's, see batch_policy)
    shape: roofline.ViTShape | None = None  # set: the in-process reference and the roofline are measured for it
    precision: str = "fp32"
    inprocess: list[float] = field(default_factory=list)  # the in-process reference's images/s, one a pass


def parse_variant(items: list[str], common: dict[str, str]) -> Variant:
    label, *pairs = items
    settings, root = dict(common), servers.ROOT
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"variant {label!r}: {pair!r} is not KEY=VALUE")
        if key == "root":
            root = Path(value).resolve()
        else:
            settings[key.upper().removeprefix("VITSERVE_")] = value
    return Variant(label, settings, root)


def models(args: argparse.Namespace) -> list[Model]:
    default = artifacts.default_repository()
    chosen = [
        Model(
            "digits-vit",
            default.directory / default.fp32,
            artifacts.digit_uploads(1)[0],
            "digit.png",
            args.duration,
            args.warmup,
        )
    ]
    if args.vit_b16:
        repo = artifacts.vit_b16_repository()
        photo = artifacts.photo_uploads()[0]  # scikit-image's astronaut, 640 px JPEG
        # At 64 connections a ViT-B/16 request waits seconds: longer windows, so the timed one is steady.
        for name in (repo.fp32, repo.int8):
            chosen.append(
                Model(
                    name,
                    repo.directory / name,
                    photo,
                    "photo.jpg",
                    args.duration * 3,
                    args.warmup * 4,
                    shape=roofline.VIT_B16,
                )
            )
    return chosen


def server_settings(artifact: Path, settings: dict[str, str]) -> Settings:
    """What a vitserve with these VITSERVE_* settings, serving `artifact` alone, reads (the environment of this
    process, which the servers inherit, included). A variant's MODEL_DIR (an older checkout reading its own copy
    of the artifact) does not change the policy: the served model is the same."""
    lowered = {key.lower(): value for key, value in settings.items() if key != "MODEL_DIR"}
    return Settings(model_dir=artifact.parent, models=[artifact.name], default_model=artifact.name, **lowered)


def batch_policy(artifact: Path, settings: dict[str, str]) -> dict[str, float]:
    """vitserve's batch policy for this artifact (settings, then serving.json), for Triton's dynamic batcher."""
    served = server_settings(artifact, settings)
    policy = {key: float(getattr(served, key)) for key in ("max_batch_size", "max_queue_delay_ms", "max_pixels")}
    overrides = read_serving_config(artifact).overrides()
    policy.update({k: float(v) for k, v in overrides.items() if k in policy})
    meta = read_metadata(artifact, verify_hashes=False)
    policy["instances"], policy["threads"] = session_layout(
        served.instances,
        served.threads,
        providers=[CPU],
        weight_bytes=(artifact / meta.graphs["classify"].file).stat().st_size,
        cpus=usable_cpus(),
    )
    return policy


def build(model: Model, variants: list[Variant], work: Path) -> None:
    """The model's servers (not started) and the requests each is sent."""
    meta = read_metadata(model.artifact, verify_hashes=False)
    model.precision = meta.precision
    logs = LOGS / model.key
    past_budget = {key.upper(): value for key, value in servers.past_budget(model.key).items()}
    for v in variants:
        model.servers[v.label] = servers.vitserve(
            model.artifact.parent,
            model.artifact.name,
            logs / f"{v.label}.log",
            root=v.root,
            **past_budget,
            **v.settings,
        )
    policy = batch_policy(model.artifact, variants[0].settings)
    repository = work / f"triton-{model.key}"
    servers.triton_repository(
        repository,
        model.artifact,
        max_batch_size=int(policy["max_batch_size"]),
        max_queue_delay_ms=policy["max_queue_delay_ms"],
        max_pixels=int(policy["max_pixels"]),
        instances=int(policy["instances"]),
        threads=int(policy["threads"]),
    )
    model.triton_layout = (
        f"Triton: batches of up to {policy['max_batch_size']:g}, {policy['max_queue_delay_ms']:g} ms queue delay, "
        f"{policy['instances']:g} instance(s) of {policy['threads'] or 'onnxruntime-chosen'} thread(s)"
    )
    model.servers[TRITON] = servers.triton(repository, logs / "triton.log")
    pixels = prepare(model.upload, meta, max_pixels=int(policy["max_pixels"])).pixels[None]  # (1, 3, H, W)
    name = model.artifact.name
    for label, server in model.servers.items():
        image_model = f"{name}-image" if label == TRITON else name
        model.requests[("v2 image", label)] = h2load.v2_image(image_model, model.upload)
        model.requests[("v2 pixels", label)] = h2load.v2_pixels(name, pixels)
        if label != TRITON:
            model.requests[("classify", label)] = h2load.multipart(
                server.path, model.filename, model.upload, server.field
            )


def check_agreement(model: Model) -> dict:
    """Every server answers every V2 request once, with 200; logits compared with the first vitserve's."""
    found: dict = {}
    for kind in ("v2 image", "v2 pixels"):
        logits = {}
        for label, server in model.servers.items():
            request = model.requests[(kind, label)]
            response = httpx.post(server.url + request.path, content=request.body, headers=request.headers, timeout=60)
            if response.status_code != 200:
                raise RuntimeError(f"{label} answered {kind} with {response.status_code}: {response.text[:500]}")
            outputs = h2load.v2_outputs(response.content, response.headers.get(h2load.HEADER_LENGTH))
            logits[label] = outputs["logits"]
        reference = next(iter(logits.values()))
        found[kind] = {label: float(np.abs(v - reference).max()) for label, v in logits.items()}
    return found


def reference(chosen: list[Model], settings: dict[str, str], rounds: int) -> InProcess:
    """The in-process reference (benchmarks/inprocess.py) of the models with a roofline shape. Each is loaded by
    service.core.loading.load_repository, vitserve's own start-up, with `settings`: the CPU graph rewrite, session layout
    and threads that server picks (by this checkout's service, whatever a variant's root)."""
    from service.core.loading import load_repository

    loaded = {
        m.key: load_repository(server_settings(m.artifact, settings)).models[m.artifact.name] for m in chosen if m.shape
    }
    return InProcess(loaded, rounds=rounds)


def describe_reference(model: Model, sweep: dict, gemm: dict[str, float]) -> dict:
    """The model's in-process figures and its roofline: the fastest GEMM of the run of its precision over the
    FLOPs an image."""
    assert model.shape is not None
    ceiling = roofline.ceiling(gemm, model.shape)
    int8 = model.precision == "int8"
    return {
        "precision": model.precision,
        "batch_sizes": sweep,
        "per_pass": model.inprocess,
        "roofline": {
            "gemm": "INT8 GEMM" if int8 else "SGEMM",
            "gemm_rate": gemm["onnxruntime_int8_gemm" if int8 else "sgemm"],
            "unit": "GOP/s" if int8 else "GFLOP/s",
            "gflops_per_image": ceiling["gflops_per_image"],
            "images_per_s": ceiling["int8_images_per_s" if int8 else "fp32_images_per_s"],
        },
    }


def schedule(chosen: list[Model]) -> list[tuple[Model, str, str]]:
    """A pass's points, (model, kind, server); a model with a roofline shape has its in-process point first."""
    points = []
    for m in chosen:
        if m.shape:
            points.append((m, IN_PROCESS, ""))
        points += [(m, kind, label) for kind in KINDS for label in m.servers if (kind, label) in m.requests]
    return points


def wait_idle(server: servers.Server, timeout: float = 120.0) -> float:
    """Wait until the server's CPU use falls under IDLE_CPU of a core (it may still be answering the requests
    h2load left in flight); returns the seconds waited."""
    started = time.perf_counter()
    before = server.cpu_seconds()
    while time.perf_counter() - started < timeout:
        time.sleep(0.5)
        now = server.cpu_seconds()
        if now - before < IDLE_CPU * 0.5:
            break
        before = now
    return time.perf_counter() - started


def measure_reference(model: Model, in_process: InProcess, running: list[servers.Server]) -> dict[str, float]:
    """A pass's in-process point, every server idle: the model's reference at its best batch size (kept in
    `model.inprocess`), then the GEMM rates (returned)."""
    for server in running:
        wait_idle(server)
    model.inprocess.append(in_process.now(model.key, REFERENCE_SECONDS))
    return roofline.measure_gemm(repeats=3, passes=1)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return round(statistics.median(values), 3) if values else float("nan")


def combine(runs: list[dict]) -> dict:
    keys = ("throughput", "p50_ms", "p90_ms", "p99_ms", "server_cpu_ms_per_image", "client_cpu_ms_per_request")
    return {
        **{k: median([r[k] for r in runs]) for k in keys},
        "passes": len(runs),
        "ok": sum(r["ok"] for r in runs),
        "non_2xx": sum(r["requests"] - r["ok"] for r in runs),
        "errored": sum(r["errored"] for r in runs),
        "per_pass": {k: [r[k] for r in runs] for k in ("throughput", "p99_ms", "server_cpu_ms_per_image")},
    }


def per_pass(points: dict, kind: str, label: str, key: str = "throughput") -> list[float]:
    return points.get(kind, {}).get(label, {}).get("per_pass", {}).get(key, [])


def pass_ratio(x: list[float], y: list[float]) -> float:
    """x over y pass by pass (the two measured at most a few points apart), then the median."""
    return median([p / q for p, q in zip(x, y, strict=False) if q])


def paired(points: dict, kind: str, a: str, b: str, key: str) -> float:
    """Ratio of `key` of server `a` over server `b` at one kind, pass by pass, then the median."""
    return pass_ratio(per_pass(points, kind, a, key), per_pass(points, kind, b, key))


def row(
    model: str, ratio: str, measured: float, goal: float | None = None, *, lower: bool = False, when: str = ""
) -> dict:
    """A line of the targets table; `goal`: the issue's, where it sets one (`lower`: at most, else at least)."""
    return {
        "model": model,
        "ratio": ratio,
        "measured": measured,
        "goal": f"{'<=' if lower else '>='} {goal}{when}" if goal else "",
        "met": None if goal is None else (measured <= goal if lower else measured >= goal),
    }


def targets(results: dict, variants: list[Variant], references: dict) -> list[dict]:
    """Issue 12's ratios: each vitserve variant over Triton (default model: goals), variants over the first; and
    for the models with an in-process reference, each variant over it and over the roofline."""
    rows = []
    for key, points in results.items():
        goals = key == "digits-vit"  # the issue sets goals on this CPU for the default model
        for v in variants:
            for kind in ("v2 image", "v2 pixels"):
                for name, metric, goal, lower in (
                    ("images/s", "throughput", 1.2, False),
                    ("server CPU per image", "server_cpu_ms_per_image", 0.8, True),
                    ("p99", "p99_ms", None, True),
                ):
                    value = paired(points, kind, v.label, TRITON, metric)
                    rows.append(
                        row(key, f"{v.label} / Triton {name}, {kind}", value, goal if goals else None, lower=lower)
                    )
        for v in variants[1:]:
            for kind in KINDS:
                value = paired(points, kind, v.label, variants[0].label, "throughput")
                goal = 2.0 if kind == "classify" and goals else None
                when = f" (if {variants[0].label} is today's service)"
                rows.append(row(key, f"{v.label} / {variants[0].label} images/s, {kind}", value, goal, when=when))
        if key in references:
            rows += reference_rows(key, points, variants, references[key])
    return rows


def reference_rows(key: str, points: dict, variants: list[Variant], reference: dict) -> list[dict]:
    """Images/s of each variant over the in-process reference, pass by pass, and over the roofline; the issue sets
    goals for ViT-B/16 FP32 (0.95 and 0.80)."""
    fp32 = reference["precision"] == "fp32"
    roof = reference["roofline"]
    rows = []
    for v in variants:
        for kind in KINDS:
            value = pass_ratio(per_pass(points, kind, v.label), reference["per_pass"])
            rows.append(row(key, f"{v.label} {kind} / in-process best", value, 0.95 if fp32 else None))
        value = round(points["v2 pixels"][v.label]["throughput"] / roof["images_per_s"], 3)
        rows.append(row(key, f"{v.label} v2 pixels / {roof['gemm']} roofline", value, 0.8 if fp32 else None))
    value = round(median(reference["per_pass"]) / roof["images_per_s"], 3)
    rows.append(row(key, f"in-process best / {roof['gemm']} roofline", value))
    return rows


def markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [
        "# Front end: vitserve against Triton",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; {meta['elapsed_s']:.0f} s; load average "
        f"{meta['load_average']} at the start. h2load, {meta['connections']} HTTP/1.1 connections; medians over "
        f"{meta['passes']} passes. {meta['note']}",
        "",
        "Variants: "
        + "; ".join(f"{v['label']}: root {v['root']}, settings {v['settings'] or '{}'}" for v in meta["variants"])
        + ".",
        "",
    ]
    gemm = record["gemm"]
    if gemm["runs"]:
        top = gemm["fastest"]
        lines += [
            f"GEMM (2048^3, best of 3), the fastest of {len(gemm['runs'])} runs, one at each in-process point: "
            f"numpy SGEMM {top['numpy_sgemm']} GFLOP/s, onnxruntime SGEMM {top['onnxruntime_sgemm']} GFLOP/s, "
            f"onnxruntime INT8 GEMM {top['onnxruntime_int8_gemm']} GOP/s.",
            "",
        ]
    for key, points in record["results"].items():
        m = record["models"][key]
        lines += [
            f"## {key}",
            "",
            f"{m['timing']}. Max |logits - first vitserve's| per server: {json.dumps(m['agreement'])}.",
            "",
        ]
        ref = record["references"].get(key)
        if ref:
            roof = ref["roofline"]
            lines += [
                f"In-process onnxruntime (benchmarks/inprocess.py; the sessions, layout and threads of "
                f"{meta['variants'][0]['label']}, called in the benchmark's process while the servers are idle), "
                f"images/s by batch size: {json.dumps(ref['batch_sizes']['images_per_s'])}; at its best batch size, "
                f"{ref['batch_sizes']['best_batch']}, once a pass: {ref['per_pass']}. {roof['gemm']} roofline: "
                f"{roof['images_per_s']} img/s = {roof['gemm_rate']} {roof['unit']} / {roof['gflops_per_image']} "
                "GFLOP an image.",
                "",
            ]
        lines += [
            "| request | server | img/s | p50 ms | p90 ms | p99 ms | server CPU ms/img | RSS MiB | h2load CPU ms/req "
            "| ok | non-2xx |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, by_server in points.items():
            for label, s in by_server.items():
                lines.append(
                    f"| {kind} | {label} | {s['throughput']:.1f} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | "
                    f"{s['p99_ms']:.1f} | {s['server_cpu_ms_per_image']:.3f} | {m['rss_mb'].get(label, 0):.0f} | "
                    f"{s['client_cpu_ms_per_request']:.3f} | {s['ok']} | {s['non_2xx']} |"
                )
        lines.append("")
    lines += [
        "## Ratios",
        "",
        "Pass by pass (the two sides ran at most a few points apart), median over passes; over a roofline, the "
        "median images/s over the run's.",
        "",
        "| model | ratio | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for r in record["targets"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['model']} | {r['ratio']} | {r['measured']} | {r['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Images/s and server CPU per image of every server at every request kind, a row of two panels per model:
    bars at the medians, each pass's figure as a dot over its bar (how far apart passes were)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4 * len(results)), squeeze=False)
    for row, (key, points) in zip(axes, results.items(), strict=True):
        kinds = [k for k in KINDS if k in points]
        labels = list(dict.fromkeys(label for k in kinds for label in points[k]))
        width = 0.8 / len(labels)
        for ax, (metric, unit) in zip(
            row, (("throughput", "images/s"), ("server_cpu_ms_per_image", "server CPU ms per image")), strict=True
        ):
            for i, label in enumerate(labels):
                xs = [j + (i - (len(labels) - 1) / 2) * width for j, k in enumerate(kinds) if label in points[k]]
                served = [points[k][label] for k in kinds if label in points[k]]
                color = "black" if label == TRITON else None
                ax.bar(xs, [p[metric] for p in served], width, label=label, color=color, alpha=0.7)
                for x, p in zip(xs, served, strict=True):
                    passes = p["per_pass"].get(metric, [])
                    ax.plot([x] * len(passes), passes, "o", color="dimgrey", markersize=3)
            ax.set_xticks(range(len(kinds)), kinds)
            ax.set_ylabel(unit)
            ax.set_title(f"{key}: {unit} (bars: medians; dots: passes)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 passes of 4 s points (about a minute)")
    parser.add_argument("--vit-b16", action="store_true", help="add ViT-B/16 FP32 and INT8 (exported on first use)")
    parser.add_argument("--passes", type=int, help="passes over every point (default 3; --quick 2)")
    parser.add_argument("--duration", type=float, help="timed seconds a point (default 10; --quick 4; ViT-B/16 x3)")
    parser.add_argument("--warmup", type=float, help="untimed seconds first (default 2; --quick 1; ViT-B/16 x4)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY",
        help="run only this model (repeatable: digits-vit, vit-b16, vit-b16-int8; default: every model chosen)",
    )
    parser.add_argument("--connections", type=int, default=64, help="h2load connections (default 64)")
    parser.add_argument(
        "--vitserve-env", action="append", default=[], metavar="KEY=VALUE", help="VITSERVE_KEY for every vitserve"
    )
    parser.add_argument(
        "--variant",
        action="append",
        nargs="+",
        default=[],
        metavar="LABEL [KEY=VALUE|root=PATH]",
        help="a vitserve variant to run beside the others (repeatable; default: one, 'vitserve')",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--tag", default="", help="suffix of the result files (frontend-TAG.json, .md, .png)")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only draw the plot of a run's frontend.json (beside it)"
    )
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    args.passes = args.passes or (2 if args.quick else 3)
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    # vitserve as a user runs it: its default log level (servers.vitserve quiets it for the other benchmarks).
    defaults = {"LOG_LEVEL": str(Settings.model_fields["log_level"].default)}
    common = parse_variant(["common", *args.vitserve_env], defaults).settings
    variants = [parse_variant(items, common) for items in args.variant] or [Variant("vitserve", common)]
    if len({v.label for v in variants} | {TRITON}) != len(variants) + 1:
        raise SystemExit(f"variant labels must differ from each other and from {TRITON!r}")
    started = time.perf_counter()
    load_average = os.getloadavg()
    # Servers run in sessions of their own; a SIGTERM to this script must still stop them (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    servers.triton_env(log)  # first run: install Triton into its own environment before the clock matters
    chosen = [m for m in models(args) if not args.model or m.key in args.model]
    if not chosen:
        raise SystemExit(f"no model among {args.model} (--vit-b16 for the ViT-B/16 ones)")
    running: list[servers.Server] = []
    passes: dict[str, dict[str, dict[str, list[dict]]]] = {m.key: {} for m in chosen}
    rss: dict[str, dict[str, float]] = {m.key: {} for m in chosen}
    gemm: list[dict[str, float]] = []  # GEMM rates, measured at each in-process point
    sweep: dict = {}
    with tempfile.TemporaryDirectory(prefix="vitserve-frontend-") as work_name:
        try:
            for m in chosen:
                build(m, variants, Path(work_name))
                for label, server in m.servers.items():
                    t0 = time.perf_counter()
                    running.append(server.start())
                    log(f"started {m.key} {label} on {server.url} ({time.perf_counter() - t0:.1f} s)")
                m.agreement = check_agreement(m)
                log(f"{m.key} max |logits difference|: {json.dumps(m.agreement)}")
            in_process = reference(chosen, variants[0].settings, rounds=1 if args.quick else 2)
            for server in running:
                wait_idle(server)
            sweep = in_process.sweep()
            if sweep:
                log(f"in-process images/s by batch size: {json.dumps(sweep)}")
            points = schedule(chosen)
            for round_ in range(args.passes):
                for m, kind, label in points if round_ % 2 == 0 else points[::-1]:
                    if kind == IN_PROCESS:
                        gemm.append(measure_reference(m, in_process, running))
                        log(
                            f"pass {round_ + 1} {m.key:16} {IN_PROCESS} at batch {in_process.best[m.key]}: "
                            f"{m.inprocess[-1]:.1f} img/s; GEMM {json.dumps(gemm[-1])}"
                        )
                        continue
                    server = m.servers[label]
                    waited = wait_idle(server)
                    summary = h2load.run(
                        server.url,
                        m.requests[(kind, label)],
                        connections=args.connections,
                        duration=m.duration,
                        warmup=m.warmup,
                        cpu=server.cpu_seconds,
                    )
                    passes[m.key].setdefault(kind, {}).setdefault(label, []).append(summary)
                    rss[m.key][label] = max(rss[m.key].get(label, 0.0), round(server.rss_mb(), 1))
                    log(
                        f"pass {round_ + 1} {m.key:16} {kind:9} {label:12} {summary['throughput']:8.1f} img/s  "
                        f"p50 {summary['p50_ms']:7.1f}  p99 {summary['p99_ms']:7.1f} ms  "
                        f"CPU {summary.get('server_cpu_ms_per_image', 0):6.3f} ms/img  "
                        f"non-2xx {summary['requests'] - summary['ok']}  (idle wait {waited:.1f} s)"
                    )
        finally:
            for server in running:
                server.stop()
    results = {
        key: {kind: {label: combine(runs) for label, runs in by_server.items()} for kind, by_server in by_kind.items()}
        for key, by_kind in passes.items()
    }
    fastest = roofline.fastest(gemm) if gemm else {}
    references = {m.key: describe_reference(m, sweep[m.key], fastest) for m in chosen if m.shape}
    meta = {
        "command": "PYTHONPATH=. python benchmarks/frontend.py " + shlex.join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": time.perf_counter() - started,
        "load_average": [round(x, 1) for x in load_average],
        "connections": args.connections,
        "passes": args.passes,
        "note": "The machine is shared: compare ratios within this run, not numbers across runs.",
        "variants": [{"label": v.label, "settings": v.settings, "root": str(v.root)} for v in variants],
    }
    record = {
        "meta": meta,
        "models": {
            m.key: {
                "artifact": str(m.artifact),
                "upload_bytes": len(m.upload),
                "timing": f"{m.warmup:g} s warm-up + {m.duration:g} s timed a point; upload {m.filename}, "
                f"{len(m.upload)} bytes; {m.triton_layout} (vitserve's layout and batch policy)",
                "agreement": m.agreement,
                "rss_mb": rss[m.key],
            }
            for m in chosen
        },
        "results": results,
        "gemm": {"runs": gemm, "fastest": fastest},
        "references": references,
        "targets": targets(results, variants, references),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"frontend-{args.tag}" if args.tag else "frontend"
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    (args.out / f"{name}.md").write_text(text)
    plot(record, args.out / f"{name}.png")
    print(text)
    log(f"wrote {args.out / name}.json, .md and .png")


if __name__ == "__main__":
    main()
