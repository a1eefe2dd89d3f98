"""What the running service holds: settings, the loaded models, worker pools, and its lifecycle flags."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np

from service.batching import BatchPolicy, DynamicBatcher, Result
from service.errors import NotFound, Unavailable
from service.runtime import LoadedModel, ModelRepository
from service.settings import Settings

log = logging.getLogger("vitserve")
SERVING_FILE = "serving.json"  # optional per-model batching policy beside artifact.json, like Triton's config

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
        self.batchers: dict[str, DynamicBatcher] = {}

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

    def policy(self, model: LoadedModel) -> BatchPolicy:
        s = self.settings
        values: dict[str, Any] = {
            "max_batch_size": s.max_batch_size if s.batching else 1,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "max_queue_size": s.max_queue_size,
            "timeout_s": s.request_timeout_s,
            "enabled": s.batching,
        }
        path = model.directory / SERVING_FILE
        if path.is_file() and s.batching:
            known = {f.name for f in fields(BatchPolicy)}
            overrides = json.loads(path.read_text())
            unknown = set(overrides) - known
            if unknown:
                raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
            values.update(overrides)
        return BatchPolicy(**values)

    def start_batchers(self) -> None:
        for name, model in self.models().models.items():
            policy = self.policy(model)
            self.batchers[name] = DynamicBatcher(model, policy, self.runtime_pool)
            self.batchers[name].start()
            log.info("batching %s: %s", name, policy)

    async def infer(self, model: LoadedModel, pixels: np.ndarray, *, with_attention: bool) -> Result:
        """One image (3, H, W) through the model's dynamic batcher."""
        return await self.batchers[model.name].submit(pixels, with_attention=with_attention)

    async def stop_batchers(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    def close(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.runtime_pool.shutdown(wait=False, cancel_futures=True)
