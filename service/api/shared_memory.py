"""Triton's system shared memory extension over REST: register, status, unregister (service.v2.shared_memory).

Every route answers 403 while `VITSERVE_SYSTEM_SHARED_MEMORY` is off; errors have the protocol's shape,
`{"error": "message"}`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from service.api.deps import State
from service.api.v2 import error_responses
from service.errors import BadRequest
from service.route_table import endpoint
from service.v2 import shared_memory as shm

router = APIRouter(tags=["open inference protocol (v2)"])

_CAUSES = {
    400: "a bad key, offset or size; an object that is not POSIX shared memory; the region limit reached",
    403: "system shared memory is off (VITSERVE_SYSTEM_SHARED_MEMORY)",
    404: "no region of that name is registered",
    409: "a region of that name is already registered",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(*statuses, causes=_CAUSES)


class RegisterRequest(BaseModel):
    """The protocol's `$system_shared_memory_register_request`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    offset: int = 0
    byte_size: int


class RegionStatus(BaseModel):
    name: str
    key: str
    offset: int
    byte_size: int


REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RegisterRequest.model_json_schema()}},
    }
}


@endpoint(router, "v2_shm_status", summary="System shared memory status", responses=_errors(403))
async def status(state: State) -> list[RegionStatus]:
    return [RegionStatus(**r.status()) for r in shm.registry(state).status(None)]


@endpoint(
    router, "v2_shm_region_status", summary="System shared memory status (one region)", responses=_errors(403, 404)
)
async def region_status(name: str, state: State) -> list[RegionStatus]:
    return [RegionStatus(**r.status()) for r in shm.registry(state).status(name)]


@endpoint(
    router,
    "v2_shm_register",
    summary="Register a system shared memory region",
    openapi_extra=REGISTER_BODY,
    responses=_errors(400, 403, 409),
)
async def register(name: str, request: Request, state: State) -> dict[str, Any]:
    registry = shm.registry(state)  # first: while the extension is off, that is the answer
    body = await request.body()
    try:
        parsed = RegisterRequest.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the register request is not valid JSON: {e}") from e
    except RecursionError:
        raise BadRequest("the register request nests JSON too deeply") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise BadRequest(f"the register request needs {{key, offset, byte_size}}: {problems}") from e
    except ValueError as e:  # after ValidationError, its subclass: integer literals over 4300 digits
        raise BadRequest(f"the register request holds a number Python will not parse: {e}") from e
    registry.register(name, parsed.key, parsed.offset, parsed.byte_size)
    return {}


@endpoint(
    router, "v2_shm_unregister_all", summary="Unregister every system shared memory region", responses=_errors(403)
)
async def unregister_all(state: State) -> dict[str, Any]:
    shm.registry(state).unregister(None)
    return {}


@endpoint(router, "v2_shm_unregister", summary="Unregister a system shared memory region", responses=_errors(403))
async def unregister(name: str, state: State) -> dict[str, Any]:
    shm.registry(state).unregister(name)
    return {}
