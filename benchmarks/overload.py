"""Overload, with the server's default settings: closed loops are served whole; an open-loop excess is refused.

    PYTHONPATH=. python benchmarks/overload.py                 # the default model, its INT8 variant, ViT-B/16 INT8
    PYTHONPATH=. python benchmarks/overload.py --quick         # the default model and its INT8 variant
    PYTHONPATH=. python benchmarks/overload.py --env VITSERVE_LATENCY_BUDGET_MS=100 --tag budget-100
    PYTHONPATH=. python benchmarks/overload.py --model vit-b16-int8 --no-queue         # one model, defaults only

For each model, with the settings under test (the defaults, or `--env`):

1. closed loops, on one server: one client (the unloaded latency), then 16 and 64 clients that each send their
   next request as soon as the last is answered, the way people load-test a server. Such a load is not an
   overload (its queue never holds more than its clients), so nothing should be refused: the refusals are
   counted, and the best throughput is the model's capacity for the open loops;
2. open loops (the default model and ViT-B/16 INT8), on a fresh server per point: requests sent on a fixed
   schedule at `--factor` x the capacity (2x and 4x by default), whatever the server answers (request i starts at
   i / rate, and its latency runs from then), for `--seconds`, while the server's RSS is sampled every 100 ms;
   side by side with the same load against `VITSERVE_ADMISSION=queue` (admit until the queue or the concurrency
   cap is full: Triton's behaviour). After each, the server's own counts: refusals by reason, mean queue wait
   and batch time, batch size.

Targets: closed loops of 16 and 64 clients of the default model and its INT8 variant get no refusal; in an open
loop at 2x and 4x capacity the goodput (answers completed within the arrival window, per second) is at least 90%
of capacity, the 503s' p99 is under 50 ms, the accepted requests' p99 is within the latency budget plus one
batch's service time (the server's mean batch time during the storm); no request hangs; memory stays bounded.

Every load, closed loop and open, comes from one C client in a process of its own (benchmarks/openloop.c, run by
benchmarks/openloop.py), because the server is what is measured: it shares the cores with the server, and costs
about 0.05 ms of CPU per request open loop and 0.02 ms closed loop, nearly all of it in the kernel; it sends the
same rotating uploads to every point, with one definition of latency (from the request's scheduled start to the
end of its response), and reports whether it kept to the schedule (how late it handled each arrival; the rate
it really offered). Writes benchmarks/results/overload.json and overload.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import artifacts, servers
from benchmarks.loadgen import percentile
from benchmarks.openloop import drive
from service.settings import Settings

RESULTS = Path(__file__).parent / "results"
LOGS = artifacts.CACHE / "bench-logs" / "overload"


class RssSampler:
    """The server's resident memory every `interval` seconds, on a thread, while the block runs."""

    def __init__(self, server: servers.Server, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.server.rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def closed_loops(
    repo_dir: Path, model: str, images: Path, env: dict[str, str], log: Callable[[str], None]
) -> dict[str, Any]:
    """One client (the unloaded latency), then 16 and 64 closed-loop clients, on one server with `env`; the best
    throughput is the capacity. Returns the three summaries, by client count, and the capacity."""
    slow = model.startswith("vit-b16")
    runs: dict[str, Any] = {}
    with servers.vitserve(repo_dir, model, LOGS / f"{model}-closed.log", **_settings(env)) as server:
        common: dict[str, Any] = {"field": server.field, "timeout": 30.0}
        for clients in (1, 16, 64):
            runs[str(clients)] = drive(
                server.url,
                server.path,
                images,
                concurrency=clients,
                requests=(24 if clients == 1 else max(3 * clients, 24)) if slow else (400 if clients == 1 else 3000),
                duration=60 if slow else 8,
                warmup=4 if slow or clients == 1 else 2 * clients,
                **common,
            )
            r = runs[str(clients)]
            log(
                f"  closed loop, {clients} client(s): {r['throughput']:.1f} img/s, p50 {r['p50_ms']} p99 "
                f"{r['p99_ms']} ms, statuses {r['statuses']}"
            )
        counts = server_counts(server.url)
    capacity = max(runs["16"]["throughput"], runs["64"]["throughput"])
    return {"runs": runs, "capacity": capacity, "server": counts}


def _settings(env: dict[str, str]) -> dict[str, Any]:
    """VITSERVE_X=value as servers.vitserve's keyword arguments (Any: mypy cannot tell them from its `root`)."""
    return {k.removeprefix("VITSERVE_").lower(): v for k, v in env.items()}


def budget_ms(env: dict[str, str]) -> float:
    """The latency budget the server runs with (the model directories here carry no serving.json)."""
    return float(env.get("VITSERVE_LATENCY_BUDGET_MS", Settings.model_fields["latency_budget_ms"].default))


def server_counts(url: str) -> dict[str, Any]:
    """What the server counted: refusals by reason, mean queue wait and batch time (ms), mean batch size."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()

    def total(pattern: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{pattern} (\S+)$", text, re.M))

    def mean(name: str, scale: float = 1.0) -> float | None:
        count = total(rf"{name}_count\{{[^}}]*\}}")
        return round(total(rf"{name}_sum\{{[^}}]*\}}") / count * scale, 2) if count else None

    return {
        "rejected_budget": total(r'vitserve_rejected_total\{[^}]*reason="budget"[^}]*\}'),
        "rejected_queue_full": total(r'vitserve_rejected_total\{[^}]*reason="queue"[^}]*\}'),
        "refused_adaptive_limit": total(r'vitserve_http_refused_total\{reason="adaptive"\}'),
        "refused_concurrency": total(r'vitserve_http_refused_total\{reason="concurrency"\}'),
        "queue_wait_mean_ms": mean("vitserve_queue_duration_seconds", 1e3),
        "batch_time_mean_ms": mean("vitserve_runtime_duration_seconds", 1e3),
        "batch_size_mean": mean("vitserve_batch_size"),
    }


def storm(
    repo_dir: Path,
    model: str,
    images: Path,
    *,
    capacity: float,
    factor: float,
    seconds: float,
    env: dict[str, str],
    label: str,
) -> dict:
    """Open-loop arrivals at `factor` x `capacity` for `seconds` on a fresh server with settings `env`."""
    slow = model.startswith("vit-b16")
    name = re.sub(r"[^a-z0-9]+", "-", f"{label} {factor:g}x".lower()).strip("-")
    with servers.vitserve(repo_dir, model, LOGS / f"{model}-{name}.log", **_settings(env)) as server:
        common: dict[str, Any] = {"field": server.field, "timeout": 30.0}
        # Warm up at full batches first, so that onnxruntime's arena has grown to its working size: RSS growth
        # after this is what the overload itself costs.
        drive(
            server.url,
            server.path,
            images,
            concurrency=16,
            requests=32 if slow else 500,
            duration=30,
            warmup=0,
            **common,
        )
        before = server_counts(server.url)
        rss_before = server.rss_mb()
        count = max(int(capacity * factor * seconds), 40)
        with RssSampler(server) as rss:
            over = drive(
                server.url, server.path, images, rate=capacity * factor, requests=count, warmup=0, raw=True, **common
            )
        counts = server_counts(server.url)  # before the requests below add to them
        # After the storm: is the server still answering as before?
        after = drive(
            server.url,
            server.path,
            images,
            concurrency=1,
            requests=12 if slow else 200,
            duration=30,
            warmup=0,
            **common,
        )
    raw = over.pop("raw")
    rejected = [latency * 1e3 for _, latency, status in raw if status == 503]
    accepted = [latency * 1e3 for _, latency, status in raw if status == 200]
    window = count / (capacity * factor)  # seconds of arrivals
    # Goodput: answers completed within the arrival window, per second (what was still queued at its end, and
    # answered after, is left out: the window is the time the offered load lasted).
    goodput = sum(1 for start, latency, status in raw if status == 200 and start + latency <= window) / window
    batches = counts["batch_time_mean_ms"]
    storm_counts = {
        k: (round(counts[k] - before[k]) if k.startswith(("rejected", "refused")) else counts[k]) for k in counts
    }
    result = {
        "model": model,
        "variant": label,
        "factor": factor,
        "settings": env,
        "capacity": capacity,
        "latency_budget_ms": budget_ms(env),
        "target_rate": round(capacity * factor, 1),
        "offered_rate": round(over["schedule"]["offered_rate"], 1),
        "requests": len(raw),
        "statuses": over["statuses"],
        "errors": over["errors"],
        "goodput": round(goodput, 1),
        "goodput_ratio": round(goodput / capacity, 3),
        "rejected_p50_ms": round(percentile(rejected, 50), 2),
        "rejected_p99_ms": round(percentile(rejected, 99), 2),
        "rejected_max_ms": round(max(rejected), 2) if rejected else None,
        "accepted_p50_ms": round(percentile(accepted, 50), 2),
        "accepted_p99_ms": round(percentile(accepted, 99), 2),
        "unanswered": sum(1 for _, _, status in raw if status == 0),
        "schedule": over["schedule"],  # how late the generator handled arrivals, and the rate it really offered
        "connections": over["connections"],
        "client_cpu_s": over["client_cpu_s"],
        "rss_before_mb": round(rss_before, 1),
        "rss_max_mb": round(max(rss.samples, default=rss_before), 1),
        "after": {k: after[k] for k in ("throughput", "p50_ms", "p99_ms", "statuses")},
        "server": storm_counts,
    }
    result["checks"] = {
        "goodput >= 90% of capacity": result["goodput_ratio"] >= 0.9,
        "503 p99 < 50 ms": bool(rejected) and result["rejected_p99_ms"] < 50,
        "accepted p99 <= budget + one batch": batches is not None
        and result["accepted_p99_ms"] <= result["latency_budget_ms"] + batches,
        "no request hangs": result["unanswered"] == 0,
        "RSS bounded (max <= before + 256 MiB)": result["rss_max_mb"] <= rss_before + 256,
        "offered rate reached >= 90% of the target": result["offered_rate"] >= 0.9 * capacity * factor,
    }
    return result


def markdown(closed: list[dict], results: list[dict], meta: dict) -> str:
    lines = [
        "# Overload",
        "",
        f"`{meta['command']}`, {meta['date']}, {meta['elapsed_s']:.0f} s; load average {meta['load_average']} at the "
        f"start. {meta['note']}",
        "",
        "## Closed loops",
        "",
        f"One server per model, settings {meta['settings'] or 'the defaults'}; each client sends its next request "
        "as soon as the last is answered.",
        "",
        "| model | clients | img/s | p50 ms | p99 ms | 200 | 503 (target: none) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in closed:
        for clients, r in c["runs"].items():
            lines.append(
                f"| {c['model']} | {clients} | {r['throughput']:.1f} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['statuses'].get('200', 0)} | {r['statuses'].get('503', 0)} |"
            )
    lines += [
        "",
        "## Open loops",
        "",
        f"Arrivals at a fixed rate, a multiple of the model's capacity (its best closed-loop throughput above), for "
        f"{meta['seconds']} s, on a fresh server per row; goodput is the answers completed within that window, per "
        "second.",
        "",
        "| model | server | offered | req/s target / offered | goodput img/s (of capacity) | 200 / 503 / other | "
        "503 p50 / p99 / max ms | accepted p50 / p99 ms | budget + batch ms | client late p99 ms / CPU s / "
        "connections | unanswered | RSS before / max MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["statuses"]
        other = sum(v for k, v in s.items() if k not in ("200", "503"))
        batch = r["server"]["batch_time_mean_ms"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['factor']:g}x | {r['target_rate']} / {r['offered_rate']} | "
            f"{r['goodput']:.1f} ({r['goodput_ratio']:.2f}) | {s.get('200', 0)} / {s.get('503', 0)} / {other} | "
            f"{r['rejected_p50_ms']} / {r['rejected_p99_ms']} / {r['rejected_max_ms']} | {r['accepted_p50_ms']} / "
            f"{r['accepted_p99_ms']} | {r['latency_budget_ms']:g} + {batch} | {r['schedule']['late_p99_ms']} / "
            f"{r['client_cpu_s']} / {r['connections']['max_open']} | {r['unanswered']} | {r['rss_before_mb']} / "
            f"{r['rss_max_mb']} |"
        )
    lines += [
        "",
        "The server's own counts during each storm (503s by reason; means over the storm and its warm-up):",
        "",
        "| model | server | offered | 503s: adaptive limit / concurrency cap / batcher budget / queue full | "
        "queue wait ms | batch time ms | batch size |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["server"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['factor']:g}x | {c['refused_adaptive_limit']:g} / "
            f"{c['refused_concurrency']:g} / {c['rejected_budget']:g} / {c['rejected_queue_full']:g} | "
            f"{c['queue_wait_mean_ms']} | {c['batch_time_mean_ms']} | {c['batch_size_mean']} |"
        )
    lines += ["", "| model | server | offered | check | met |", "|---|---|---|---|---|"]
    for r in results:
        for check, ok in r["checks"].items():
            lines.append(f"| {r['model']} | {r['variant']} | {r['factor']:g}x | {check} | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the default model and its INT8 variant only")
    parser.add_argument(
        "--factor", type=float, action="append", help="offered rate / capacity (repeatable; default 2 and 4)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of arrivals (default 10)")
    parser.add_argument("--env", action="append", default=[], metavar="VITSERVE_X=VALUE", help="server setting")
    parser.add_argument("--no-queue", action="store_true", help="skip the queue-admission rows (Triton's behaviour)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this model (repeatable: digits-vit, digits-vit-int8, vit-b16-int8; default: every model)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result files (overload-TAG.json), e.g. a setting")
    args = parser.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    factors = args.factor or [2.0, 4.0]
    started = time.perf_counter()
    load_average = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    # (model directory, model, uploads, suffix, open loops too)
    plan: list[tuple[Path, str, Callable[[], list[bytes]], str, bool]] = [
        (artifacts.MODELS, "digits-vit", artifacts.digit_uploads, ".png", True),
        (artifacts.MODELS, "digits-vit-int8", artifacts.digit_uploads, ".png", False),
    ]
    if not args.quick and (not args.model or any(m.startswith("vit-b16") for m in args.model)):
        repo = artifacts.vit_b16_repository(log)
        plan.append((repo.directory, repo.int8, artifacts.photo_uploads, ".jpg", True))
    plan = [p for p in plan if not args.model or p[1] in args.model]
    closed, results = [], []
    with tempfile.TemporaryDirectory(prefix="vitserve-overload-") as tmp:
        for directory, model, uploads, suffix, open_loops in plan:
            images = Path(tmp) / model
            images.mkdir()
            for i, data in enumerate(uploads()):
                (images / f"{i:03d}{suffix}").write_bytes(data)
            log(model)
            loops = closed_loops(directory, model, images, env, log)
            closed.append({"model": model, **loops})
            if not open_loops:
                continue
            variants = [("defaults" if not env else "given settings", env)]
            if not args.no_queue:
                variants.append(("queue admission", {**env, "VITSERVE_ADMISSION": "queue"}))
            for factor in factors:
                for label, settings in variants:
                    r = storm(
                        directory,
                        model,
                        images,
                        capacity=loops["capacity"],
                        factor=factor,
                        seconds=args.seconds,
                        env=settings,
                        label=label,
                    )
                    summary = {k: r[k] for k in ("goodput_ratio", "rejected_p99_ms", "accepted_p99_ms", "statuses")}
                    log(f"  open loop {factor:g}x ({label}): {json.dumps(summary)}")
                    results.append(r)
    meta = {
        "command": "PYTHONPATH=. python benchmarks/overload.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": time.perf_counter() - started,
        "load_average": [round(x, 1) for x in load_average],
        "note": "The machine is shared with other jobs: compare rows of one run, not runs.",
        "settings": env,
        "factors": factors,
        "seconds": args.seconds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"overload-{args.tag}" if args.tag else "overload"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "closed": closed, "results": results}, indent=2))
    text = markdown(closed, results, meta)
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
