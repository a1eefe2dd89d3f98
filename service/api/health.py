"""Liveness and readiness, for load balancers and Kubernetes probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import State
from service.core.schemas import Health
from service.route_table import endpoint

router = APIRouter(tags=["health"])


@endpoint(router, "healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@endpoint(
    router,
    "readyz",
    response_model=Health,
    summary="The server can answer inference now",
    responses={
        503: {
            "model": Health,
            "description": "loading, draining before shutdown, the inference engine not answering, or a memory "
            "budget refusing every request",
        }
    },
)
async def readyz(state: State) -> JSONResponse:
    models = {} if state.repository is None else {n: m.warmed_up for n, m in state.repository.models.items()}
    reason = await state.readiness()
    body = Health(status="ok" if reason is None else "not_ready", models=models, reason=reason)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if reason is None else 503)
