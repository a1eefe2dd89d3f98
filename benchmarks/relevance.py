"""Relevance maps (Chefer, Gur & Wolf, ICCV 2021) on the default model's held-out canvases, against attention
rollout, the last layer's class-token attention and a random map: class specificity, faithfulness (the paper's
positive and negative perturbation), the pointing game, and what a map costs beside a classification.

    PYTHONPATH=. python benchmarks/relevance.py [--images 1436] [--repeats 31] [--http-requests 20]

- Class specificity: the Pearson correlation of each image's top-1 and top-2 class maps, averaged. Rollout and
  class-token attention draw one map whatever the class (correlation 1 by construction).
- Perturbation: each image's 64 patches are replaced by the data set's mean (per channel, in the model's input
  space), the most relevant first (positive: accuracy should fall fast, lower area is better) or the least
  relevant first (negative: higher is better), 0% to 90% in steps of 10%; top-1 accuracy against the true digit
  at each step, and the area under that curve as the mean over the ten steps, in percent. Maps explain the
  predicted class, as in the paper.
- Pointing game: the map's maximum falls inside the digit's box.
- Cost: per image, one image per call, in-process (onnxruntime, one thread, the three graphs run interleaved)
  and through HTTP (a real server, requests interleaved; its CPU seconds per request), medians and ratios.

Writes benchmarks/results/relevance.json and relevance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from model_export.digits import pointing_hits
from model_export.evaluate import held_out_inputs, png
from model_export.verify import session
from vit_artifact.attention import cls_attention, rollout
from vit_artifact.metadata import ATTENTIONS, INPUT_NAME, LOGITS, RELEVANCE, TARGET_NAME, read_metadata

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits-vit"
RESULTS = Path(__file__).parent / "results"
STEPS = np.arange(10) / 10  # fraction of patches removed
BATCH = 64


def relevance_maps(sess, x: np.ndarray, targets: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    parts = [
        sess.run([RELEVANCE], {INPUT_NAME: x[i : i + BATCH], TARGET_NAME: targets[i : i + BATCH]})[0]
        for i in range(0, len(x), BATCH)
    ]
    return np.concatenate(parts)


def attention_maps(sess, x: np.ndarray, meta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    logits, roll, cls = [], [], []
    for i in range(0, len(x), BATCH):
        lg, att = sess.run([LOGITS, ATTENTIONS], {INPUT_NAME: x[i : i + BATCH]})
        logits.append(lg)
        for a in att:
            roll.append(rollout(a, num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid))
            cls.append(cls_attention(a, num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid))
    return np.concatenate(logits), np.stack(roll), np.stack(cls)


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps (N, gh, gw); a constant map correlates 0 with anything."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    denominator = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(denominator > 0, (a * b).sum(1) / np.where(denominator > 0, denominator, 1), 0.0)


def perturbation(classify, x: np.ndarray, labels: np.ndarray, maps: np.ndarray, patch: int, *, positive: bool):  # type: ignore[no-untyped-def]
    """Top-1 accuracy after removing 0%, 10%, ... 90% of the patches, most (positive) or least relevant first."""
    n, gh, gw = maps.shape
    mean = x.mean(axis=(0, 2, 3), keepdims=True)[0]  # (3, 1, 1): the data set's mean, per channel
    flat = maps.reshape(n, -1)
    order = np.argsort(-flat if positive else flat, axis=1, kind="stable")  # (N, P), first removed first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(gh * gw)[None], axis=1)  # (N, P): when each patch is removed
    accuracy = []
    for fraction in STEPS:
        removed = (rank < round(float(fraction) * gh * gw)).reshape(n, 1, gh, gw)
        pixels = removed.repeat(patch, axis=2).repeat(patch, axis=3)  # (N, 1, H, W)
        xs = np.where(pixels, mean, x).astype(np.float32)
        logits = np.concatenate(
            [classify.run([LOGITS], {INPUT_NAME: xs[j : j + BATCH]})[0] for j in range(0, n, BATCH)]
        )
        accuracy.append(float(np.mean(logits.argmax(1) == labels)))
    return accuracy


def in_process_cost(meta, x: np.ndarray, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median ms per image, one image per call, one thread, the three paths interleaved."""
    classify = session(MODEL / meta.graphs["classify"].file, threads=1)
    attention = session(MODEL / meta.graphs["attention"].file, threads=1)
    relevance = session(MODEL / meta.graphs["relevance"].file, threads=1)
    target = np.array([-1], dtype=np.int64)

    def run_classify(image: np.ndarray) -> None:
        classify.run([LOGITS], {INPUT_NAME: image})

    def run_rollout(image: np.ndarray) -> None:
        _, att = attention.run([LOGITS, ATTENTIONS], {INPUT_NAME: image})
        rollout(att[0], num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid)

    def run_relevance(image: np.ndarray) -> None:
        relevance.run([LOGITS, RELEVANCE], {INPUT_NAME: image, TARGET_NAME: target})

    paths = {"classify": run_classify, "rollout": run_rollout, "relevance": run_relevance}
    times: dict[str, list[float]] = {name: [] for name in paths}
    images = [x[i : i + 1] for i in range(min(len(x), 32))]
    for run in paths.values():  # warm-up
        for image in images[:4]:
            run(image)
    for _ in range(repeats):
        for name, run in paths.items():
            t0 = time.process_time()
            for image in images:
                run(image)
            times[name].append((time.process_time() - t0) / len(images) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def http_cost(held, requests: int, repeats: int) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Through a real server: median wall ms per request and the server's CPU ms per request, interleaved."""
    import httpx

    from benchmarks.servers import vitserve

    queries = {
        "classify": ("/v1/classify", {}),
        "rollout": ("/v1/attention", {"method": "rollout"}),
        "relevance": ("/v1/attention", {"method": "relevance"}),
    }
    pngs = [png(c) for c in held.images[:requests]]
    wall: dict[str, list[float]] = {name: [] for name in queries}
    cpu: dict[str, list[float]] = {name: [] for name in queries}
    with (
        tempfile.TemporaryDirectory() as tmp,
        vitserve(ROOT / "models", "digits-vit", Path(tmp) / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for path, params in queries.values():  # warm-up
            for data in pngs[:4]:
                client.post(path, params=params, files={"file": ("x.png", data)}).raise_for_status()
        for _ in range(repeats):
            for name, (path, params) in queries.items():
                before = server.cpu_seconds()
                for data in pngs:
                    t0 = time.perf_counter()
                    client.post(path, params=params, files={"file": ("x.png", data)}).raise_for_status()
                    wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((server.cpu_seconds() - before) / len(pngs) * 1e3)
    return {
        name: {"wall_ms": statistics.median(wall[name]), "server_cpu_ms": statistics.median(cpu[name])}
        for name in queries
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=0, help="held-out canvases to score (default: all)")
    parser.add_argument("--repeats", type=int, default=31, help="interleaved timing rounds")
    parser.add_argument("--http-requests", type=int, default=20, help="requests per path per HTTP round")
    parser.add_argument("--http-repeats", type=int, default=7)
    args = parser.parse_args()
    meta = read_metadata(MODEL)
    x, held = held_out_inputs(meta)
    if args.images:
        x, labels, boxes = x[: args.images], held.labels[: args.images], held.boxes[: args.images]
    else:
        labels, boxes = held.labels, held.boxes
    n = len(x)
    classify = session(MODEL / meta.graphs["classify"].file)
    logits, roll, cls = attention_maps(session(MODEL / meta.graphs["attention"].file), x, meta)
    order = np.argsort(-logits, axis=1)
    relevance = session(MODEL / meta.graphs["relevance"].file)
    top1 = relevance_maps(relevance, x, np.full(n, -1, np.int64))
    top2 = relevance_maps(relevance, x, order[:, 1].astype(np.int64))
    random = np.random.default_rng(0).random(top1.shape)
    methods = {"relevance": top1, "rollout": roll, "class-token attention": cls, "random": random}

    corr = correlation(top1, top2)
    patch = meta.patch_size
    faithfulness = {}
    for name, maps in methods.items():
        pos = perturbation(classify, x, labels, maps, patch, positive=True)
        neg = perturbation(classify, x, labels, maps, patch, positive=False)
        faithfulness[name] = {
            "positive_auc": round(100 * float(np.mean(pos)), 2),
            "negative_auc": round(100 * float(np.mean(neg)), 2),
            "positive_curve": [round(a, 4) for a in pos],
            "negative_curve": [round(a, 4) for a in neg],
            "pointing_game": round(float(np.mean(pointing_hits(maps, boxes, meta.input_size[0]))), 4),
        }
        print(
            f"{name:22} positive AUC {faithfulness[name]['positive_auc']:6.2f}  negative AUC "
            f"{faithfulness[name]['negative_auc']:6.2f}  pointing {faithfulness[name]['pointing_game']:.2%}"
        )
    cost = in_process_cost(meta, x, args.repeats)
    http = http_cost(held, args.http_requests, args.http_repeats)
    result = {
        "model": "digits-vit (models/digits-vit)",
        "images": n,
        "accuracy": round(float(np.mean(logits.argmax(1) == labels)), 4),
        "class_specificity": {
            "relevance_top1_top2_mean_correlation": round(float(corr.mean()), 4),
            "relevance_top1_top2_median_correlation": round(float(np.median(corr)), 4),
            "rollout": 1.0,
            "class-token attention": 1.0,
        },
        "faithfulness": faithfulness,
        "cost_in_process_ms_per_image": {k: round(v, 4) for k, v in cost.items()},
        "cost_in_process_ratio_to_classify": {k: round(v / cost["classify"], 2) for k, v in cost.items()},
        "cost_http": {k: {m: round(v, 3) for m, v in d.items()} for k, d in http.items()},
        "cost_http_ratio_to_classify": {
            k: {m: round(v / http["classify"][m], 2) for m, v in d.items()} for k, d in http.items()
        },
        "command": "PYTHONPATH=. python benchmarks/relevance.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "relevance.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "relevance.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [
        f"# Relevance maps on the default model ({r['images']} held-out canvases, accuracy {r['accuracy']:.2%})",
        "",
        f"`{r['command']}`",
        "",
        f"Class specificity: mean correlation of the top-1 and top-2 class maps "
        f"{r['class_specificity']['relevance_top1_top2_mean_correlation']:.3f} (median "
        f"{r['class_specificity']['relevance_top1_top2_median_correlation']:.3f}); rollout and class-token "
        "attention 1 by construction.",
        "",
        "| map | positive perturbation AUC (lower is better) | negative perturbation AUC (higher is better) | pointing game |",
        "|---|---|---|---|",
    ]
    for name, f in r["faithfulness"].items():
        lines.append(f"| {name} | {f['positive_auc']:.2f} | {f['negative_auc']:.2f} | {f['pointing_game']:.1%} |")
    c, cr = r["cost_in_process_ms_per_image"], r["cost_in_process_ratio_to_classify"]
    h, hr = r["cost_http"], r["cost_http_ratio_to_classify"]
    lines += [
        "",
        "| cost per image | in-process CPU ms (one thread) | ratio | HTTP wall ms | ratio | server CPU ms per request | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in c:
        lines.append(
            f"| {name} | {c[name]:.3f} | {cr[name]:.2f}x | {h[name]['wall_ms']:.2f} | {hr[name]['wall_ms']:.2f}x | "
            f"{h[name]['server_cpu_ms']:.2f} | {hr[name]['server_cpu_ms']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
