"""Every route of the service, declared once: method, path template, who may call it, what kind of work it is,
and whether the connection layer may answer it itself.

Everything else is derived from this table: the FastAPI routes (`endpoint`, `model_pair`), which requests the
gate reads whole and admits (`is_inference`, `is_control`), the routes open without a key (`OPEN`), the
direct path's templates (`direct_templates`) and the REST twin of each gRPC call (`rest_path`). The metrics'
`route` label is the matched route's template.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter

Access = Literal["open", "key", "admin"]  # open: no key; key: an API key when keys are on; admin: an admin key
Kind = Literal["read", "inference", "control"]  # inference is admitted; control (and inference) bodies read whole


@dataclass(frozen=True)
class Route:
    operation: str  # the OpenAPI operation id
    method: Literal["GET", "POST"]
    path: str
    access: Access = "key"
    kind: Kind = "read"
    direct: bool = False  # answered by the connection layer when plain enough (service.http.fast_path)


ROUTES = (
    # probes, scrapes, the demo page and the API's own documentation
    Route("healthz", "GET", "/healthz", "open"),
    Route("readyz", "GET", "/readyz", "open"),
    Route("metrics", "GET", "/metrics", "open"),
    Route("demo_page", "GET", "/", "open"),
    Route("demo_file", "GET", "/static/{name}", "open"),
    Route("docs_page", "GET", "/docs"),
    Route("docs_file", "GET", "/static/docs/{name}", "open"),
    # the REST API
    Route("list_models", "GET", "/v1/models"),
    Route("get_model", "GET", "/v1/models/{name}"),
    Route("classify", "POST", "/v1/models/{name}/classify", kind="inference", direct=True),
    Route("classify_default", "POST", "/v1/classify", kind="inference", direct=True),
    Route("classify_batch", "POST", "/v1/models/{name}/classify/batch", kind="inference"),
    Route("classify_batch_default", "POST", "/v1/classify/batch", kind="inference"),
    Route("attention", "POST", "/v1/models/{name}/attention", kind="inference"),
    Route("attention_default", "POST", "/v1/attention", kind="inference"),
    Route("attention_batch", "POST", "/v1/models/{name}/attention/batch", kind="inference"),
    Route("attention_batch_default", "POST", "/v1/attention/batch", kind="inference"),
    # the Open Inference Protocol and Triton's extensions
    Route("v2_server_metadata", "GET", "/v2"),
    Route("v2_live", "GET", "/v2/health/live", "open"),
    Route("v2_ready", "GET", "/v2/health/ready", "open"),
    Route("v2_stats", "GET", "/v2/models/stats"),
    Route("v2_model_metadata", "GET", "/v2/models/{name}"),
    Route("v2_model_version_metadata", "GET", "/v2/models/{name}/versions/{version}"),
    Route("v2_model_ready", "GET", "/v2/models/{name}/ready"),
    Route("v2_model_version_ready", "GET", "/v2/models/{name}/versions/{version}/ready"),
    Route("v2_model_stats", "GET", "/v2/models/{name}/stats"),
    Route("v2_model_version_stats", "GET", "/v2/models/{name}/versions/{version}/stats"),
    Route("v2_infer", "POST", "/v2/models/{name}/infer", kind="inference", direct=True),
    Route("v2_infer_version", "POST", "/v2/models/{name}/versions/{version}/infer", kind="inference", direct=True),
    Route("v2_repository_index", "POST", "/v2/repository/index", "admin", "control"),
    Route("v2_repository_load", "POST", "/v2/repository/models/{name}/load", "admin", "control"),
    Route("v2_repository_unload", "POST", "/v2/repository/models/{name}/unload", "admin", "control"),
    Route("v2_shm_status", "GET", "/v2/systemsharedmemory/status"),
    Route("v2_shm_region_status", "GET", "/v2/systemsharedmemory/region/{name}/status"),
    Route("v2_shm_register", "POST", "/v2/systemsharedmemory/region/{name}/register", kind="control"),
    Route("v2_shm_unregister_all", "POST", "/v2/systemsharedmemory/unregister", kind="control"),
    Route("v2_shm_unregister", "POST", "/v2/systemsharedmemory/region/{name}/unregister", kind="control"),
)
BY_OPERATION = {route.operation: route for route in ROUTES}


def template_pattern(template: str, segment: str = "[^/]+") -> str:
    """A regular expression for one path template: each `{param}` a named group of one path segment."""
    return re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m[1]}>{segment})", re.escape(template))


def _any_of(templates: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.sub(r"\(\?P<\w+>", "(?:", template_pattern(t)) for t in templates))


_INFERENCE = _any_of([r.path for r in ROUTES if r.kind == "inference"])
_CONTROL = _any_of([r.path for r in ROUTES if r.kind == "control"])
_ADMIN = _any_of([r.path for r in ROUTES if r.access == "admin"])
_ADMIN_PREFIXES = tuple({r.path.partition("{")[0] for r in ROUTES if r.access == "admin"})  # a cheap first test
# The routes every client may call without a key, in VITSERVE_OPEN_ROUTES' pattern language.
OPEN = [re.sub(r"\{\w+\}$", "*", r.path) for r in ROUTES if r.access == "open"]


def is_inference(method: str, path: str) -> bool:
    """A request that runs a model: its body is read whole, then it is admitted (service.http.gate)."""
    return method == "POST" and _INFERENCE.fullmatch(path) is not None


def is_control(method: str, path: str) -> bool:
    """A request that changes what is served or registered: its body is read whole, and it is never shed by the
    data plane's admission (an operator must reach it during an overload)."""
    return method == "POST" and _CONTROL.fullmatch(path) is not None


