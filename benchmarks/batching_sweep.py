"""Choosing the batching defaults by measurement: max_batch_size x max_queue_delay_ms, one server per setting.

    PYTHONPATH=. python benchmarks/batching_sweep.py             # default model, then ViT-B/16 FP32 and INT8
    PYTHONPATH=. python benchmarks/batching_sweep.py --quick     # default model only

Every setting is its own `python -m service` (VITSERVE_MAX_BATCH_SIZE, VITSERVE_MAX_QUEUE_DELAY_MS), all running
at once; each concurrency point visits every server in turn (alternating the order between passes), so the
shared machine's noise hits every setting alike, and the medians over passes are compared. The default model
is swept over batch sizes and queue delays; ViT-B/16, whose runtime call takes hundreds of milliseconds (a
delay of a few milliseconds changes nothing), over batch sizes only. Writes benchmarks/results/batching_sweep.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import artifacts, servers
from benchmarks.loadgen import drive

RESULTS = Path(__file__).parent / "results"
LOGS = artifacts.CACHE / "bench-logs" / "sweep"


def sweep(
    repo_dir: Path,
    model: str,
    images: Path,
    grid: list[tuple[int, float]],
    concurrencies: tuple[int, ...],
    *,
    requests: Callable[[int], int],
    duration: float,
    warmup: Callable[[int], int],
    passes: int,
    log: Callable[[str], None],
) -> list[dict]:
    running = {
        (b, d): servers.vitserve(
            repo_dir,
            model,
            LOGS / f"{model}-b{b}-d{d:g}.log",
            max_batch_size=b,
            max_queue_delay_ms=d,
        )
        for b, d in grid
    }
    runs: dict[tuple[int, float, int], list[dict]] = {}
    try:
        for server in running.values():
            server.start()
        for p in range(passes):
            for n in concurrencies:
                order = list(running.items())
                for (b, d), server in order if p % 2 == 0 else order[::-1]:
                    s = drive(
                        server.url,
                        server.path,
                        images,
                        concurrency=n,
                        requests=requests(n),
                        duration=duration,
                        warmup=warmup(n),
                        timeout=120.0,
                        timings=True,
                    )
                    runs.setdefault((b, d, n), []).append(s)
                    log(
                        f"  {model} batch {b:<3} delay {d:<4g} c={n:<3} {s['throughput']:8.2f} img/s  "
                        f"p50 {s['p50_ms']:8.1f}  p99 {s['p99_ms']:8.1f} ms  "
                        f"batch {s.get('server_timings_median', {}).get('batch_size', 0):.0f}"
                    )
    finally:
        for server in running.values():
            server.stop()
    rows = []
    for (b, d, n), rs in runs.items():
        rows.append(
            {
                "model": model,
                "max_batch_size": b,
                "max_queue_delay_ms": d,
                "concurrency": n,
                "throughput": round(statistics.median(r["throughput"] for r in rs), 2),
                "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 2),
                "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 2),
                "median_batch": statistics.median(r.get("server_timings_median", {}).get("batch_size", 0) for r in rs),
                "passes": len(rs),
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Batching sweep",
        "",
        f"`{meta['command']}`, {meta['date']}, {meta['elapsed_s']:.0f} s. Medians over interleaved passes; "
        "throughput in images/s, latency at the client in ms.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        concurrencies = sorted({r["concurrency"] for r in mine})
        settings = sorted({(r["max_batch_size"], r["max_queue_delay_ms"]) for r in mine})
        head = " | ".join(f"c={n} img/s | c={n} p99" for n in concurrencies)
        lines += [f"## {model}", "", f"| max_batch_size | max_queue_delay_ms | {head} |"]
        lines.append("|---|---|" + "---|---|" * len(concurrencies))
        for b, d in settings:
            cells = []
            for n in concurrencies:
                r = next(
                    x for x in mine if (x["max_batch_size"], x["max_queue_delay_ms"], x["concurrency"]) == (b, d, n)
                )
                cells.append(f"{r['throughput']:.2f} | {r['p99_ms']:.1f}")
            lines.append(f"| {b} | {d:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="default model only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vitserve-sweep-") as tmp:
        digits = Path(tmp) / "digits"
        digits.mkdir()
        for i, data in enumerate(artifacts.digit_uploads()):
            (digits / f"{i:03d}.png").write_bytes(data)
        rows += sweep(
            artifacts.MODELS,
            "digits-vit",
            digits,
            [(b, d) for b in (4, 8, 16, 32) for d in (0.0, 2.0, 5.0)],
            (1, 16, 64),
            requests=lambda n: 500,
            duration=4.0,
            warmup=lambda n: max(2 * n, 50),
            passes=1 if args.quick else 2,
            log=log,
        )
        if not args.quick:
            repo = artifacts.vit_b16_repository(log)
            photos = Path(tmp) / "photos"
            photos.mkdir()
            for i, data in enumerate(artifacts.photo_uploads()):
                (photos / f"{i:03d}.jpg").write_bytes(data)
            for model in (repo.fp32, repo.int8):
                rows += sweep(
                    repo.directory,
                    model,
                    photos,
                    [(b, 2.0) for b in (1, 4, 8, 16)],
                    (1, 16),
                    requests=lambda n: 12 if n == 1 else 48,
                    duration=60.0,
                    warmup=lambda n: 2,
                    passes=1,
                    log=log,
                )
    meta = {
        "command": "PYTHONPATH=. python benchmarks/batching_sweep.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, meta)
    (args.out / "batching_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
