"""Dynamic batching: concurrent requests for one model are coalesced into one runtime call.

A request puts its preprocessed image in the model's bounded queue and awaits a future. One worker per model
takes the first waiting item, then keeps taking items until it has `max_batch_size` or `max_queue_delay_ms`
has passed since the first, and runs them in a single onnxruntime call in the runtime thread, which copies
each item's pixels into the model's bound batch buffer (`service.runtime.BoundBatch`: the one copy on the way
to the runtime); each future gets its own row back. While a batch runs, new requests queue up, so under load batches fill
without waiting. A full queue is refused at once (503 + Retry-After), never an unbounded wait.

Adaptive admission (`admission="adaptive"`, the default) refuses earlier, from what the batcher measures: it keeps
each batch size's service time (`ServiceTimes`, a moving average), and refuses a request at once (503 +
Retry-After) when the work ahead of it, the rest of the running batch plus one full batch for every
`max_batch_size` images queued, is predicted to take longer than its target: one full batch's time (or, for a
request of more images than a batch holds, its own time) plus `max_queue_delay_ms`. An admitted request then
starts within about one batch time and is answered within about two: the queue never holds more than the next
batch, which still runs full, so throughput is kept and the excess is turned away instead of waiting. With
`max_batch_size` 1 that is at most one image waiting, and an accepted request's latency within twice the
unloaded one. Nothing is tuned to a machine: the times are measured as the batcher runs (until its first batch
there is no estimate, and it admits). `service.admission` limits requests in progress for the same end where the
event loop, not the runtime, is what requests wait for.

A request of N images (batch, V2) is admitted whole or not at all (`submit_many`): its N items enter the queue
together, with no await between the check and the puts, or it is refused before any of them runs, so a refused
request costs no inference and an accepted one is never cut short by a queue that filled under it.

Classify and attention requests share the queue: a batch holding any attention request runs on the attention
graph, which returns logits too (see vit_artifact/metadata.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.errors import Overloaded, Unavailable
from service.metrics import METRICS
from service.runtime import LoadedModel

log = logging.getLogger("vitserve.batching")


@dataclass(frozen=True)
class BatchPolicy:
    """One model's batching, from the settings and its `serving.json` (`service.state.batch_policy`): no
    defaults here, so the settings stay the one home of every default."""

    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    timeout_s: float
    enabled: bool
    admission: str  # "adaptive" or "queue" (service.settings.Settings.admission)


@dataclass
class _Item:
    pixels: np.ndarray  # (3, H, W)
    with_attention: bool
    future: asyncio.Future
    source: int  # who sent it: the HTTP worker process, in multi-process mode (0 in one process)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    logits: np.ndarray  # (C,)
    attentions: np.ndarray | None  # (L, H, N, N)
    queue_ms: float
    compute_ms: float
    batch_size: int


class ServiceTimes:
    """Each batch size's service time in seconds, a moving average of the batches run (recent ones weigh
    `weight`), and an estimate for sizes not run yet from the nearest size that was."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.seconds: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        old = self.seconds.get(size)
        self.seconds[size] = seconds if old is None else old + self.weight * (seconds - old)

    def estimate(self, size: int) -> float | None:
        """Seconds a batch of `size` takes; None before any batch ran. For a size not run yet, an upper bound: a
        batch takes no longer than a larger one, nor longer per image than a smaller one."""
        known = self.seconds.get(size)
        if known is not None or not self.seconds:
            return known
        larger = [s for s in self.seconds if s > size]
        if larger:
            return self.seconds[min(larger)]
        largest = max(self.seconds)
        return self.seconds[largest] * size / largest