def is_admin(path: str) -> bool:
    """A path of the repository extension, which takes an admin key (any method: a wrong one is still refused
    for its key first)."""
    return path.startswith(_ADMIN_PREFIXES) and _ADMIN.fullmatch(path) is not None


def direct_templates(prefix: str) -> tuple[str, ...]:
    """The path templates under `prefix` the direct path takes, default route first (service.http.fast_path)."""
    return tuple(sorted((r.path for r in ROUTES if r.direct and r.path.startswith(prefix)), key=len))


def rest_path(operation: str, **params: str) -> str:
    """A route's path with its parameters filled in (gRPC calls are open exactly when their REST twin is)."""
    return BY_OPERATION[operation].path.format(**params)


# --- registering handlers --------------------------------------------------------------------------------------
Handler = Callable[..., Awaitable[Any]]


def endpoint(router: APIRouter, operation: str, **options: Any) -> Callable[[Handler], Handler]:
    """Register the decorated handler at `operation`'s method and path (FastAPI options as for `add_api_route`)."""
    route = BY_OPERATION[operation]

    def register(handler: Handler) -> Handler:
        router.add_api_route(route.path, handler, methods=[route.method], operation_id=operation, **options)
        return handler

    return register


def model_pair(
    router: APIRouter, named: str, default: str, *, summaries: tuple[str, str], **options: Any
) -> Callable[[Handler], Handler]:
    """Register one handler, whose first parameter is `name: str | None`, at two routes: `named` (its path
    names the model) and `default` (the default model, `name=None`). FastAPI reads each route's parameters from
    a signature made here, the one without `name` for the default route."""

    def register(handler: Handler) -> Handler:
        hints = typing.get_type_hints(handler, include_extras=True)  # the handler module's names, resolved there
        signature = inspect.signature(handler)
        parameters = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
        if parameters[0].name != "name":
            raise TypeError(f"{handler.__name__}: a model pair's handler takes `name` first")
        returns = hints.get("return", signature.return_annotation)

        @functools.wraps(handler)
        async def for_named(*args: Any, **kwargs: Any) -> Any:
            return await handler(*args, **kwargs)

        @functools.wraps(handler)
        async def for_default(*args: Any, **kwargs: Any) -> Any:
            return await handler(None, *args, **kwargs)

        named_parameters = [parameters[0].replace(annotation=str), *parameters[1:]]
        for_named.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=named_parameters, return_annotation=returns
        )
        for_default.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters[1:], return_annotation=returns
        )
        for wrapper in (for_named, for_default):
            wrapper.__annotations__ = {}  # the signature above is the whole truth; no string annotations to resolve
        endpoint(router, named, summary=summaries[0], **options)(for_named)
        endpoint(router, default, summary=summaries[1], **options)(for_default)
        return handler

    return register
