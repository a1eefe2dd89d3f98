"""The HTTP front end's cost: vitserve against Triton Inference Server, the same requests, side by side, by h2load.

    PYTHONPATH=. python benchmarks/frontend.py --quick                  # default model, about a minute
    PYTHONPATH=. python benchmarks/frontend.py                          # default model, 3 passes of 10 s points
    PYTHONPATH=. python benchmarks/frontend.py --vit-b16                # and ViT-B/16 FP32 + INT8
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
service.runtime.session_layout resolves them here: the same count of sessions as Triton instances, each with the
same threads). It serves the artifact's graph as exported: vitserve's load-time rewrite for the CPU provider
(service/graph_rewrite.py) is vitserve's own, as a user deploying the artifact to both would find.

Every server runs for the whole run; each point (model, request kind, server) runs after the server has gone
idle again, and the order of points is reversed every other pass; figures are medians over passes, and ratios
are taken pass by pass and their median reported. Server CPU per image is the CPU time of all the server's
processes (/proc/<pid>/stat, children included) over the timed window, divided by the images answered.

vitserve runs with its default settings (its default log level too, access log included) but queueing admission
(`servers.CLOSED_LOOP`: 64 closed-loop clients would otherwise meet the adaptive limit's fast 503s), plus
`--vitserve-env`.
A vitserve variant is a label and `KEY=VALUE` items: VITSERVE_KEY=VALUE in its environment, or `root=PATH`
to run another checkout of the service (to compare today's service with a change, side by side).

Writes benchmarks/results/frontend.json and frontend.md.
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

from benchmarks import artifacts, h2load, servers
from service.pipeline import prepare
from service.runtime import CPU, session_layout
from service.settings import Settings, usable_cpus
from vit_artifact.metadata import read_metadata
from vit_artifact.serving import read_serving_config

RESULTS = Path(__file__).parent / "results"
LOGS = artifacts.CACHE / "bench-logs" / "frontend"  # server logs of the last run
TRITON = "triton"
KINDS = ("v2 image", "v2 pixels", "classify")
IDLE_CPU = 0.1  # a server is idle when it uses less than this share of a core (background threads only)


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
            chosen.append(Model(name, repo.directory / name, photo, "photo.jpg", args.duration * 3, args.warmup * 4))
    return chosen


def batch_policy(artifact: Path, settings: dict[str, str]) -> dict[str, float]:
    """vitserve's batch policy for this artifact (settings, then serving.json), for Triton's dynamic batcher."""
    fields = Settings.model_fields
    policy = {
        key: float(settings.get(key.upper(), fields[key].default))
        for key in ("max_batch_size", "max_queue_delay_ms", "max_pixels")
    }
    overrides = read_serving_config(artifact).overrides()
    policy.update({k: float(v) for k, v in overrides.items() if k in policy})
    meta = read_metadata(artifact, verify_hashes=False)
    policy["instances"], policy["threads"] = session_layout(
        int(settings.get("INSTANCES", fields["instances"].default)),
        int(settings.get("THREADS", fields["threads"].default)),
        providers=[CPU],
        weight_bytes=(artifact / meta.graphs["classify"].file).stat().st_size,
        cpus=usable_cpus(),
    )
    return policy


def build(model: Model, variants: list[Variant], work: Path) -> None:
    """The model's servers (not started) and the requests each is sent."""
    meta = read_metadata(model.artifact, verify_hashes=False)
    logs = LOGS / model.key
    for v in variants:
        model.servers[v.label] = servers.vitserve(
            model.artifact.parent, model.artifact.name, logs / f"{v.label}.log", root=v.root, **v.settings
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


def paired(points: dict, kind: str, a: str, b: str, key: str) -> float:
    """Ratio of `key` of server `a` over server `b` at one kind, pass by pass, then the median."""
    x = points.get(kind, {}).get(a, {}).get("per_pass", {}).get(key, [])
    y = points.get(kind, {}).get(b, {}).get("per_pass", {}).get(key, [])
    return median([p / q for p, q in zip(x, y, strict=False) if q])


def targets(results: dict, variants: list[Variant]) -> list[dict]:
    """Issue 12's ratios: each vitserve variant over Triton (default model: goals), variants over the first."""
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
                        {
                            "model": key,
                            "ratio": f"{v.label} / Triton {name}, {kind}",
                            "measured": value,
                            "goal": (f"<= {goal}" if lower else f">= {goal}") if goals and goal else "",
                            "met": (value <= goal if lower else value >= goal) if goals and goal else None,
                        }
                    )
        for v in variants[1:]:
            for kind in KINDS:
                value = paired(points, kind, v.label, variants[0].label, "throughput")
                goal = 2.0 if kind == "classify" and goals else None
                rows.append(
                    {
                        "model": key,
                        "ratio": f"{v.label} / {variants[0].label} images/s, {kind}",
                        "measured": value,
                        "goal": f">= {goal} (if {variants[0].label} is today's service)" if goal else "",
                        "met": value >= goal if goal else None,
                    }
                )
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
    for key, points in record["results"].items():
        m = record["models"][key]
        lines += [
            f"## {key}",
            "",
            f"{m['timing']}. Max |logits - first vitserve's| per server: {json.dumps(m['agreement'])}.",
            "",
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
        "Pass by pass (the two servers ran at most a few points apart), median over passes.",
        "",
        "| model | ratio | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for r in record["targets"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['model']} | {r['ratio']} | {r['measured']} | {r['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 passes of 4 s points (about a minute)")
    parser.add_argument("--vit-b16", action="store_true", help="add ViT-B/16 FP32 and INT8 (exported on first use)")
    parser.add_argument("--passes", type=int, help="passes over every point (default 3; --quick 2)")
    parser.add_argument("--duration", type=float, help="timed seconds a point (default 10; --quick 4; ViT-B/16 x3)")
    parser.add_argument("--warmup", type=float, help="untimed seconds first (default 2; --quick 1; ViT-B/16 x4)")
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
    args = parser.parse_args()
    args.passes = args.passes or (2 if args.quick else 3)
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    # vitserve as a user runs it: its default log level (servers.vitserve quiets it for the other benchmarks).
    defaults = {"LOG_LEVEL": str(Settings.model_fields["log_level"].default)}
    defaults.update({k.upper(): v for k, v in servers.CLOSED_LOOP.items()})
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
    chosen = models(args)
    running: list[servers.Server] = []
    passes: dict[str, dict[str, dict[str, list[dict]]]] = {m.key: {} for m in chosen}
    rss: dict[str, dict[str, float]] = {m.key: {} for m in chosen}
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
            points = [
                (m, kind, label) for m in chosen for kind in KINDS for label in m.servers if (kind, label) in m.requests
            ]
            for round_ in range(args.passes):
                for m, kind, label in points if round_ % 2 == 0 else points[::-1]:
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
        "targets": targets(results, variants),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontend.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    (args.out / "frontend.md").write_text(text)
    print(text)
    log(f"wrote {args.out / 'frontend'}.json and .md")


if __name__ == "__main__":
    main()
