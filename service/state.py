"""What the running service holds: settings, the loaded models, worker pools, and its lifecycle flags."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from service.errors import NotFound, Unavailable
from service.runtime import LoadedModel, ModelRepository
from service.settings import Settings

T = TypeVar("T")


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository: ModelRepository | None = None
        self.shutting_down = False
        # Decode and preprocess run here, off the event loop and overlapping with inference.
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="prep")
        # One runtime call at a time per process: onnxruntime already spreads one call over its intra-op threads.
        self.runtime_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime")

    @property
    def ready(self) -> bool:
        return self.repository is not None and self.repository.ready and not self.shutting_down

    def models(self) -> ModelRepository:
        if self.repository is None:
            raise Unavailable("models are still loading; retry shortly", headers={"Retry-After": "1"})
        return self.repository

    def model(self, name: str | None) -> LoadedModel:
        repository = self.models()
        model = repository.get(name)
        if model is None:
            raise NotFound(
                f"model {name!r} is not loaded; GET /v1/models lists the models this server has",
                detail={"available": sorted(repository.models)},
            )
        return model

    async def run_cpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, lambda: fn(*args, **kwargs))

    async def infer(self, model: LoadedModel, pixels: np.ndarray, *, with_attention: bool):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.runtime_pool, lambda: model.infer(pixels, with_attention=with_attention))

    def close(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.runtime_pool.shutdown(wait=False, cancel_futures=True)
