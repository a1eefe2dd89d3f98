"""The models' compute: one batcher per served version (running the model here, or forwarding to the engine of
multi-process mode), the batchers of replaced versions until no request waits on them, and a pool for a request
whose version's batcher is already gone."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.core.admission import note_budget
from service.core.batching import Batcher, BatchPolicy, DynamicBatcher, Result, Targets, run_batch
from service.core.runtime import LoadedModel

log = logging.getLogger("vitserve")

BatcherFactory = Callable[[LoadedModel, BatchPolicy], Batcher]


class Batchers:
    """The batchers of the served versions, by model name (`running`), and of the versions being retired."""

    def __init__(self, policy_of: Callable[[LoadedModel], BatchPolicy]) -> None:
        self.policy_of = policy_of
        # How a version gets its batcher: run here, or forwarded to the engine (`forward_with`).
        self.factory: BatcherFactory = DynamicBatcher
        self.forwards = False
        self.running: dict[str, Batcher] = {}
        # Batchers of replaced versions, kept until no request waits on them; and how many requests each has.
        self.retiring: set[Batcher] = set()
        self._waiting: Counter[Batcher] = Counter()
        self._tasks: set[asyncio.Task] = set()
        # Unbatched runs (`_infer_alone`); batches run in each batcher's own runtime threads, one per instance.
        self.runtime_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime")

    def forward_with(self, factory: BatcherFactory) -> None:
        """Every version from now on behind a batcher from `factory`, which forwards to the engine: an HTTP worker
        cannot run a version alone (the sessions are in the engine)."""
        self.factory, self.forwards = factory, True

    def _start(self, model: LoadedModel, policy: BatchPolicy) -> Batcher:
        batcher = self.factory(model, policy)
        batcher.start()
        log.info("batching %s (version %s): %s", model.name, model.meta.version, policy)
        return batcher

    def serve(self, model: LoadedModel, policy: BatchPolicy) -> None:
        """Batch `model` from now on, under its name; the batcher of the version it replaces is retired."""
        old = self.running.get(model.name)
        self.running[model.name] = self._start(model, policy)
        if old is not None:
            self._retire_later(old)

    def remove(self, name: str) -> None:
        old = self.running.pop(name, None)
        if old is not None:
            self._retire_later(old)

    def _find(self, model: LoadedModel) -> Batcher | None:
        batcher = self.running.get(model.name)
        if batcher is None or batcher.model is not model:  # replaced by a reload since the lookup
            batcher = next((b for b in self.retiring if b.model is model), None)
        if batcher is None and self.forwards:
            # The engine finishes the request on that version while it still holds it.
            batcher = self._start(model, self.policy_of(model))
        return batcher

    async def infer_many(
        self,
        model: LoadedModel,
        images: Sequence[np.ndarray],
        *,
        with_attention: bool,
        targets: Targets = None,
        source: int = 0,
    ) -> list[Result]:
        """A request's images through the batcher of the version it looked up, admitted all together or refused
        (503) with none run; `targets`: a relevance map of that class per image."""
        batcher = self._find(model)
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
        batcher = self._find(model)
        if batcher is not None:
            note_budget(batcher.policy.latency_budget_ms / 1e3)
            batcher.check_room(count)

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

    def _retire_later(self, batcher: Batcher) -> None:
        self.retiring.add(batcher)
        task = asyncio.get_running_loop().create_task(self._retire(batcher), name=f"retire-{batcher.model.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, batcher: Batcher) -> None:
        # Every submit ends within the batcher's timeout, so the wait is bounded; a request that looks the old
        # version up later still finishes on it (`_infer_alone`).
        deadline = time.monotonic() + batcher.policy.timeout_s + 1.0
        while self._waiting[batcher] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.retiring.discard(batcher)
        await batcher.stop()
        log.info("retired the batcher of %s version %s", batcher.model.name, batcher.model.meta.version)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for batcher in [*self.running.values(), *self.retiring]:
            await batcher.stop()

    def close(self) -> None:
        self.runtime_pool.shutdown(wait=False, cancel_futures=True)
