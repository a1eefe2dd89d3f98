"""Triton's statistics extension: `GET /v2/models[/{name}[/versions/{version}]]/stats`.

The numbers are the `/metrics` counters (`METRICS.collect`), read when asked, never a second set kept beside
them: in multi-process mode that reading is prometheus_client's sum over every worker and the engine, so the
statistics are the whole server's. The mapping to Triton's fields:

| Triton field                | vitserve series                                                         |
|-----------------------------|-------------------------------------------------------------------------|
| inference_count             | nv_inference_count (images)                                             |
| execution_count             | nv_inference_exec_count (runtime calls; a batch counts once)            |
| success {count, ns}         | nv_inference_request_success, nv_inference_request_duration_us         |
| fail {count, ns}            | nv_inference_request_failure, vitserve_inference_request_failure_duration_us |
| queue, compute_infer        | nv_inference_queue_duration_us, nv_inference_compute_infer_duration_us, per image |
| batch_stats[]               | vitserve_batch_executions, vitserve_batch_compute_duration_us by batch size |
| last_inference (ms)         | vitserve_last_inference_timestamp_seconds                               |

compute_input and compute_output count what compute_infer counts, with 0 ns: vitserve does not time them apart
(stacking a batch's inputs is inside compute_infer; spreading its outputs is too small to time). Preprocessing
happens before the queue and is in success.ns only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter

from service.api.deps import State
from service.api.v2 import error_responses
from service.errors import NotFound
from service.obs.metrics import METRICS
from service.route_table import endpoint

router = APIRouter(tags=["open inference protocol (v2)"])

_COUNTS = {  # Triton's name -> the metric it is read from
    "inference_count": METRICS.inference_count,
    "execution_count": METRICS.exec_count,
    "success": METRICS.request_success,
    "fail": METRICS.request_failure,
    "success_us": METRICS.request_us,
    "fail_us": METRICS.failure_us,
    "queue_us": METRICS.queue_us,
    "compute_us": METRICS.compute_us,
    "last_inference": METRICS.last_inference,
}


def _sample(metric: Any) -> str:
    """The name of a metric's samples: a counter's carry `_total`."""
    (family,) = metric.describe()
    return f"{family.name}_total" if family.type == "counter" else str(family.name)


_SAMPLES = {_sample(metric): key for key, metric in _COUNTS.items()}
_BATCH_EXEC, _BATCH_US = _sample(METRICS.batch_exec), _sample(METRICS.batch_compute_us)

Version = tuple[str, str]  # (model, version)


class Reading:
    """One reading of the counters, by (model, version)."""

    def __init__(self) -> None:
        self.values: dict[Version, dict[str, float]] = defaultdict(dict)
        self.batches: dict[Version, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
        for family in METRICS.collect():
            for sample in family.samples:
                labels = sample.labels
                if "model" not in labels or "version" not in labels:
                    continue
                key = (labels["model"], labels["version"])
                if sample.name in _SAMPLES:
                    self.values[key][_SAMPLES[sample.name]] = sample.value
                elif sample.name in (_BATCH_EXEC, _BATCH_US):
                    self.batches[key][int(labels["batch_size"])][sample.name == _BATCH_US] = sample.value

    def versions(self, model: str) -> set[str]:
        return {v for m, v in (*self.values, *self.batches) if m == model}

    def stats(self, model: str, version: str) -> dict[str, Any]:
        value = self.values.get((model, version), {})

        def get(key: str) -> int:
            return int(value.get(key, 0))

        def ns(key: str) -> int:
            return int(value.get(key, 0.0) * 1e3)

        images = get("inference_count")
        untimed = {"count": images, "ns": 0}
        return {
            "name": model,
            "version": version,
            "last_inference": int(value.get("last_inference", 0.0) * 1e3),
            "inference_count": images,
            "execution_count": get("execution_count"),
            "inference_stats": {
                "success": {"count": get("success"), "ns": ns("success_us")},
                "fail": {"count": get("fail"), "ns": ns("fail_us")},
                "queue": {"count": images, "ns": ns("queue_us")},
                "compute_input": untimed,
                "compute_infer": {"count": images, "ns": ns("compute_us")},
                "compute_output": untimed,
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": int(count), "ns": 0},
                    "compute_infer": {"count": int(count), "ns": int(us * 1e3)},
                    "compute_output": {"count": int(count), "ns": 0},
                }
                for size, (count, us) in sorted(self.batches.get((model, version), {}).items())
            ],
        }


@endpoint(router, "v2_stats", summary="Statistics of every model")
async def all_stats(state: State) -> dict[str, Any]:
    reading = Reading()
    models = state.models().models
    return {"model_stats": [reading.stats(name, models[name].meta.version) for name in sorted(models)]}


@endpoint(router, "v2_model_stats", summary="Statistics of a model", responses=error_responses(404, 503))
async def model_stats(name: str, state: State) -> dict[str, Any]:
    model = state.model(name)
    return {"model_stats": [Reading().stats(model.name, model.meta.version)]}


@endpoint(
    router,
    "v2_model_version_stats",
    summary="Statistics of a model version (the served one, or one served earlier)",
    responses=error_responses(404, 503),
)
async def model_version_stats(name: str, version: str, state: State) -> dict[str, Any]:
    model = state.model(name)
    reading = Reading()
    if version != model.meta.version and version not in reading.versions(name):
        raise NotFound(f"model {name!r} serves version {model.meta.version!r} and has no statistics of {version!r}")
    return {"model_stats": [reading.stats(name, version)]}
