"""`Annotated` dependency aliases, so route handlers stay short."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.runtime import LoadedModel
from service.core.state import ServiceState


# `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per
# request that costs more than the lookup itself (and, under load, queues behind the pool's 40 threads).
async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.vitserve
    return state


async def get_request_id(request: Request) -> str:
    return str(request.state.request_id)


State = Annotated[ServiceState, Depends(get_state)]
RequestId = Annotated[str, Depends(get_request_id)]


def served_model(request: Request, state: ServiceState, name: str | None) -> LoadedModel:
    """The model a request names (or the default), noted on the request for the per-model request counters."""
    model = state.model(name)
    request.state.model = model
    return model
