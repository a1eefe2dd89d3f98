"""Liveness and readiness, for load balancers and Kubernetes probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import State
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, operation_id="healthz", summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    operation_id="readyz",
    summary="Every model loaded and warmed up",
    responses={503: {"model": Health, "description": "loading, or draining before shutdown"}},
)
async def readyz(state: State) -> JSONResponse:
    models = {} if state.repository is None else {n: m.warmed_up for n, m in state.repository.models.items()}
    body = Health(status="ok" if state.ready else "not_ready", models=models)
    return JSONResponse(body.model_dump(), status_code=200 if state.ready else 503)
