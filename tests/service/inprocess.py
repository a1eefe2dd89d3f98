"""The app in this process, for tests that need to reach inside (a broken model, many concurrent requests, a
swap mid-request): the default artifact loaded once, and an app served over httpx's ASGI transport.

Tests of the real process (signals, exit codes, the SDK over TCP) use `tests.conftest.Server` instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.core.batching import BatchPolicy
from service.core.runtime import CPU, LoadedModel, ModelRepository, load_model
from service.core.state import settings_policy
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS, metric


def load(directory: Path = DEFAULT_MODEL) -> LoadedModel:
    return load_model(directory, providers=[CPU], threads=1, cpu_rewrites=True)


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


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    """Await `condition` (a real signal) until it holds, letting the app's tasks run between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"timed out after {timeout} s waiting until {what}"
        await asyncio.sleep(0.01)


async def queued(client: httpx.AsyncClient, model: str = "digits-vit") -> float:
    """Requests waiting in `model`'s batch queue, as `/metrics` says."""
    return metric((await client.get("/metrics")).text, "vitserve_queue_depth", model=model)


def policy(**overrides: Any) -> BatchPolicy:
    """The default settings' batching policy with `overrides` (BatchPolicy itself has no defaults)."""
    return dataclasses.replace(settings_policy(Settings(model_dir=MODELS)), **overrides)
