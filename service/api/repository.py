"""Triton's model repository extension: `POST /v2/repository/index`, `.../models/{name}/load`, `.../unload`.

Off unless `VITSERVE_ADMIN_KEYS` is set, and then only for an admin key (`service.http.security.Access`, checked
before the body is read). The repository
is `VITSERVE_MODEL_DIR` (limited to `VITSERVE_MODELS` when set): load serves a directory of it, verified and warmed
up exactly as at start, and swapped in atomically (a version that fails to load is refused with 400 and what was
served keeps serving); unload stops serving a model: requests already admitted finish on it, later ones get 404
until it is loaded again, and the reload poll leaves it alone meanwhile. Both are carried out by
`ServiceState.admin`: the reload watcher in one process, the engine (for every worker) in multi-process mode, and
return once every process serves the change.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import State
from service.core.runtime import discover
from service.core.state import RepositoryAdmin
from service.errors import BadRequest, Unavailable
from service.route_table import endpoint

router = APIRouter(tags=["open inference protocol (v2): model repository"])

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "the extension is off: VITSERVE_ADMIN_KEYS is not set (when set: 401 without an admin key)"},
}


async def _admin_body(request: Request, state: State) -> dict[str, Any]:
    """The optional JSON body (tritonclient sends an empty one for the index); the admin key was checked before
    it was read (service.http.security.Access)."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"the request body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


@endpoint(router, "v2_repository_index", summary="Models in the repository", responses=_ADMIN_ERRORS)
async def index(request: Request, state: State) -> JSONResponse:
    body = await _admin_body(request, state)
    ready_only = bool(body.get("ready", False))
    settings = state.settings
    found = await state.run_cpu(discover, settings.model_dir)
    repository = state.models()
    entries = []
    for name in sorted(p.name for p in found if settings.models is None or p.name in settings.models):
        model = repository.models.get(name)
        if model is not None:
            entries.append({"name": name, "version": model.meta.version, "state": READY})
        elif not ready_only:
            failure = repository.unavailable.get(name)
            reason = "unloaded" if name in state.unloaded else failure.error if failure else "not loaded"
            entries.append({"name": name, "state": UNAVAILABLE, "reason": reason})
    return JSONResponse(entries)


@endpoint(router, "v2_repository_load", summary="Load (or reload) a model", responses=_ADMIN_ERRORS)
async def load(name: str, request: Request, state: State) -> Response:
    body = await _admin_body(request, state)
    if body.get("parameters"):
        raise BadRequest(
            "vitserve loads a model from its directory in the model repository; config and file overrides "
            f"(parameters {sorted(body['parameters'])}) are not supported"
        )
    await _admin(state).load_model(name)
    return Response(status_code=200)


@endpoint(router, "v2_repository_unload", summary="Unload a model", responses=_ADMIN_ERRORS)
async def unload(name: str, request: Request, state: State) -> Response:
    await _admin_body(request, state)  # `unload_dependents`: a vitserve model has no dependents
    await _admin(state).unload_model(name)
    return Response(status_code=200)


def _admin(state: State) -> RepositoryAdmin:
    if state.admin is None:
        raise Unavailable("the server is still starting; retry shortly")
    return state.admin
