"""Dynamic batching: concurrent requests for one model are coalesced into one runtime call.

A request puts its preprocessed image in the model's bounded queue and awaits a future. One worker per model
takes the first waiting item, then keeps taking items until it has `max_batch_size` or `max_queue_delay_ms`
has passed since the first, stacks them (a small batch here, a large one in the runtime thread, into the buffer
`service.core.runtime.BoundBatch` reuses) and runs them in a single onnxruntime call in the runtime thread; each
future gets its own row back. While a batch runs, new requests queue up, so under load batches fill without
waiting. A full queue is refused at once (503 + Retry-After), never an unbounded wait.

Adaptive admission (`admission="adaptive"`, the default) refuses earlier only what would miss its latency budget
(`latency_budget_ms`: `VITSERVE_LATENCY_BUDGET_MS`, or the model's `serving.json`), from its complete body to its
answer. The batcher keeps each batch size's service time (`ServiceTimes`, a moving average) and predicts when a
request would be answered: the rest of the running batch that ends first, one full batch for every round of
`max_batch_size` x instances images queued ahead of its last image, then its own last batch (`predicted_answer`).
Added to the time the request has already spent in the server (`service.core.admission.time_in_server`), past the
budget, it is refused at once (503 + Retry-After) before any of its images is queued. A request that would start
within one full batch (plus `max_queue_delay_ms`) is never refused for latency, so a budget shorter than a batch
still serves: the queue then holds one batch ahead, which still runs full. Otherwise the queue holds what the model
clears within the budget, so throughput is kept under overload and an accepted request is answered within the
budget, or within one batch and its own if that is longer. Nothing is tuned to a machine: the times are measured
as the batcher runs (until its first batch there is no estimate, and it admits). `service.core.admission` limits
requests in progress at the front door for the same end where the event loop, not the runtime, is what requests
wait for.

A request of N images (batch, V2) is admitted whole or not at all (`submit_many`): its N items enter the queue
together, with no await between the check and the puts, or it is refused before any of them runs, so a refused
request costs no inference and an accepted one is never cut short by a queue that filled under it.

Classify and attention requests share the queue: a batch holding any attention request runs on the attention
graph, which returns logits too (see vit_artifact/metadata.py). Relevance requests carry a target class per image
and share it too: a batch's relevance rows, whatever their targets, run in one call on the relevance graph, the
other rows beside them on the same instance (`LoadedModel.infer_targets`).
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

from service.core.admission import time_in_server
from service.core.budgets import MMAP_THRESHOLD
from service.core.runtime import LoadedModel
from service.errors import Overloaded, Unavailable
from service.obs.metrics import METRICS

log = logging.getLogger("vitserve.batching")


@dataclass(frozen=True)
class BatchPolicy:
    """One model's batching, from the settings and its `serving.json` (`service.core.state.batch_policy`): no
    defaults here, so the settings stay the one home of every default."""

    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    timeout_s: float
    enabled: bool
    admission: str  # "adaptive" or "queue" (service.settings.Settings.admission)
    latency_budget_ms: float  # adaptive admission: refuse what is predicted to be answered later than this


@dataclass
class _Item:
    pixels: np.ndarray  # (3, H, W)
    with_attention: bool
    future: asyncio.Future
    source: int  # who sent it: the HTTP worker process, in multi-process mode (0 in one process)
    target: int | None = None  # a relevance map for this class (-1: the top prediction); None: no map
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    logits: np.ndarray  # (C,)
    attentions: np.ndarray | None  # (L, H, N, N)
    queue_ms: float
    compute_ms: float
    batch_size: int
    relevance: np.ndarray | None = None  # (grid_h, grid_w), raw, when a target was given


Targets = Sequence[int] | None  # one target class per image (-1: its top prediction), or no relevance maps


def run_batch(
    model: LoadedModel, images: np.ndarray | Sequence[np.ndarray], with_attention: bool, targets: Sequence[int | None]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One runtime call for a batch: logits, attentions when asked, relevance maps when any row has a target."""
    if all(t is None for t in targets):
        logits, attentions = model.infer(images, with_attention=with_attention)
        return logits, attentions, None
    return model.infer_targets(images, targets, with_attention=with_attention)


