"""What the running service holds: settings, the loaded models, worker pools, and its lifecycle flags."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from service.core.admission import AdaptiveAdmission, Admission
from service.core.batching import BatchPolicy, Result, Targets
from service.core.budgets import ByteBudget
from service.core.compute import BatcherFactory, Batchers
from service.core.pipeline import Prepared, prepare
from service.core.runtime import LoadedModel, LoadFailure, ModelRepository, provider_batching
from service.errors import NotFound, Overloaded, PayloadTooLarge, Unavailable
from service.settings import Settings
from vit_artifact.metadata import ArtifactMetadata
from vit_artifact.serving import read_serving_config

log = logging.getLogger("vitserve")

T = TypeVar("T")

# Readiness's self-check (ServiceState.readiness): how long the engine may take to answer a ping, and how long
# a memory budget may refuse every request (a load that fills it turns over within the body deadline).
READY_ENGINE_TIMEOUT_S = 2.0
READY_STALL_S = 15.0

# Work on at most this many bytes of JSON or tensors runs on the event loop (about 50 us for 64 KiB).
INLINE_BYTES = 64 * 1024
# Images decoded on the event loop (ServiceState.prepare): at most this many encoded bytes and header pixels.
INLINE_IMAGE_BYTES = 16 * 1024
INLINE_IMAGE_PIXELS = 64 * 64


class Engine(Protocol):
    """The process that runs the models, as an HTTP worker of multi-process mode sees it
    (`service.procs.engine_client.EngineLink`)."""

    alive: bool

    async def ping(self, timeout: float) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class Limits:
    """What requests hold at once, server-wide: bytes of request bodies and of decoded images in flight
    (service.core.budgets; None in the engine, which holds neither), and the inference requests admitted
    (VITSERVE_MAX_CONCURRENT_REQUESTS and the latency budget, for the gate)."""

    body: ByteBudget | None
    decode: ByteBudget | None
    admission: Admission

    @classmethod
    def of(cls, settings: Settings, *, serves_http: bool) -> Limits:
        admission = (
            AdaptiveAdmission(
                settings.max_concurrent_requests,
                budget=settings.latency_budget_ms / 1e3,
                tolerance=settings.admission_tolerance,
            )
            if settings.admission == "adaptive"
            else Admission(settings.max_concurrent_requests)
        )
        return cls(
            ByteBudget("body", settings.body_budget_bytes) if serves_http else None,
            ByteBudget("decode", settings.decode_budget_bytes) if serves_http else None,
            admission,
        )


class RepositoryAdmin(Protocol):
    """Who carries out the repository extension's load and unload: `service.core.reload.RepositoryWatcher` in one
    process, or in an HTTP worker the engine link (`service.procs.engine_client.EngineLink`), which asks the engine."""

    async def load_model(self, name: str) -> None: ...

    async def unload_model(self, name: str) -> None: ...


def settings_policy(settings: Settings) -> BatchPolicy:
    """The batching policy the settings give every model."""
    s = settings
    return BatchPolicy(
        max_batch_size=s.max_batch_size if s.batching else 1,
        max_queue_delay_ms=s.max_queue_delay_ms,
        max_queue_size=s.max_queue_size,
        timeout_s=s.request_timeout_s,
        enabled=s.batching,
        admission=s.admission,
        latency_budget_ms=s.latency_budget_ms,
    )


def batch_policy(settings: Settings, model: LoadedModel) -> BatchPolicy:
    """The settings' batching policy, with the model's `serving.json` overrides; a bad file is an ArtifactError."""
    overrides = read_serving_config(model.directory).overrides()  # read even when batching is off: a bad file fails
    policy = settings_policy(settings)
    if "latency_budget_ms" in overrides:  # a model's own budget, batching or not
        policy = dataclasses.replace(policy, latency_budget_ms=overrides.pop("latency_budget_ms"))
    if settings.batching:
        defaults = provider_batching(model.provider, settings.model_fields_set)  # a GPU's larger batches
        policy = dataclasses.replace(policy, **{**defaults, **overrides})
    if not model.meta.batch_invariant:  # dynamic INT8: batch neighbours would change an image's answer
        policy = dataclasses.replace(policy, max_batch_size=1)
    return policy


class ServiceState:
    """A running server: the models it serves (the catalogue: `repository`, `unloaded`, `admin`), their compute
    (`batchers`, and `cpu_pool` for decoding), its `limits`, and its lifecycle (ready, draining, the engine)."""

    def __init__(self, settings: Settings, *, serves_http: bool = True) -> None:
        """`serves_http` False: the engine process of multi-process mode, which holds no bodies or images (its
        budgets would otherwise add to the workers' in the summed metrics)."""
        self.settings = settings
        self.repository: ModelRepository | None = None
        self.shutting_down = False  # set on SIGTERM (readiness turns 503 at once) and at shutdown
        # Decode and preprocess run here, off the event loop and overlapping with inference.
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="prep")
        self.batchers = Batchers(self.policy)
        # Multi-process mode (service.procs.worker): the link to the engine that runs every model, and the file the
        # supervisor keeps while every worker and the engine are up (readiness is the whole server's).
        self.engine: Engine | None = None
        # Models an admin unloaded (repository extension): 404 with a way back, and left alone by the reload poll.
        self.unloaded: set[str] = set()
        self.admin: RepositoryAdmin | None = None
        self.all_ready_file: Path | None = None
        # Multi-process mode: the system shared memory registry every worker reads (service.v2.shared_memory).
        self.shm_registry_dir: Path | None = None
        self.limits = Limits.of(settings, serves_http=serves_http)

    @property
    def ready(self) -> bool:
        return (
            self.repository is not None
            and self.repository.ready
            and not self.shutting_down
            and (self.engine is None or self.engine.alive)
            and (self.all_ready_file is None or self.all_ready_file.exists())
        )

    async def readiness(self) -> str | None:
        """Why the server cannot answer inference now, or None: it can. Beyond `ready` (models loaded, not
        draining), a bounded self-check: the engine answers a ping within `READY_ENGINE_TIMEOUT_S`
        (multi-process mode), and no memory budget has refused every request for `READY_STALL_S`."""
        if not self.ready:
            return "loading" if not self.shutting_down else "draining"
        if self.engine is not None and not await self.engine.ping(READY_ENGINE_TIMEOUT_S):
            return f"the inference engine did not answer within {READY_ENGINE_TIMEOUT_S:g} s"
        for budget in (self.limits.body, self.limits.decode):
            if budget is not None and budget.stalled_s() > READY_STALL_S:
                return f"the {budget.name} budget has refused every request for {budget.stalled_s():.0f} s"
        return None

    def models(self) -> ModelRepository:
        if self.repository is None:
            raise Unavailable("models are still loading; retry shortly")
        return self.repository

    def model(self, name: str | None) -> LoadedModel:
        repository = self.models()
        model = repository.get(name)
        if model is None:
            if (name or repository.default) in self.unloaded:
                unloaded = name or repository.default
                raise NotFound(
                    f"model {unloaded!r} was unloaded; POST /v2/repository/models/{unloaded}/load serves it again",
                    detail={"available": sorted(repository.models)},
                )
            failure = repository.unavailable.get(name or repository.default)
            if failure is not None:
                raise Unavailable(
                    f"model {name!r} is unavailable: it failed to load: {failure.error}",
                    detail={"available": sorted(repository.models)},
                    retry_after=None,  # until its files are fixed: a retry soon would fail the same way
                )
            raise NotFound(
                f"model {name!r} is not loaded; GET /v1/models lists the models this server has",
                detail={"available": sorted(repository.models)},
            )
        return model

    async def prepare(self, data: bytes, meta: ArtifactMetadata, *, for_overlay: bool = False) -> Prepared:
        """Decode and preprocess one image, within the pixel limit and the decode budget: in the CPU pool, or on
        the event loop when it is tiny (INLINE_IMAGE_BYTES encoded and, by its header, INLINE_IMAGE_PIXELS) and
        the budget has room now. For such an image (a 32x32 PNG: about 0.17 ms) the hop to a pool thread and
        back cost more than the decode: inline, the default model's V2 image requests ran at 1.16x the images/s
        and 0.90x the CPU per image, classify at 1.21x (benchmarks/frontend.py, interleaved). Anything larger,
        or a budget that would make it wait, goes to the pool, which judges it with the real limits."""
        if len(data) <= INLINE_IMAGE_BYTES and not for_overlay:
            try:
                return prepare(
                    data,
                    meta,
                    max_pixels=min(self.settings.max_pixels, INLINE_IMAGE_PIXELS),
                    budget=self.limits.decode,
                    jpeg_draft=self.settings.jpeg_draft,
                    wait_for_budget=False,
                )
            except (PayloadTooLarge, Overloaded):  # over the inline size, or no room now: the pool decides
                pass
        return await self.run_cpu(
            prepare,
            data,
            meta,
            max_pixels=self.settings.max_pixels,
            budget=self.limits.decode,
            for_overlay=for_overlay,
            jpeg_draft=self.settings.jpeg_draft,
        )

    async def run_sized(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the event loop when its input or output is small (`size` bytes), else in the CPU pool:
        a thread hop costs more than parsing or encoding a few KB, and a stall costs more than a hop for MBs."""
        if size <= INLINE_BYTES:
            return fn(*args)
        return await self.run_cpu(fn, *args)

    async def run_cpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, lambda: fn(*args, **kwargs))

    def policy(self, model: LoadedModel) -> BatchPolicy:
        return batch_policy(self.settings, model)

    def start_batchers(self) -> None:
        for model in self.models().models.values():
            self.batchers.serve(model, self.policy(model))

    async def infer(
        self, model: LoadedModel, pixels: np.ndarray, *, with_attention: bool, target: int | None = None
    ) -> Result:
        """One image (3, H, W) through the dynamic batcher of the version the request looked up; `target`: its
        relevance map for that class (-1: the top prediction)."""
        targets = None if target is None else [target]
        return (await self.infer_many(model, [pixels], with_attention=with_attention, targets=targets))[0]

    async def infer_many(
        self,
        model: LoadedModel,
        images: Sequence[np.ndarray],
        *,
        with_attention: bool,
        targets: Targets = None,
        source: int = 0,
    ) -> list[Result]:
        """A request's images (3, H, W) through the batcher, admitted all together or refused (503) with none run.
        `targets`: a relevance map of that class per image. `source`: the HTTP worker it came from, in the engine
        of multi-process mode."""
        if not images:
            return []
        return await self.batchers.infer_many(
            model, images, with_attention=with_attention, targets=targets, source=source
        )

    def check_room(self, model: LoadedModel, count: int) -> None:
        """Refuse (503) a request of `count` images before it is decoded if the queue cannot take them now."""
        self.batchers.check_room(model, count)

    def swap(self, model: LoadedModel, policy: BatchPolicy) -> LoadedModel | None:
        """Serve `model` from now on, under its name; returns the version it replaces.

        Runs on the event loop with no await, so every request sees either the old version or the new one.
        Requests that looked up the old version finish on it: its batcher keeps running until none waits on it.
        """
        repository = self.models()
        old_model = repository.models.get(model.name)
        self.batchers.serve(model, policy)
        repository.models[model.name] = model
        repository.unavailable.pop(model.name, None)
        self.unloaded.discard(model.name)
        return old_model

    def attach(self, engine: Engine, admin: RepositoryAdmin, batchers: BatcherFactory, default: str) -> None:
        """Serve through `engine` (an HTTP worker of multi-process mode): its models, each behind a batcher from
        `batchers`, answered there."""
        self.engine = engine
        self.admin = admin
        self.batchers.forward_with(batchers)
        self.repository = ModelRepository({}, default)

    def serve_catalog(
        self,
        models: Sequence[tuple[LoadedModel, BatchPolicy | None]],
        *,
        unavailable: dict[str, LoadFailure],
        unloaded: set[str],
        start: bool = True,
    ) -> None:
        """Serve exactly `models` (an engine's catalogue): versions new here swapped in (a policy of None: the
        version served now, kept), models gone unloaded. `start` False: before the app starts its batchers (the
        welcome), so the models are only listed."""
        repository = self.models()
        for model, policy in models:
            if policy is None:
                continue
            if start:
                self.swap(model, policy)
            else:
                repository.models[model.name] = model
        for name in set(repository.models) - {model.name for model, _ in models}:
            self.unload(name)
        repository.unavailable = dict(unavailable)
        self.unloaded = set(unloaded)

    def unload(self, name: str) -> LoadedModel | None:
        """Stop serving `name` (repository extension); returns the version it served. Like `swap`, with no await:
        requests that looked it up before finish on it, later ones get 404."""
        repository = self.models()
        old_model = repository.models.pop(name, None)
        repository.unavailable.pop(name, None)
        self.unloaded.add(name)
        self.batchers.remove(name)
        return old_model

    async def stop_batchers(self) -> None:
        await self.batchers.stop()

    def close(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.batchers.close()
