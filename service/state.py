"""What the running service holds: settings, the loaded models, worker pools, and its lifecycle flags."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from service.admission import AdaptiveAdmission, Admission, note_budget
from service.batching import Batcher, BatchPolicy, DynamicBatcher, Result, Targets, run_batch
from service.engine_client import EngineLink, RemoteBatcher
from service.errors import NotFound, Overloaded, PayloadTooLarge, Unavailable
from service.memory import ByteBudget
from service.pipeline import Prepared, prepare
from service.runtime import LoadedModel, ModelRepository, provider_batching
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


class RepositoryAdmin(Protocol):
    """Who carries out the repository extension's load and unload: `service.reload.RepositoryWatcher` in one
    process, or in an HTTP worker the engine link (`service.engine_client.EngineLink`), which asks the engine."""

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
    def __init__(self, settings: Settings, *, serves_http: bool = True) -> None:
        """`serves_http` False: the engine process of multi-process mode, which holds no bodies or images (its
        budgets would otherwise add to the workers' in the summed metrics)."""
        self.settings = settings
        self.repository: ModelRepository | None = None
        self.shutting_down = False  # set on SIGTERM (readiness turns 503 at once) and at shutdown
        # Decode and preprocess run here, off the event loop and overlapping with inference.
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="prep")
        # Unbatched runs (service.state.infer_one); batches run in each batcher's own runtime threads, one per instance.
        self.runtime_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime")
        self.batchers: dict[str, Batcher] = {}
        # Multi-process mode (service.worker): the link to the engine that runs every model, and the file the
        # supervisor keeps while every worker and the engine are up (readiness is the whole server's).
        self.engine: EngineLink | None = None
        # Models an admin unloaded (repository extension): 404 with a way back, and left alone by the reload poll.
        self.unloaded: set[str] = set()
        self.admin: RepositoryAdmin | None = None
        self.all_ready_file: Path | None = None
        # Bytes of request bodies and of decoded images in flight, server-wide (service.memory).
        self.body_budget = ByteBudget("body", settings.body_budget_bytes) if serves_http else None
        self.decode_budget = ByteBudget("decode", settings.decode_budget_bytes) if serves_http else None
        # Inference requests in progress (VITSERVE_MAX_CONCURRENT_REQUESTS), for the middleware and the direct path.
        self.admission = (
            AdaptiveAdmission(
                settings.max_concurrent_requests,
                budget=settings.latency_budget_ms / 1e3,
                tolerance=settings.admission_tolerance,
            )
            if settings.admission == "adaptive"
            else Admission(settings.max_concurrent_requests)
        )
        # Batchers of replaced versions, kept until no request waits on them; and how many requests each has.
        self._retiring: set[Batcher] = set()
        self._waiting: Counter[Batcher] = Counter()
        self._tasks: set[asyncio.Task] = set()

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
        for budget in (self.body_budget, self.decode_budget):
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
                    budget=self.decode_budget,
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
            budget=self.decode_budget,
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

    def _start_batcher(self, model: LoadedModel, policy: BatchPolicy) -> Batcher:
        batcher: Batcher
        if self.engine is not None:
            batcher = RemoteBatcher(self.engine, model, policy)
        else:
            batcher = DynamicBatcher(model, policy)
        batcher.start()
        log.info("batching %s (version %s): %s", model.name, model.meta.version, policy)
        return batcher

    def start_batchers(self) -> None:
        for name, model in self.models().models.items():
            self.batchers[name] = self._start_batcher(model, self.policy(model))

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
        batcher = self._batcher(model)
        if batcher is None:
            rows = [None] * len(images) if targets is None else list(targets)
            alone = (
                self._infer_alone(model, pixels, with_attention=with_attention, target=target)
                for pixels, target in zip(images, rows, strict=True)
            )
            return list(await asyncio.gather(*alone))
        note_budget(batcher.policy.latency_budget_ms / 1e3)  # what the front door judges this request's time by
        self._waiting[batcher] += 1
        try:
            return await batcher.submit_many(images, with_attention=with_attention, targets=targets, source=source)
        finally:
            self._waiting[batcher] -= 1
            if not self._waiting[batcher]:
                del self._waiting[batcher]

    def check_room(self, model: LoadedModel, count: int) -> None:
        """Refuse (503) a request of `count` images before it is decoded if the queue cannot take them now.

        An early answer, not a reservation: `infer_many` checks again when it queues the decoded images.
        """
        batcher = self._batcher(model)
        if batcher is not None:
            note_budget(batcher.policy.latency_budget_ms / 1e3)
            batcher.check_room(count)

    def _batcher(self, model: LoadedModel) -> Batcher | None:
        batcher = self.batchers.get(model.name)
        if batcher is None or batcher.model is not model:  # replaced by a reload since the lookup
            batcher = next((b for b in self._retiring if b.model is model), None)
        if batcher is None and self.engine is not None:
            # An HTTP worker cannot run a version alone (the sessions are in the engine): it forwards, and the
            # engine finishes the request on that version while it still holds it.
            batcher = self._start_batcher(model, self.policy(model))
        return batcher

    async def _infer_alone(
        self, model: LoadedModel, pixels: np.ndarray, *, with_attention: bool, target: int | None
    ) -> Result:
        """A request that began on a version whose batcher is already retired finishes on that version."""
        started = time.perf_counter()
        run = functools.partial(run_batch, model, [pixels], with_attention, [target])
        logits, attentions, relevance = await asyncio.get_running_loop().run_in_executor(self.runtime_pool, run)
        return Result(
            logits=logits[0],
            attentions=None if attentions is None else attentions[0],
            queue_ms=0.0,
            compute_ms=(time.perf_counter() - started) * 1e3,
            batch_size=1,
            relevance=None if relevance is None else relevance[0],
        )

    def swap(self, model: LoadedModel, policy: BatchPolicy) -> LoadedModel | None:
        """Serve `model` from now on, under its name; returns the version it replaces.

        Runs on the event loop with no await, so every request sees either the old version or the new one.
        Requests that looked up the old version finish on it: its batcher keeps running until none waits on it.
        """
        repository = self.models()
        old_model = repository.models.get(model.name)
        old_batcher = self.batchers.get(model.name)
        self.batchers[model.name] = self._start_batcher(model, policy)
        repository.models[model.name] = model
        repository.unavailable.pop(model.name, None)
        self.unloaded.discard(model.name)
        if old_batcher is not None:
            self._retire_later(old_batcher)
        return old_model

    def unload(self, name: str) -> LoadedModel | None:
        """Stop serving `name` (repository extension); returns the version it served. Like `swap`, with no await:
        requests that looked it up before finish on it, later ones get 404."""
        repository = self.models()
        old_model = repository.models.pop(name, None)
        repository.unavailable.pop(name, None)
        self.unloaded.add(name)
        old_batcher = self.batchers.pop(name, None)
        if old_batcher is not None:
            self._retire_later(old_batcher)
        return old_model

    def _retire_later(self, batcher: Batcher) -> None:
        self._retiring.add(batcher)
        task = asyncio.get_running_loop().create_task(self._retire(batcher), name=f"retire-{batcher.model.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, batcher: Batcher) -> None:
        # Every submit ends within the batcher's timeout, so the wait is bounded; a request that looks the old
        # version up later still finishes on it (`_infer_alone`).
        deadline = time.monotonic() + batcher.policy.timeout_s + 1.0
        while self._waiting[batcher] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._retiring.discard(batcher)
        await batcher.stop()
        log.info("retired the batcher of %s version %s", batcher.model.name, batcher.model.meta.version)

    async def stop_batchers(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for batcher in [*self.batchers.values(), *self._retiring]:
            await batcher.stop()

    def close(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.runtime_pool.shutdown(wait=False, cancel_futures=True)
