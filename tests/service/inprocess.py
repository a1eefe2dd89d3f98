"""The app in this process, for tests that need to reach inside (a broken model, many concurrent requests, a
swap mid-request): the default artifact loaded once, and an app served over httpx's ASGI transport.

Tests of the real process (signals, exit codes, the SDK over TCP) use `tests.conftest.Server` instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.runtime import CPU, LoadedModel, ModelRepository, load_model
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS


def load(directory: Path = DEFAULT_MODEL) -> LoadedModel:
    return load_model(directory, providers=[CPU], threads=1)


def repository(*models: LoadedModel) -> ModelRepository:
    models = models or (load(),)
    return ModelRepository({m.name: m for m in models}, default=models[0].name)


def app(repo: ModelRepository, **settings: Any) -> FastAPI:
    return create_app(Settings(model_dir=settings.pop("model_dir", MODELS), **settings), repo)


@asynccontextmanager
async def serve(application: FastAPI, *, raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (batchers start) and talk to it without a socket."""
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://vitserve.test", timeout=30) as client:
            yield client
