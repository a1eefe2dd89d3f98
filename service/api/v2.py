"""Open Inference Protocol (V2) REST routes, so Triton and KServe clients work unchanged: each declares its endpoint
and calls the protocol's core (service.v2.core)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from service import __version__
from service.api.deps import State
from service.core.runtime import LoadedModel
from service.route_table import endpoint
from service.v2.core import extensions, find_model, infer_response, model_metadata_body

router = APIRouter(tags=["open inference protocol (v2)"])

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension",
            },
        },
    }
}


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str


_ERROR_CAUSES = {
    400: "a malformed request, or inputs this model cannot take",
    404: "unknown model or version",
    413: "more images than VITSERVE_MAX_BATCH_FILES, or an image over VITSERVE_MAX_PIXELS",
    503: "not ready, or overloaded (see Retry-After)",
}


def error_responses(*statuses: int, causes: dict[int, str] = _ERROR_CAUSES) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the statuses a V2 route can answer with `{"error": "message"}`."""
    return {status: {"model": V2Error, "description": causes[status]} for status in statuses}


NOT_READY: dict[int | str, dict[str, Any]] = {503: {"description": "not ready: loading, or draining before shutdown"}}


@endpoint(router, "v2_server_metadata", summary="Server metadata")
async def server_metadata(state: State) -> dict[str, Any]:
    return {"name": "vitserve", "version": __version__, "extensions": extensions(state.settings)}


@endpoint(router, "v2_live", summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@endpoint(router, "v2_ready", summary="Server ready", responses=NOT_READY)
async def ready(state: State) -> JSONResponse:
    ready = await state.readiness() is None
    return JSONResponse({"ready": ready}, 200 if ready else 503)


@endpoint(router, "v2_model_metadata", summary="Model metadata", responses=error_responses(404))
async def model_metadata(name: str, state: State) -> Response:
    return JSONResponse(model_metadata_body(find_model(state, name, None)))


@endpoint(router, "v2_model_version_metadata", summary="Model metadata (version)", responses=error_responses(404))
async def model_version_metadata(name: str, version: str, state: State) -> Response:
    return JSONResponse(model_metadata_body(find_model(state, name, version)))


@endpoint(router, "v2_model_ready", summary="Model ready", responses=error_responses(404) | NOT_READY)
async def model_ready(name: str, state: State) -> Response:
    return _ready(find_model(state, name, None))


@endpoint(router, "v2_model_version_ready", summary="Model ready (version)", responses=error_responses(404) | NOT_READY)
async def model_version_ready(name: str, version: str, state: State) -> Response:
    return _ready(find_model(state, name, version))


@endpoint(
    router, "v2_infer", summary="Inference", openapi_extra=INFER_BODY, responses=error_responses(400, 404, 413, 503)
)
async def infer(name: str, request: Request, state: State) -> Response:
    return await infer_response(state, request, name, None)


@endpoint(
    router,
    "v2_infer_version",
    summary="Inference (version)",
    openapi_extra=INFER_BODY,
    responses=error_responses(400, 404, 413, 503),
)
async def infer_version(name: str, version: str, request: Request, state: State) -> Response:
    return await infer_response(state, request, name, version)


def _ready(model: LoadedModel) -> Response:
    return JSONResponse({"name": model.name, "ready": model.warmed_up}, 200 if model.warmed_up else 503)
