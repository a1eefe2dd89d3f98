"""A closed loop of clients is not an overload: with default settings, 16 clients that each send their next
request as soon as the last is answered, to both default models (FP32, batches of up to 16, and INT8, one image a
call), are never refused. Their queue can never hold more than their number, and their answers come far within
the latency budget; the adaptive admission refuses only what it predicts would miss the budget. And the budget
each model's batcher judges by: the server's, or the model's own from its `serving.json`.

In this process, over the ASGI app (the same admission and batchers as the server's, loaded by its own start-up
with default settings), so the test takes seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from service.app import create_app
from service.core.runtime import CPU
from service.core.state import batch_policy
from service.settings import Settings
from tests.conftest import MODELS, metric
from tests.service import inprocess

CLIENTS = 16
ROUNDS = 40  # requests per client: enough answers for the adaptive limit to act on (it acts after a full round)
MODELS_SERVED = ("digits-vit", "digits-vit-int8")


def refusals(metrics: str) -> float:
    """503s for load: the front door's limit and each model's batcher."""
    batchers = sum(
        metric(metrics, "vitserve_rejected_total", model=model, reason=reason)
        for model in MODELS_SERVED
        for reason in ("budget", "queue")
    )
    return batchers + sum(
        metric(metrics, "vitserve_http_refused_total", reason=reason) for reason in ("adaptive", "concurrency")
    )


def waits(metrics: str) -> float:
    return sum(metric(metrics, "vitserve_queue_duration_seconds_sum", model=model) for model in MODELS_SERVED)


def test_sixteen_closed_loop_clients_on_both_default_models_with_default_settings_are_never_refused(held_out_pngs):
    uploads = held_out_pngs[:CLIENTS]

    async def client(http: httpx.AsyncClient, index: int, statuses: Counter[int]) -> None:
        for i in range(ROUNDS):
            model = MODELS_SERVED[(index + i) % 2]
            answer = await http.post(
                f"/v1/models/{model}/classify", content=uploads[index], headers={"content-type": "image/png"}
            )
            statuses[answer.status_code] += 1

    async def main() -> tuple[Counter[int], str, str]:
        statuses: Counter[int] = Counter()
        async with inprocess.serve(create_app(Settings(model_dir=MODELS))) as http:
            before = (await http.get("/metrics")).text
            await asyncio.gather(*(client(http, i, statuses) for i in range(CLIENTS)))
            return statuses, before, (await http.get("/metrics")).text

    statuses, before, after = asyncio.run(main())
    assert statuses == {200: CLIENTS * ROUNDS}, statuses
    assert refusals(after) == refusals(before)
    assert waits(after) > waits(before)  # the clients did queue behind each other


def budget_of(directory: Path, **settings: Any) -> float:
    model = SimpleNamespace(provider=CPU, directory=directory, meta=SimpleNamespace(batch_invariant=True))
    return batch_policy(Settings(model_dir=MODELS, **settings), model).latency_budget_ms  # type: ignore[arg-type]


def test_a_models_serving_json_sets_its_own_latency_budget(tmp_path):
    assert budget_of(tmp_path) == Settings.model_fields["latency_budget_ms"].default == 1000
    assert budget_of(tmp_path, latency_budget_ms=250) == 250
    (tmp_path / "serving.json").write_text(json.dumps({"latency_budget_ms": 5000}))
    assert budget_of(tmp_path, latency_budget_ms=250) == 5000  # the model's own, over the server's
    assert budget_of(tmp_path, batching=False) == 5000  # batching off or on