def predicted_wait(
    times: ServiceTimes, batch_size: int, queued: int, running_rest: float, instances: int = 1
) -> float | None:
    """Seconds before a request arriving now starts running: the rest of the batch that ends first
    (`running_rest`, 0 when an instance is free), then one full batch for every `batch_size` images queued ahead
    of it on each of the model's `instances` (it joins the batch after those). None: nothing measured yet."""
    full = times.estimate(batch_size)
    return None if full is None else max(running_rest, 0.0) + (queued // (batch_size * instances)) * full


class Batcher(Protocol):
    """What routes and `ServiceState` use of a model's batcher: `DynamicBatcher` here, or in an HTTP worker of
    multi-process mode `service.engine_client.RemoteBatcher`, which forwards to the engine's."""

    model: LoadedModel
    policy: BatchPolicy

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def check_room(self, count: int) -> None: ...

    async def submit_many(
        self, images: Sequence[np.ndarray], *, with_attention: bool, source: int = 0
    ) -> list[Result]: ...


class DynamicBatcher:
    """One model's queue and its runners: one per instance of the model (`LoadedModel.instances`), each running
    one batch at a time in a runtime thread of its own. Runners take turns to collect: one fills a batch while
    the others run theirs, so batches fill as with one runner and run side by side."""

    def __init__(self, model: LoadedModel, policy: BatchPolicy, executor: Executor | None = None) -> None:
        """`executor`: where batches run (tests hold one to hold the runtime); by default threads of its own."""
        self.model = model
        self.policy = policy
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=model.instances, thread_name_prefix=f"runtime-{model.name}"
        )
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=policy.max_queue_size)
        self._workers: list[asyncio.Task] = []
        self._collecting = asyncio.Lock()
        self._depth = METRICS.queue_depth.labels(model=model.name)  # looked up once: set on every request
        self.times = ServiceTimes()  # what the adaptive admission predicts waits from
        # perf_counter when each runner's batch is predicted to end (0: idle, or none has run yet)
        self._running_until = [0.0] * model.instances

    def start(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._run(i), name=f"batcher-{self.model.name}-{i}")
                for i in range(self.model.instances)
            ]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, pixels: np.ndarray, *, with_attention: bool) -> Result:
        return (await self.submit_many([pixels], with_attention=with_attention))[0]

    def check_room(self, count: int) -> None:
        """Refuse (503) a request of `count` images if the queue has fewer places free, or (adaptive admission)
        if its first image is predicted to wait longer than the target; no place is held."""
        size, queued = self.policy.max_queue_size, self.queue.qsize()
        if count <= size - queued:
            if self.policy.admission == "adaptive":
                self._check_wait(queued, count)
            return
        METRICS.rejected.labels(model=self.model.name, reason="queue").inc()
        raise Overloaded(
            f"model {self.model.name} has {size} requests queued; retry shortly"
            if count == 1
            else f"model {self.model.name} has {size - queued} of {size} places free in its queue and this request "
            f"has {count} images; none was run: retry shortly",
            detail={"queue_size": size, "queued": queued, "images": count},
            headers={"Retry-After": "1"},
        )

    def admission_target(self, count: int = 1) -> float | None:
        """The longest predicted wait the adaptive admission accepts for a request of `count` images, in seconds:
        one full batch's time, or the request's own time if it needs more than one batch (so it may take twice
        its unloaded time, like any other), plus the queue delay (a request may be asked to wait that long for
        company anyway). None: nothing measured yet."""
        size = self.policy.max_batch_size
        full = self.times.estimate(size)
        if full is None:
            return None
        own = (count // size) * full + ((self.times.estimate(count % size) or 0.0) if count % size else 0.0)
        return max(full, own) + self.policy.max_queue_delay_ms / 1e3

    def _check_wait(self, queued: int, count: int) -> None:
        policy = self.policy
        rest = min(self._running_until) - time.perf_counter()
        wait = predicted_wait(self.times, policy.max_batch_size, queued, rest, self.model.instances)
        target = self.admission_target(count)
        if wait is None or target is None or wait <= target:
            return
        METRICS.rejected.labels(model=self.model.name, reason="adaptive").inc()
        raise Overloaded(
            f"model {self.model.name} is over capacity: this request would wait about {wait * 1e3:.0f} ms to start, "
            f"more than the {target * 1e3:.0f} ms it may (the longer of a full batch and its own images); retry "
            "shortly",
            detail={"predicted_wait_ms": round(wait * 1e3, 1), "target_ms": round(target * 1e3, 1), "queued": queued},
            headers={"Retry-After": "1"},
        )

    async def submit_many(self, images: Sequence[np.ndarray], *, with_attention: bool, source: int = 0) -> list[Result]:
        """Queue every image (3, H, W) of one request at once, or refuse the request (503) with none queued."""
        self.start()
        self.check_room(len(images))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in images]
        for pixels, future in zip(images, futures, strict=True):  # no await since the check: every put fits
            self.queue.put_nowait(_Item(pixels, with_attention, future, source))
        self._depth.set(self.queue.qsize())
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                if len(futures) == 1:  # the common case, without a gathering future
                    return [await asyncio.shield(futures[0])]
                return await asyncio.shield(asyncio.gather(*futures))
        except TimeoutError:
            for future in futures:
                future.cancel()  # the worker skips those that have not run yet
            raise Unavailable(
                f"the request waited {self.policy.timeout_s:g} s without being served; the server is overloaded",
                headers={"Retry-After": "1"},
            ) from None

    async def _collect(self) -> list[_Item]:
        first = await self.queue.get()
        batch = [first]
        deadline = first.enqueued + self.policy.max_queue_delay_ms / 1e3
        while len(batch) < self.policy.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return [item for item in batch if not item.future.done()]  # timed-out requests are dropped here

    async def _run(self, runner: int) -> None:
        loop = asyncio.get_running_loop()
        name = self.model.name
        while True:
            async with self._collecting:
                batch = await self._collect()
            self._depth.set(self.queue.qsize())
            if not batch:
                continue
            with_attention = any(item.with_attention for item in batch)
            # Copied into the batch in the runtime thread, off this loop. An item that times out before then may have
            # its pixels rewritten (the engine's worker reuses the slot): only its own row, whose answer is dropped.
            images = [item.pixels for item in batch]
            started = time.perf_counter()
            self._running_until[runner] = started + (self.times.estimate(len(batch)) or 0.0)
            try:
                infer = functools.partial(self.model.infer, images, with_attention=with_attention)
                logits, attentions = await loop.run_in_executor(self.executor, infer)
            except Exception as e:  # a runtime fault fails this batch's requests, not the worker
                log.exception("batch of %d failed on %s", len(batch), name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self._running_until[runner] = 0.0
            finished = time.perf_counter()
            # Until the event loop resumes this task, the next batch cannot start: that lag is service time too.
            self.times.observe(len(batch), finished - started)
            compute_ms = (finished - started) * 1e3
            METRICS.observe_batch(
                name,
                self.model.meta.version,
                len(batch),
                compute_ms,
                [(started - item.enqueued) * 1e3 for item in batch],
                sources=len({item.source for item in batch}),
            )
            for row, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(
                        Result(
                            logits=logits[row],
                            attentions=None if attentions is None else attentions[row],
                            queue_ms=(started - item.enqueued) * 1e3,
                            compute_ms=compute_ms,
                            batch_size=len(batch),
                        )
                    )
