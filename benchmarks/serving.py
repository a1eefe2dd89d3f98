"""Serving throughput and latency: vitserve against its ceiling and against two peers, measured in one run.

    PYTHONPATH=. python benchmarks/serving.py            # default model + ViT-B/16 FP32/INT8 (about 20 minutes)
    PYTHONPATH=. python benchmarks/serving.py --quick    # default model only, fewer points (under 3 minutes)

What is compared, for the default model (digits-vit) and ViT-B/16 (random init, benchmarks/artifacts.py):

- (a) in-process onnxruntime at its best batch size (1, 4, 8, 16, 32): the ceiling for any server;
- (b) vitserve over HTTP, one image per request (POST /v1/models/{name}/classify, multipart), batching on
  and off (VITSERVE_BATCHING=false), FP32 and INT8;
- (c) FastAPI + PyTorch eager, one image per request (benchmarks/peers/torch_eager_app.py), FP32;
- (d) BentoML with adaptive batching serving the same ONNX graphs (benchmarks/peers/bentoml_service.py);
- the roofline: the measured GEMM rate over the model's FLOPs per image (benchmarks/roofline.py).

The machine is shared and noisy, so every figure that matters is a ratio of two measurements taken side by
side: all servers of a model run at once (idle ones cost nothing), and each concurrency point visits every
server in turn before the next point, so a noisy minute hits them all. The load generator
(benchmarks/loadgen.py) is a closed loop of N workers in its own process. Uploads are JPEGs of
scikit-image's sample photos (about 640 px on the long side) for ViT-B/16, and PNGs of held-out digit
canvases for the default model.

Writes benchmarks/results/serving.json, serving.md and serving.png.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import artifacts, roofline, servers
from benchmarks.inprocess import BATCH_SIZES, InProcess
from benchmarks.loadgen import drive

RESULTS = Path(__file__).parent / "results"
LOGS = artifacts.CACHE / "bench-logs"  # server logs of the last run
ADJACENT_AT = (16, 64)  # concurrencies where (a) and the GEMM rate are measured again, next to the HTTP point


@dataclass
class Family:
    """One model at two precisions and everything measured about it."""

    key: str
    title: str
    repo: artifacts.Repository
    shape: roofline.ViTShape
    uploads: Callable[[], list[bytes]]
    suffix: str
    concurrencies: tuple[int, ...]
    requests: Callable[[int], int]  # timed requests per point, by concurrency
    duration: float  # timed seconds per point at most
    warmup: Callable[[int], int]
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    rounds: int = 1  # passes over every (concurrency, server) point; the medians over passes are reported
    inprocess_rounds: int = 3
    inprocess: dict = field(default_factory=dict)
    adjacent: dict = field(default_factory=dict)  # precision -> concurrency -> (a) images/s around that point
    gemm_adjacent: dict = field(default_factory=dict)  # concurrency -> GEMM rates measured at that point
    http: dict = field(default_factory=dict)  # server label -> concurrency -> loadgen summary
    agreement: dict = field(default_factory=dict)
    server_rss_mb: dict = field(default_factory=dict)


def digits_family(quick: bool) -> Family:
    return Family(
        key="digits",
        title="digits-vit (default model, 32x32, 142k parameters)",
        repo=artifacts.default_repository(),
        shape=roofline.digits_shape(),
        uploads=artifacts.digit_uploads,
        suffix=".png",
        concurrencies=(1, 16, 64) if quick else (1, 4, 16, 64),
        requests=lambda n: 600 if quick else 1000,
        duration=4.0 if quick else 5.0,
        warmup=lambda n: max(n, 20),
        batch_sizes=(1, 8, 32) if quick else BATCH_SIZES,
        rounds=1 if quick else 2,  # 2 x 1000 requests (or 2 x 5 s): about 2000 a point, spread over the run
    )


def vit_b16_family() -> Family:
    return Family(
        key="vit-b16",
        title="ViT-B/16 (224x224, 86M parameters, random init)",
        repo=artifacts.vit_b16_repository(),
        shape=roofline.VIT_B16,
        uploads=artifacts.photo_uploads,
        suffix=".jpg",
        concurrencies=(1, 4, 16, 64),
        requests=lambda n: max(3 * n, 24) // 2,  # per pass: max(3 N, 24) a point in all
        duration=60.0,  # the slowest peer at 64 clients would need minutes for its answers
        warmup=lambda n: 4,
        rounds=2,
        inprocess_rounds=2,
    )


# ---------------------------------------------------------------------------------------------------- (a)


def in_process(family: Family) -> InProcess:
    """(a): both precisions through the sessions the server builds (service.core.runtime), with onnxruntime's own thread
    count. `sweep()` finds the best batch size; `now(precision)` is measured right before and after each vitserve
    point so that the ratio of the two compares the same minute of a shared machine."""
    from service.core.runtime import CPU, load_model

    models = {
        precision: load_model(family.repo.directory / name, providers=[CPU], threads=0, cpu_rewrites=True)
        for precision, name in (("fp32", family.repo.fp32), ("int8", family.repo.int8))
    }
    return InProcess(models, family.batch_sizes, family.inprocess_rounds)


# ---------------------------------------------------------------------------------------------------- (b-d)


def server_set(family: Family, logs: Path, quick: bool) -> dict[str, servers.Server]:
    repo = family.repo
    fp32, int8 = repo.directory / repo.fp32, repo.directory / repo.int8
    torch_source = "hf" if family.key == "vit-b16" else "digits"
    admission = servers.past_budget(family.key)
    return {
        "vitserve fp32": servers.vitserve(repo.directory, repo.fp32, logs / "vitserve-fp32.log", **admission),
        "vitserve fp32, batching off": servers.vitserve(
            repo.directory, repo.fp32, logs / "vitserve-fp32-off.log", batching=False, **admission
        ),
        "vitserve int8": servers.vitserve(repo.directory, repo.int8, logs / "vitserve-int8.log", **admission),
        "vitserve int8, batching off": servers.vitserve(
            repo.directory, repo.int8, logs / "vitserve-int8-off.log", batching=False, **admission
        ),
        "torch eager fp32": servers.torch_eager(
            torch_source, logs / "torch-eager.log", hf_checkpoint=repo.hf_checkpoint, artifact=fp32
        ),
        "bentoml fp32": servers.bentoml(fp32, logs / "bentoml-fp32.log"),
        "bentoml int8": servers.bentoml(int8, logs / "bentoml-int8.log"),
    }


def measure_http(
    family: Family, images: Path, logs: Path, quick: bool, inprocess: InProcess, log: Callable[[str], None]
) -> None:
    running = server_set(family, logs, quick)
    try:
        for label, server in running.items():
            started = time.perf_counter()
            server.start()
            log(f"  started {label} on {server.url} ({time.perf_counter() - started:.1f} s)")
        passes: dict[str, dict[int, list[dict]]] = {label: {} for label in running}
        for round_ in range(family.rounds):
            for n in family.concurrencies:
                if n in ADJACENT_AT:
                    family.gemm_adjacent.setdefault(n, []).append(roofline.measure_gemm(repeats=3, passes=1))
                order = list(running.items())
                for label, server in order if round_ % 2 == 0 else order[::-1]:  # no server always goes first
                    adjacent = label in ("vitserve fp32", "vitserve int8") and n in ADJACENT_AT
                    precision = label.split()[1] if adjacent else None
                    if precision:  # (a) in the same minute as the point it is compared with: before and after
                        family.adjacent.setdefault(precision, {}).setdefault(n, []).append(inprocess.now(precision))
                    summary = drive(
                        server.url,
                        server.path,
                        images,
                        field=server.field,
                        concurrency=n,
                        requests=family.requests(n),
                        duration=family.duration,
                        warmup=family.warmup(n),
                        timeout=120.0,
                        timings=label.startswith("vitserve"),
                    )
                    if precision:
                        family.adjacent[precision][n].append(inprocess.now(precision))
                    passes[label].setdefault(n, []).append(summary)
                    family.server_rss_mb[label] = round(server.rss_mb(), 1)
                    log(
                        f"  c={n:<3} {label:30} {summary['throughput']:9.2f} img/s  p50 {summary['p50_ms']:9.1f}  "
                        f"p99 {summary['p99_ms']:9.1f} ms  ok {summary['ok']}/{summary['requests']}"
                    )
        family.http = {label: {n: combine(runs) for n, runs in points.items()} for label, points in passes.items()}
    finally:
        for server in running.values():
            server.stop()


def combine(runs: list[dict]) -> dict:
    """Several passes at one point: medians of the rates and percentiles, sums of the counts."""
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in ("throughput", "p50_ms", "p95_ms", "p99_ms")}
    statuses: dict[str, int] = {}
    for r in runs:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    combined = {
        **median,
        "passes": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "ok": sum(r["ok"] for r in runs),
        "statuses": statuses,
        "errors": [r["errors"] for r in runs if r["errors"]],
        "throughput_per_pass": [r["throughput"] for r in runs],
    }
    timings = [r["server_timings_median"] for r in runs if r.get("server_timings_median")]
    if timings:
        combined["server_timings_median"] = {
            k: round(statistics.median(t[k] for t in timings if k in t), 3) for k in timings[0]
        }
    return combined


# ---------------------------------------------------------------------------------------------------- accuracy


def agreement_images() -> list[bytes]:
    """Real photos and crops of them (corners and centre, mirrored too): JPEG uploads as a client would send."""
    from PIL import ImageOps

    uploads = []
    for image in artifacts.photos().values():
        views = [image, ImageOps.mirror(image)]
        w, h = image.size
        cw, ch = int(w * 0.6), int(h * 0.6)
        for fx, fy in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)):
            left, top = int((w - cw) * fx), int((h - ch) * fy)
            crop = image.crop((left, top, left + cw, top + ch))
            views += [crop, ImageOps.mirror(crop)]
        for view in views:
            buffer = io.BytesIO()
            view.convert("RGB").save(buffer, format="JPEG", quality=90)
            uploads.append(buffer.getvalue())
    return uploads


def measure_agreement(family: Family) -> dict:
    """Top-1 agreement of INT8 with FP32 through the service's own decode, preprocessing and sessions."""
    from service.core.pipeline import prepare
    from service.core.runtime import CPU, load_model

    fp32 = load_model(family.repo.directory / family.repo.fp32, providers=[CPU], threads=0, cpu_rewrites=True)
    int8 = load_model(family.repo.directory / family.repo.int8, providers=[CPU], threads=0, cpu_rewrites=True)
    uploads = agreement_images() if family.key == "vit-b16" else family.uploads()
    pixels = np.stack([prepare(u, fp32.meta, max_pixels=40_000_000).pixels for u in uploads])
    a = np.concatenate([fp32.infer(pixels[i : i + 16], with_attention=False)[0] for i in range(0, len(pixels), 16)])
    b = np.concatenate([int8.infer(pixels[i : i + 16], with_attention=False)[0] for i in range(0, len(pixels), 16)])
    top1 = float(np.mean(a.argmax(1) == b.argmax(1)))
    top5 = float(np.mean([a[i].argmax() in np.argsort(-b[i])[:5] for i in range(len(a))]))
    ordered = np.sort(a, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    return {
        "images": len(uploads),
        "top1_agreement": round(top1, 4),
        "fp32_top1_in_int8_top5": round(top5, 4),
        "median_fp32_top1_margin": round(float(np.median(margin)), 4),
        "median_abs_logit_diff": round(float(np.median(np.abs(a - b))), 4),
        "max_abs_logit_diff": round(float(np.abs(a - b).max()), 4),
        "logit_std": round(float(a.std()), 4),
    }


# ---------------------------------------------------------------------------------------------------- report


def throughput(family: Family, label: str, n: int) -> float:
    return float(family.http.get(label, {}).get(n, {}).get("throughput", float("nan")))


def p99(family: Family, label: str, n: int) -> float:
    return float(family.http.get(label, {}).get(n, {}).get("p99_ms", float("nan")))


def ceiling_at(family: Family, precision: str, n: int) -> float:
    """(a) measured around point n (median of the before/after runs), else the batch-size sweep's best."""
    around = family.adjacent.get(precision, {}).get(n)
    return statistics.median(around) if around else family.inprocess[precision]["best_images_per_s"]


def paired_ratio(family: Family, label: str, precision: str, n: int) -> float:
    """HTTP throughput over (a), pass by pass ((a) averaged from just before and just after), then the median."""
    per_pass = family.http.get(label, {}).get(n, {}).get("throughput_per_pass", [])
    around = family.adjacent.get(precision, {}).get(n, [])
    ratios = [t / ((around[2 * i] + around[2 * i + 1]) / 2) for i, t in enumerate(per_pass) if 2 * i + 1 < len(around)]
    return round(statistics.median(ratios), 3) if ratios else float("nan")


def pass_ratio(family: Family, label: str, other: str, n: int) -> float:
    """Throughput of `label` over `other` at point n, pass by pass (the two ran minutes apart at most), median."""
    a = family.http.get(label, {}).get(n, {}).get("throughput_per_pass", [])
    b = family.http.get(other, {}).get(n, {}).get("throughput_per_pass", [])
    ratios = [x / y for x, y in zip(a, b, strict=False) if y]
    return round(statistics.median(ratios), 3) if ratios else float("nan")


def best_gemm(family: Family, opening: dict) -> dict:
    """The highest GEMM rates seen while this family was measured, and at the opening."""
    return roofline.fastest([opening, *(r for rs in family.gemm_adjacent.values() for r in rs)])


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and b == b and a == a else float("nan")


def targets(families: dict[str, Family], gemm: dict) -> list[dict]:
    rows: list[dict] = []

    def add(name: str, value: float, goal: float, *, lower_is_better: bool = False, note: str = "") -> None:
        passed = value <= goal if lower_is_better else value >= goal
        rows.append({"target": name, "measured": value, "goal": goal, "passed": bool(passed), "note": note})

    d = families.get("digits")
    if d is not None:
        add(
            "default model: batching on / off at c=64",
            pass_ratio(d, "vitserve fp32", "vitserve fp32, batching off", 64),
            2.0,
        )
    v = families.get("vit-b16")
    if v is not None:
        top = best_gemm(v, gemm)
        ceiling = roofline.ceiling(top, v.shape)
        for n in (16, 64):
            add(
                f"ViT-B/16 FP32 HTTP c={n} / (a) in-process best",
                paired_ratio(v, "vitserve fp32", "fp32", n),
                0.9,
                note=f"(a) at batch {v.inprocess['fp32']['best_batch']}, measured just before and after each pass's "
                "HTTP point; the median over passes of the paired ratios",
            )
        add(
            "ViT-B/16 FP32 HTTP c=16 / SGEMM roofline",
            ratio(throughput(v, "vitserve fp32", 16), ceiling["fp32_images_per_s"]),
            0.8,
            note=f"roofline {ceiling['fp32_images_per_s']} img/s = {top['sgemm']} GFLOP/s (best SGEMM of the run) / "
            f"{ceiling['gflops_per_image']} GFLOP",
        )
        add(
            "ViT-B/16 (a) in-process FP32 / SGEMM roofline",
            ratio(max(v.adjacent.get("fp32", {}).get(16, [0.0]) or [0.0]), ceiling["fp32_images_per_s"]),
            0.8,
            note="the best (a) of the run: what onnxruntime itself reaches, the bound on the HTTP figure above",
        )
        for n in (16, 64):
            add(
                f"ViT-B/16 INT8 / FP32 HTTP c={n}",
                pass_ratio(v, "vitserve int8", "vitserve fp32", n),
                2.0,
            )
        add(
            "ViT-B/16 INT8 top-1 agreement with FP32 (photos)",
            v.agreement.get("top1_agreement", float("nan")),
            0.99,
            note="random-init weights: logits nearly tied, so top-1 is fragile",
        )
        for n in (16, 64):
            add(
                f"ViT-B/16 vitserve FP32 / torch eager c={n}",
                pass_ratio(v, "vitserve fp32", "torch eager fp32", n),
                1.15,
            )
            add(
                f"ViT-B/16 vitserve INT8 / torch eager FP32 c={n}",
                pass_ratio(v, "vitserve int8", "torch eager fp32", n),
                2.5,
            )
    for f in families.values():
        for precision in ("fp32", "int8"):
            for n in (16, 64):
                ours, theirs = f"vitserve {precision}", f"bentoml {precision}"
                add(
                    f"{f.key} {precision.upper()} vitserve / BentoML throughput c={n}",
                    pass_ratio(f, ours, theirs, n),
                    1.2,
                )
                add(
                    f"{f.key} {precision.upper()} vitserve p99 / BentoML p99 c={n}",
                    ratio(p99(f, ours, n), p99(f, theirs, n)),
                    1.0,
                    lower_is_better=True,
                )
    return rows


def markdown(families: dict[str, Family], gemm: dict, rows: list[dict], meta: dict) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; {meta['elapsed_s']:.0f} s.",
        "Throughput in images/s (one image per request), latency in ms at the client; each point is the median "
        "of its interleaved passes (2 for each model).",
        "",
        f"GEMM (2048^3, best of 5): numpy SGEMM {gemm['numpy_sgemm']} GFLOP/s, onnxruntime SGEMM "
        f"{gemm['onnxruntime_sgemm']} GFLOP/s, onnxruntime INT8 GEMM {gemm['onnxruntime_int8_gemm']} GOP/s.",
        "",
    ]
    for f in families.values():
        fastest = best_gemm(f, gemm)
        ceiling = roofline.ceiling(fastest, f.shape)
        a32, a8 = f.inprocess["fp32"], f.inprocess["int8"]
        lines += [
            f"## {f.title}",
            "",
            f"FLOPs per image {ceiling['gflops_per_image']} GFLOP; roofline {ceiling['fp32_images_per_s']} img/s "
            f"(SGEMM), {ceiling['int8_images_per_s']} img/s (INT8 GEMM), from the best GEMM rates seen while this "
            f"model was measured ({fastest['sgemm']} GFLOP/s, {fastest['onnxruntime_int8_gemm']} GOP/s).",
            "",
            "(a) in-process onnxruntime, images/s by batch size: "
            f"FP32 {a32['images_per_s']} (best {a32['best_images_per_s']} at {a32['best_batch']}); "
            f"INT8 {a8['images_per_s']} (best {a8['best_images_per_s']} at {a8['best_batch']}).",
            "",
            "(a) measured around each vitserve point, images/s: "
            + "; ".join(
                f"{p.upper()} " + ", ".join(f"c={n}: {statistics.median(v):.2f}" for n, v in sorted(pts.items()))
                for p, pts in f.adjacent.items()
            )
            + ".",
            "",
            "| server | c | img/s | p50 ms | p95 ms | p99 ms | ok | / (a) same precision | / roofline | "
            "/ torch eager | server: queue / inference / batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, points in f.http.items():
            precision = "int8" if "int8" in label else "fp32"
            for n, s in points.items():
                t = s["throughput"]
                top = ceiling_at(f, precision, n)
                roof = roofline.ceiling(best_gemm(f, gemm), f.shape)["fp32_images_per_s"]
                st = s.get("server_timings_median", {})
                breakdown = (
                    f"{st.get('queue_ms', 0):.1f} / {st.get('inference_ms', 0):.1f} / {st.get('batch_size', 0):.0f}"
                    if st
                    else ""
                )
                lines.append(
                    f"| {label} | {n} | {t:.2f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | "
                    f"{s['ok']}/{s['requests']} | {ratio(t, top):.2f} | {ratio(t, roof):.2f} | "
                    f"{ratio(t, throughput(f, 'torch eager fp32', n)):.2f} | {breakdown} |"
                )
        if f.agreement:
            lines += ["", f"INT8 vs FP32 on {f.agreement['images']} images: {json.dumps(f.agreement)}"]
        lines += ["", f"Server RSS after the run (MiB): {json.dumps(f.server_rss_mb)}", ""]
    lines += [
        "## Targets",
        "",
        "Throughput ratios are taken pass by pass (the two sides ran minutes apart at most) and the median over "
        "passes is shown; p99 ratios compare the medians.",
        "",
        "| target | measured | goal | met | note |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        sign = "<=" if "p99" in r["target"] else ">="
        lines.append(
            f"| {r['target']} | {r['measured']} | {sign} {r['goal']} | {'yes' if r['passed'] else 'no'} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def plot(families: dict[str, Family], gemm: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(7 * len(families), 5), squeeze=False)
    for ax, f in zip(axes[0], families.values(), strict=True):
        for label, points in f.http.items():
            xs = sorted(points)
            style = "-" if label.startswith("vitserve") else "--"
            ax.plot(xs, [points[x]["throughput"] for x in xs], style, marker="o", label=label)
        for precision, color in (("fp32", "grey"), ("int8", "black")):
            top = f.inprocess[precision]["best_images_per_s"]
            ax.axhline(top, color=color, linestyle=":", label=f"(a) in-process {precision} ({top:.3g})")
            around = f.adjacent.get(precision, {})
            if around:
                xs = sorted(around)
                ax.plot(
                    xs,
                    [statistics.median(around[x]) for x in xs],
                    "x",
                    color=color,
                    markersize=9,
                    label=f"(a) {precision}, measured at the point",
                )
        ceiling = roofline.ceiling(best_gemm(f, gemm), f.shape)["fp32_images_per_s"]
        if f.key == "vit-b16":
            ax.axhline(ceiling, color="red", linestyle="-.", label=f"SGEMM roofline ({ceiling:.1f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(f.concurrencies, [str(c) for c in f.concurrencies])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s (log scale)")
        ax.set_yscale("log")
        ax.set_title(f.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="default model only, fewer points (under 3 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    servers.bentoml_env(log)  # first run: install BentoML into its own environment before the clock matters
    gemm = roofline.measure_gemm(repeats=3 if args.quick else 5)
    log(f"GEMM GFLOP/s: {gemm}")
    families = {"digits": digits_family(args.quick)}
    if not args.quick:
        families["vit-b16"] = vit_b16_family()
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for f in families.values():
            log(f"{f.title}")
            inprocess = in_process(f)
            f.inprocess = inprocess.sweep()
            log(f"  (a) in-process: {json.dumps(f.inprocess)}")
            f.agreement = measure_agreement(f)
            log(f"  INT8 vs FP32: {json.dumps(f.agreement)}")
            images = tmp / f.key
            images.mkdir()
            for i, data in enumerate(f.uploads()):
                (images / f"{i:03d}{f.suffix}").write_bytes(data)
            measure_http(f, images, LOGS / f.key, args.quick, inprocess, log)
            del inprocess
    rows = targets(families, gemm)
    import platform

    meta = {
        "command": "PYTHONPATH=. python benchmarks/serving.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "serving-quick" if args.quick else "serving"
    record = {
        "meta": meta,
        "gemm_gflops": gemm,
        "families": {
            k: {
                "title": f.title,
                "flops": roofline.vit_flops(f.shape),
                "ceiling": roofline.ceiling(best_gemm(f, gemm), f.shape),
                "inprocess": f.inprocess,
                "inprocess_adjacent": f.adjacent,
                "gemm_adjacent": f.gemm_adjacent,
                "agreement": f.agreement,
                "http": f.http,
                "server_rss_mb": f.server_rss_mb,
            }
            for k, f in families.items()
        },
        "targets": rows,
    }
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(families, gemm, rows, meta)
    (args.out / f"{name}.md").write_text(text)
    plot(families, gemm, args.out / f"{name}.png")
    print(text)
    log(f"wrote {args.out / name}.json, .md, .png")


if __name__ == "__main__":
    main()