# Mean deviations a predicted batch time adds to the average (TCP's retransmission timeout adds four, for a far
# tail): a queue of twenty ViT-B/16 INT8 batches predicted at their averages was answered up to 10% past the
# budget at p99 (benchmarks/overload.py); at the average plus two deviations, within it.
CAUTION = 2.0


class ServiceTimes:
    """Each batch size's service time in seconds, a moving average of the batches run (recent ones weigh
    `weight`) and of how far each batch was from it (as TCP keeps a round trip's time and its variation), and an
    estimate for sizes not run yet from the nearest size that was."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.seconds: dict[int, float] = {}
        self.deviation: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        old = self.seconds.get(size)
        if old is None:
            self.seconds[size], self.deviation[size] = seconds, 0.0
            return
        self.deviation[size] += self.weight * (abs(seconds - old) - self.deviation[size])
        self.seconds[size] = old + self.weight * (seconds - old)

    def estimate(self, size: int) -> float | None:
        """Seconds a batch of `size` takes on average; None before any batch ran. For a size not run yet, an upper
        bound: a batch takes no longer than a larger one, nor longer per image than a smaller one."""
        return _nearest(self.seconds, size)

    def cautious(self, size: int) -> float | None:
        """Seconds a batch of `size` takes, erring long: its average plus twice its mean deviation."""
        mean = _nearest(self.seconds, size)
        return None if mean is None else mean + CAUTION * (_nearest(self.deviation, size) or 0.0)


def _nearest(by_size: dict[int, float], size: int) -> float | None:
    known = by_size.get(size)
    if known is not None or not by_size:
        return known
    larger = [s for s in by_size if s > size]
    if larger:
        return by_size[min(larger)]
    largest = max(by_size)
    return by_size[largest] * size / largest


def predicted_answer(
    times: ServiceTimes, batch_size: int, queued: int, count: int, running_rest: float, instances: int = 1
) -> float | None:
    """Seconds before a request of `count` images arriving now is answered, behind `queued` images: the rest of the
    batch that ends first (`running_rest`, 0 when an instance is free), then one full batch for every round of
    `batch_size` images on each of the model's `instances` ahead of its last image, then the batch that holds its
    last image; each batch at its cautious time (`ServiceTimes.cautious`), since an answer late by the sum of
    twenty batches' jitter is still late. None: nothing measured yet."""
    full = times.cautious(batch_size)
    if full is None:
        return None
    rounds, place = divmod(queued + count - 1, batch_size * instances)  # the last image: its round, its place in it
    last = times.cautious(min(place + 1, batch_size)) or full
    return max(running_rest, 0.0) + rounds * full + last


