"""Build the FastAPI application: state, middleware, error handlers, routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError
from service.metrics import METRICS
from service.middleware import BodyLimitMiddleware, MetricsMiddleware, RequestContextMiddleware
from service.routes import demo, health, inference, metrics, models, v2
from service.runtime import ModelRepository, resolve_providers
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("vitserve")


def load_repository(settings: Settings) -> ModelRepository:
    providers = resolve_providers(settings.provider)
    log.info("execution providers: %s", providers)
    return ModelRepository.load(
        settings.model_dir,
        default=settings.default_model,
        providers=providers,
        threads=settings.threads,
        only=settings.models,
    )


def _error(status: int, code: str, message: str, detail: object = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "detail": detail}}, status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")} for e in exc.errors()
        ]
        message = "; ".join(f"{p['where']}: {p['problem']}" for p in problems) or "invalid request"
        return _error(422, "invalid_parameter", message, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            message,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "?")
        log.exception("request %s failed", request_id)
        return _error(500, "internal_error", f"internal error; quote request id {request_id} when reporting it")


def create_app(settings: Settings | None = None, repository: ModelRepository | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings)
    state.repository = repository

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.repository is None:
            state.repository = await asyncio.get_running_loop().run_in_executor(None, load_repository, settings)
        for model in state.repository.models.values():
            METRICS.load_seconds.labels(model.name, model.meta.version).set(model.load_seconds)
        state.start_batchers()
        yield
        state.shutting_down = True
        await state.stop_batchers()
        state.close()

    app = FastAPI(
        title="vitserve",
        summary="Vision Transformers over HTTP: classification and attention maps from verified ONNX artifacts.",
        version="0.1.0",
        lifespan=lifespan,
        responses={500: {"description": "a server fault (never caused by client input)"}},
    )
    app.state.vitserve = state
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware)  # added last = outermost: every response gets an id
    for module in (health, models, inference, v2, metrics, demo):
        app.include_router(module.router)
    return app
