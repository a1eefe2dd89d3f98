"""Build the FastAPI application: state, middleware, error handlers, routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from service import __version__
from service.api import demo, docs, health, inference, metrics, models, shared_memory, stats, v2
from service.api import repository as repository_routes
from service.core.loading import load_repository, version_loader
from service.core.reload import RepositoryWatcher
from service.core.runtime import ModelRepository
from service.core.state import ServiceState
from service.errors import InvalidParameter, ServiceError, error_response
from service.http.fast_path import DirectInfer, FastPath
from service.http.gate import Gate, internal_error
from service.http.middleware import GateMiddleware, RequestContextMiddleware
from service.http.protocol import AcceptErrorFilter
from service.http.security import Access, cors_options, document_api_keys
from service.obs import tracing
from service.obs.metrics import METRICS
from service.procs.bootstrap import ChildEnv
from service.procs.engine_client import attach_engine
from service.settings import Settings

log = logging.getLogger("vitserve")


@dataclass(frozen=True)
class WorkerLink:
    """What an HTTP worker needs to reach the engine: the supervisor's contract, and its count of input slots."""

    env: ChildEnv
    slots: int


def _install_error_handlers(app: FastAPI) -> None:
    """Every exception becomes a `ServiceError`, rendered by `error_response` like the middleware's."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")} for e in exc.errors()
        ]
        message = "; ".join(f"{p['where']}: {p['problem']}" for p in problems) or "invalid request"
        return error_response(InvalidParameter(message, detail=problems), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        error = ServiceError(
            message,
            status=exc.status_code,
            code=codes.get(exc.status_code, "http_error"),
            headers=getattr(exc, "headers", None),
        )
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Answers from outside every middleware (Starlette's ServerErrorMiddleware).
        return internal_error(getattr(request.state, "request_id", "?"), request.url.path)


def _install_middleware(app: FastAPI, settings: Settings, state: ServiceState, gate: Gate, worker: int | None) -> None:
    # Added innermost first; the last added runs first on a request.
    app.add_middleware(FastPath, state=state)  # innermost: V2 infer past FastAPI's router
    app.add_middleware(GateMiddleware, gate=gate)  # keys, limits, body, budget, admission, metrics: service.http.gate
    if settings.cors_origins:  # outside the key check: a preflight carries no key, and a 401 must be readable
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
    endpoint = tracing.traces_endpoint(settings)
    if endpoint is not None:  # inside the request id, outside every refusal: each request is one span
        from service.obs.otel import TracingMiddleware  # the only import of OpenTelemetry: tracing is on

        app.add_middleware(TracingMiddleware, endpoint=endpoint, worker=worker)
    app.add_middleware(RequestContextMiddleware)  # outermost: every response gets an id and the safe headers


def create_app(
    settings: Settings | None = None, repository: ModelRepository | None = None, *, worker: WorkerLink | None = None
) -> FastAPI:
    """The app. In an HTTP worker of multi-process mode, `worker` says how to reach the engine (service.procs.worker)."""
    settings = settings or Settings()
    state = ServiceState(settings)
    state.repository = repository

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorFilter())
        if worker is not None:
            await attach_engine(state, str(worker.env.engine_socket), worker.slots)
            state.all_ready_file = worker.env.all_ready_file
            state.shm_registry_dir = worker.env.shm_registry_dir
        elif state.repository is None:
            state.repository = await asyncio.get_running_loop().run_in_executor(None, load_repository, settings)
        for model in state.models().models.values():
            METRICS.load_seconds.labels(model.name, model.meta.version).set(model.load_seconds)
        state.start_batchers()
        watcher = None
        if worker is None:  # in multi-process mode the engine polls and loads (service/procs/engine.py)
            watcher = RepositoryWatcher(state, version_loader(settings), settings.reload_interval_s)
            state.admin = watcher
            if settings.reload_interval_s > 0:
                watcher.start()
        app.state.watcher = watcher
        grpc_server = None
        if settings.grpc_port:
            from service.grpc_v2.server import start

            grpc_server = await start(state, gate, shared_port=worker is not None)
        yield
        state.shutting_down = True
        if grpc_server is not None:  # after HTTP's drain: in-flight calls finish within the grace, new ones are refused
            await grpc_server.stop(settings.shutdown_grace_s)
        if watcher is not None:
            await watcher.stop()
        await state.stop_batchers()
        if state.engine is not None:
            await state.engine.close()
        state.close()

    app = FastAPI(
        title="vitserve",
        summary="Vision Transformers over HTTP: classification and attention maps from verified ONNX artifacts.",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # /docs is service.api.docs: Swagger UI from this server, not a CDN
        redoc_url=None,  # ReDoc needs inline styles, which the docs' Content-Security-Policy refuses
        responses={500: {"description": "a server fault (never caused by client input)"}},
    )
    app.state.vitserve = state
    _install_error_handlers(app)
    access = Access(settings.api_keys, settings.admin_keys, settings.open_routes)
    assert state.limits.body is not None, "an app's state serves HTTP"
    gate = app.state.gate = Gate(settings, access, state.limits.body, state.limits.admission)
    _install_middleware(app, settings, state, gate, worker.env.worker_index if worker else None)
    # The connection layer answers V2 infer itself (service.http.fast_path); CORS headers and spans come from the
    # middleware only.
    direct = settings.direct_infer and not settings.cors_origins and tracing.traces_endpoint(settings) is None
    app.state.direct = DirectInfer(app, state, gate) if direct else None
    for module in (health, models, inference, stats, repository_routes, v2, shared_memory, metrics, demo, docs):
        # stats before v2's `{name}`
        app.include_router(module.router)
    if settings.api_keys:
        document_api_keys(app, settings.open_routes)
    return app