def own_time(times: ServiceTimes, batch_size: int, count: int) -> float:
    """Seconds a request of `count` images takes on an idle model: its full batches, then the rest, at their
    cautious times (as `predicted_answer` counts them)."""
    full = times.cautious(batch_size) or 0.0
    rest = count % batch_size
    return (count // batch_size) * full + ((times.cautious(rest) or 0.0) if rest else 0.0)


class Batcher(Protocol):
    """What routes and `ServiceState` use of a model's batcher: `DynamicBatcher` here, or in an HTTP worker of
    multi-process mode `service.procs.engine_client.RemoteBatcher`, which forwards to the engine's."""

    model: LoadedModel
    policy: BatchPolicy

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def check_room(self, count: int) -> None: ...

    async def submit_many(
        self, images: Sequence[np.ndarray], *, with_attention: bool, targets: Targets = None, source: int = 0
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
        self.times = ServiceTimes()  # what the adaptive admission predicts answers from
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

    async def submit(self, pixels: np.ndarray, *, with_attention: bool, target: int | None = None) -> Result:
        targets = None if target is None else [target]
        return (await self.submit_many([pixels], with_attention=with_attention, targets=targets))[0]

    def check_room(self, count: int) -> None:
        """Refuse (503) a request of `count` images if the queue has fewer places free, or (adaptive admission)
        if it is predicted to be answered later than its latency budget; no place is held."""
        size, queued = self.policy.max_queue_size, self.queue.qsize()
        if count <= size - queued:
            if self.policy.admission == "adaptive":
                self._check_budget(queued, count)
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

    def predict(self, queued: int, count: int = 1) -> float | None:
        """Seconds from now until a request of `count` images, queued behind `queued` images, is answered; None:
        nothing measured yet."""
        rest = min(self._running_until) - time.perf_counter()
        return predicted_answer(self.times, self.policy.max_batch_size, queued, count, rest, self.model.instances)

    def within_a_batch(self, count: int = 1) -> float | None:
        """The predicted answer that is never refused for latency, seconds from now: one full batch's wait (plus the
        queue delay, which a request may wait for company anyway), then the request's own batches, each at its
        cautious time, as the prediction it is compared with. None: nothing measured yet."""
        size = self.policy.max_batch_size
        full = self.times.cautious(size)
        if full is None:
            return None
        return full + self.policy.max_queue_delay_ms / 1e3 + own_time(self.times, size, count)

    def _check_budget(self, queued: int, count: int) -> None:
        answer = self.predict(queued, count)
        floor = self.within_a_batch(count)
        if answer is None or floor is None or answer <= floor:
            return
        budget = self.policy.latency_budget_ms / 1e3
        spent = time_in_server()
        if spent + answer <= budget:
            return
        METRICS.rejected.labels(model=self.model.name, reason="budget").inc()
        raise Overloaded(
            f"model {self.model.name} cannot answer this request within its latency budget of {budget * 1e3:g} ms "
            f"(VITSERVE_LATENCY_BUDGET_MS): with {queued} images queued ahead of it, it would be answered in about "
            f"{(spent + answer) * 1e3:.0f} ms; retry shortly",
            detail={
                "predicted_ms": round((spent + answer) * 1e3, 1),
                "budget_ms": round(budget * 1e3, 1),
                "queued": queued,
            },
            headers={"Retry-After": "1"},
        )

    async def submit_many(
        self, images: Sequence[np.ndarray], *, with_attention: bool, targets: Targets = None, source: int = 0
    ) -> list[Result]:
        """Queue every image (3, H, W) of one request at once, or refuse the request (503) with none queued.
        `targets`: a relevance map of this class for each image."""
        self.start()
        self.check_room(len(images))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in images]
        rows = [None] * len(images) if targets is None else list(targets)
        for pixels, future, target in zip(images, futures, rows, strict=True):  # no await since the check: all fit
            self.queue.put_nowait(_Item(pixels, with_attention, future, source, target))
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
            targets = [item.target for item in batch]
            # A small batch is stacked here, from the heap, so that the runtime thread needs the GIL for nothing but
            # handing it to onnxruntime: handing the rows to the runtime thread to copy measured 8-12% fewer images/s
            # through HTTP for the default model (frontend.py --quick). A large one (tens of MiB for ViT-B/16)
            # is copied in the runtime thread (numpy lets go of the GIL for it) into the buffer it reuses, sparing a
            # fresh mapping's page faults; an item that times out before then may have its pixels rewritten (the
            # engine's worker reuses the slot): only its own row, whose answer is dropped.
            rows = [item.pixels for item in batch]
            images = np.stack(rows) if len(rows) * rows[0].nbytes < MMAP_THRESHOLD else rows
            started = time.perf_counter()
            self._running_until[runner] = started + (self.times.cautious(len(batch)) or 0.0)
            try:
                infer = functools.partial(run_batch, self.model, images, with_attention, targets)
                logits, attentions, relevance = await loop.run_in_executor(self.executor, infer)
            except Exception as e:  # a runtime fault fails this batch's requests, not the worker
                log.exception("batch of %d failed on %s", len(batch), name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                del batch, images, infer, item  # not held between batches (below)
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
                            relevance=None if relevance is None or item.target is None else relevance[row],
                        )
                    )
            # Nothing of this batch is held while the next is collected: in the engine its pixels are views of an
            # HTTP worker's slots, which must be let go before that worker's pool is closed (service.procs.engine).
            del batch, images, infer, item
