"""`DynamicBatcher` on its own, in this process: how it forms batches, its deadline, its per-request timeout,
a failing batch, requests that gave up before their batch ran, a full queue, and the adaptive admission (with
synthetic service times: what it predicts, and whom it refuses).

Where the numbers matter the model is the committed default artifact through onnxruntime; where the point is
when and with whom `infer` is called, it is `Scripted`, a stand-in with the same batch-shaped `infer` that
records every call and can be held until the test lets it go (so nothing here depends on timing). The adaptive
admission is judged against batches that take a synthetic minute, so the real clock moves nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.core.admission import AdaptiveAdmission
from service.core.batching import BatchPolicy, DynamicBatcher, Result, ServiceTimes, own_time, predicted_answer
from service.core.runtime import CPU, CUDA, LoadedModel, load_model, session_layout
from service.errors import Overloaded, ServiceError, Unavailable
from tests.conftest import DEFAULT_MODEL, metric
from tests.service import inprocess

CLASSES = 3
POISON = -1.0  # a pixel value that makes `Scripted.infer` fail the whole batch


class Scripted:
    """A model with `LoadedModel`'s batch-shaped `infer`: logits are each image's first pixel, repeated."""

    def __init__(self) -> None:
        self.name = "scripted"
        self.meta = SimpleNamespace(version="1")
        self.batches: list[list[float]] = []  # the first pixel of every image of every call, in order
        self.running = threading.Event()  # set while a call is inside infer
        self.release = threading.Event()
        self.release.set()  # calls run through unless a test clears this to hold them
        self.instances = 1  # LoadedModel.instances: batches it may run at once

    def infer(self, pixels: np.ndarray, *, with_attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
        firsts = [float(image.flat[0]) for image in pixels]
        self.batches.append(firsts)
        self.running.set()
        assert self.release.wait(timeout=30), "the test never released the model"
        if POISON in firsts:
            raise RuntimeError("the runtime failed on this batch")
        return np.repeat(np.array(firsts, np.float32)[:, None], CLASSES, axis=1), None


def image(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, np.float32)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-runtime")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def run(
    model: Any, policy: BatchPolicy, executor: ThreadPoolExecutor, scenario: Callable[..., Awaitable[None]]
) -> None:
    """`scenario(batcher)` on a fresh event loop, the batcher stopped afterwards."""

    async def main() -> None:
        batcher = DynamicBatcher(model, policy, executor)
        try:
            await scenario(batcher)
        finally:
            await batcher.stop()

    asyncio.run(main())


async def until_taken(batcher: DynamicBatcher) -> None:
    """Yield to the loop until a request just submitted is in the queue, then until a runner has taken it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    for taken in (False, True):
        while (batcher.queue.qsize() == 0) != taken:
            assert loop.time() < deadline, "the request was not queued and taken"
            await asyncio.sleep(0)


async def until_queued(batcher: DynamicBatcher, count: int) -> None:
    """Yield to the loop until `count` requests wait in the batcher's queue (a submit queues without awaiting)."""
    for _ in range(1000):
        if batcher.queue.qsize() >= count:
            return
        await asyncio.sleep(0)  # one turn of the loop, not a wait for time to pass
    raise AssertionError(f"the queue holds {batcher.queue.qsize()} requests, not {count}")


async def until_running(model: Scripted) -> None:
    """Wait until the worker's call is inside `infer` (the runtime thread sets the event)."""
    assert await asyncio.to_thread(model.running.wait, 30), "the batch never reached the model"


def test_coalesced_rows_go_back_to_their_own_requests_with_the_real_model(executor):
    model: LoadedModel = inprocess.load()
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(3, *model.meta.input_size)).astype(np.float32) for _ in range(3)]
    alone = [model.infer(im[None], with_attention=True) for im in images]

    async def scenario(batcher: DynamicBatcher) -> None:
        # Batches of 3 and a minute's delay: the three requests can only run together, in one call.
        results = await asyncio.gather(*(batcher.submit(im, with_attention=True) for im in images))
        for result, (logits, attentions) in zip(results, alone, strict=True):
            assert result.batch_size == 3
            np.testing.assert_allclose(result.logits, logits[0], rtol=0, atol=1e-5)
            assert result.attentions is not None
            np.testing.assert_allclose(result.attentions, attentions[0], rtol=0, atol=1e-5)

    run(model, inprocess.policy(max_batch_size=3, max_queue_delay_ms=60_000), executor, scenario)


def test_a_batch_runs_as_soon_as_it_is_full(executor):
    model = Scripted()

    async def scenario(batcher: DynamicBatcher) -> None:
        results = await asyncio.gather(*(batcher.submit(image(v), with_attention=False) for v in (1, 2, 3, 4)))
        assert [r.batch_size for r in results] == [2, 2, 2, 2]
        assert model.batches == [[1, 2], [3, 4]]  # in arrival order; each row answers its own request
        assert [float(r.logits[0]) for r in results] == [1, 2, 3, 4]

    # A minute's delay that nobody waits for: each batch is full at two.
    run(model, inprocess.policy(max_batch_size=2, max_queue_delay_ms=60_000), executor, scenario)


def test_the_first_request_waits_at_most_max_queue_delay_for_company(executor):
    model = Scripted()

    async def scenario(batcher: DynamicBatcher) -> None:
        result = await batcher.submit(image(1), with_attention=False)
        assert result.batch_size == 1 and model.batches == [[1]]
        assert result.queue_ms >= 49  # it waited out the deadline (less the loop's timer slack), alone, then ran

    run(model, inprocess.policy(max_batch_size=8, max_queue_delay_ms=50), executor, scenario)


def test_requests_that_queue_while_a_batch_runs_form_the_next_batch(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        first = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)  # no delay: the first request ran alone, at once
        rest = [asyncio.ensure_future(batcher.submit(image(v), with_attention=False)) for v in (2, 3, 4)]
        await until_queued(batcher, 3)
        model.release.set()
        await asyncio.gather(first, *rest)
        assert model.batches == [[1], [2, 3, 4]]

    run(model, inprocess.policy(max_batch_size=8, max_queue_delay_ms=0), executor, scenario)


def test_a_request_not_served_within_timeout_gets_503_and_is_skipped_when_its_batch_is_formed(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        first = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)  # the worker is busy on the first request, for as long as the test wants
        second = asyncio.ensure_future(batcher.submit(image(2), with_attention=False))  # queued behind it
        for gave_up in await asyncio.gather(first, second, return_exceptions=True):
            assert isinstance(gave_up, Unavailable), gave_up
            assert gave_up.status == 503 and gave_up.headers == {"Retry-After": "1"}
            assert "waited 0.2 s without being served" in gave_up.message
        model.release.set()
        third = await batcher.submit(image(3), with_attention=False)
        # The queued request that gave up (its future cancelled) was dropped, not computed for nobody.
        assert model.batches == [[1], [3]] and third.batch_size == 1

    run(model, inprocess.policy(max_batch_size=8, max_queue_delay_ms=0, timeout_s=0.2), executor, scenario)


def test_a_failing_batch_fails_only_its_requests_and_the_worker_goes_on(executor):
    model = Scripted()

    async def scenario(batcher: DynamicBatcher) -> None:
        failed = await asyncio.gather(
            batcher.submit(image(POISON), with_attention=False),
            batcher.submit(image(5), with_attention=False),  # same batch: fails with it
            return_exceptions=True,
        )
        assert [str(e) for e in failed] == ["the runtime failed on this batch"] * 2
        assert model.batches == [[POISON, 5]]
        after = await asyncio.gather(*(batcher.submit(image(v), with_attention=False) for v in (6, 7)))
        assert [float(r.logits[0]) for r in after] == [6, 7]
        assert model.batches[1:] == [[6, 7]]

    run(model, inprocess.policy(max_batch_size=2, max_queue_delay_ms=60_000), executor, scenario)


def test_a_full_queue_is_refused_at_once_with_503(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        running = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)  # taken off the queue and running
        queued = [asyncio.ensure_future(batcher.submit(image(v), with_attention=False)) for v in (2, 3)]
        await until_queued(batcher, 2)  # the queue (2 places) is full
        before = rejected()
        with pytest.raises(Overloaded) as caught:
            await batcher.submit(image(4), with_attention=False)
        assert isinstance(caught.value, ServiceError) and caught.value.status == 503
        assert caught.value.headers == {"Retry-After": "1"} and caught.value.detail == {
            "queue_size": 2,
            "queued": 2,
            "images": 1,
        }
        assert rejected() == before + 1
        assert not any(task.done() for task in queued)  # refused without waiting for a place
        model.release.set()
        results: list[Result] = await asyncio.gather(running, *queued)
        assert [float(r.logits[0]) for r in results] == [1, 2, 3]
        assert model.batches == [[1], [2, 3]]

    run(model, inprocess.policy(max_batch_size=8, max_queue_delay_ms=0, max_queue_size=2), executor, scenario)


def rejected(reason: str = "queue") -> float:
    from prometheus_client import generate_latest

    from service.obs.metrics import METRICS

    return metric(
        generate_latest(METRICS.registry).decode(), "vitserve_rejected_total", model="scripted", reason=reason
    )


# --- adaptive admission -------------------------------------------------------------------------------------------


def test_service_times_average_what_ran_and_bound_what_did_not():
    times = ServiceTimes(weight=0.5)
    assert times.estimate(4) is None  # nothing ran: no estimate, and the admission admits
    times.observe(4, 0.010)
    times.observe(4, 0.020)
    assert times.estimate(4) == pytest.approx(0.015)  # a moving average, recent batches weighing `weight`
    assert times.estimate(2) == pytest.approx(0.015)  # smaller: no longer than the larger batch that ran
    assert times.estimate(8) == pytest.approx(0.030)  # larger: no more per image than the smaller one
    times.observe(16, 0.040)
    assert times.estimate(8) == pytest.approx(0.040)  # now bounded by the nearest larger size instead


def test_service_times_keep_how_far_batches_stray_and_the_cautious_time_adds_twice_that():
    times = ServiceTimes(weight=0.5)
    assert times.cautious(4) is None
    times.observe(4, 0.010)
    assert times.cautious(4) == pytest.approx(0.010)  # one batch: no spread seen yet
    times.observe(4, 0.020)  # 10 ms from the average of 10: the deviation moves halfway there
    assert times.estimate(4) == pytest.approx(0.015) and times.cautious(4) == pytest.approx(0.015 + 2 * 0.005)
    times.observe(4, 0.015)  # on the average: the deviation halves
    assert times.cautious(4) == pytest.approx(0.015 + 2 * 0.0025)
    assert times.cautious(8) == pytest.approx(2 * (0.015 + 2 * 0.0025))  # a size not run: scaled, as the average


def measured() -> ServiceTimes:
    times = ServiceTimes()
    times.observe(1, 0.004)
    times.observe(4, 0.010)
    return times


def test_the_predicted_answer_is_the_running_batch_then_a_full_batch_per_round_ahead_then_its_own_batch():
    times = measured()
    assert predicted_answer(ServiceTimes(), 4, queued=100, count=1, running_rest=1.0) is None
    assert predicted_answer(times, 4, queued=0, count=1, running_rest=0.003) == pytest.approx(0.003 + 0.004)
    # joins the next batch as its fourth image: that batch, of 4
    assert predicted_answer(times, 4, queued=3, count=1, running_rest=0.003) == pytest.approx(0.003 + 0.010)
    # the next batch is full: that one, then its own, alone
    assert predicted_answer(times, 4, queued=4, count=1, running_rest=0.003) == pytest.approx(0.003 + 0.010 + 0.004)
    # nine images on an idle model: two full batches of its own, then its last image
    assert predicted_answer(times, 4, queued=0, count=9, running_rest=0.0) == pytest.approx(0.010 * 2 + 0.004)
    assert predicted_answer(times, 4, queued=0, count=1, running_rest=-0.5) == pytest.approx(0.004)  # running late
    assert own_time(times, 4, 9) == pytest.approx(0.024) and own_time(times, 4, 4) == pytest.approx(0.010)


def test_with_instances_a_round_of_batches_runs_side_by_side():
    times = measured()
    # two instances: 8 queued images are one full batch ahead on each, not two on one
    assert predicted_answer(times, 4, queued=8, count=1, running_rest=0.003, instances=2) == pytest.approx(0.017)
    assert predicted_answer(times, 4, queued=7, count=1, running_rest=0.0, instances=2) == pytest.approx(0.010)


def test_each_instance_runs_its_own_batch_at_the_same_time():
    """Two instances: two batches are inside `infer` at once (a barrier that only two concurrent calls pass;
    with one runner the first would wait at it alone until the barrier's timeout broke it)."""
    model = Scripted()
    model.instances = 2
    both_inside = threading.Barrier(2, timeout=30)
    plain = model.infer

    def infer(pixels: np.ndarray, *, with_attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
        both_inside.wait()
        return plain(pixels, with_attention=with_attention)

    model.infer = infer  # type: ignore[method-assign]

    async def scenario(batcher: DynamicBatcher) -> None:
        results = await asyncio.gather(*(batcher.submit(image(v), with_attention=False) for v in (1, 2)))
        assert [float(r.logits[0]) for r in results] == [1, 2]
        assert sorted(model.batches) == [[1], [2]]

    async def main() -> None:
        batcher = DynamicBatcher(model, inprocess.policy(max_batch_size=1, max_queue_delay_ms=0))  # type: ignore[arg-type]
        try:
            await scenario(batcher)
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_instances_take_turns_to_collect_so_requests_that_arrive_together_share_a_batch():
    """One runner fills a batch while the other waits its turn: two requests within the queue delay form one
    batch of two, not two batches of one (each idle runner taking one)."""
    model = Scripted()
    model.instances = 2

    async def main() -> None:
        batcher = DynamicBatcher(model, inprocess.policy(max_batch_size=2, max_queue_delay_ms=60_000))  # type: ignore[arg-type]
        try:
            first = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
            await until_taken(batcher)
            second = asyncio.ensure_future(batcher.submit(image(2), with_attention=False))
            results = await asyncio.gather(first, second)
            assert [r.batch_size for r in results] == [2, 2]
            assert model.batches == [[1, 2]]
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_the_real_model_with_two_instances_answers_as_with_one():
    one = inprocess.load()
    two = load_model(DEFAULT_MODEL, providers=[CPU], threads=1, cpu_rewrites=True, instances=2)
    assert (one.instances, two.instances) == (1, 2)
    assert two.spares[0][0] is not two.classify  # a session of its own
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(4, 3, *one.meta.input_size)).astype(np.float32)
    want, _ = one.infer(pixels, with_attention=False)
    with ThreadPoolExecutor(max_workers=4) as pool:  # more callers than instances: they wait for a free one
        answers = list(pool.map(lambda _: two.infer(pixels, with_attention=False)[0], range(8)))
    for got in answers:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "instances, threads, providers, weights, cpus, layout",
    [
        (0, 0, [CPU], 600_000, 2, (2, 1)),  # a small model on CPUs: one single-threaded session per CPU
        (0, 0, [CPU], 600_000, 16, (16, 1)),
        (0, 0, [CPU], 330 * 2**20, 16, (1, 0)),  # ViT-B/16: one session, onnxruntime's threads
        (0, 0, [CUDA, CPU], 600_000, 16, (2, 8)),  # a GPU: one batch computes while the next is copied in
        (4, 0, [CPU], 330 * 2**20, 16, (4, 4)),  # asked for: the CPUs shared out
        (3, 2, [CPU], 600_000, 2, (3, 2)),  # both asked for: as asked
        (1, 0, [CPU], 600_000, 2, (1, 0)),
    ],
)
def test_session_layout(instances, threads, providers, weights, cpus, layout):
    assert session_layout(instances, threads, providers=providers, weight_bytes=weights, cpus=cpus) == layout


SLOW = 60.0  # synthetic seconds per batch: while a batch is held, its predicted end is always far ahead


def budget(seconds: float, **policy: Any) -> BatchPolicy:
    return inprocess.policy(latency_budget_ms=seconds * 1e3, **policy)


def test_adaptive_admission_refuses_at_once_what_would_be_answered_past_its_latency_budget(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        batcher.times.observe(2, SLOW)  # as if batches of 2 had taken a minute
        running = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)  # predicted to run for about a minute more
        # The next batch (2 places) is admitted: each is answered after the running batch and its own, in about
        # two minutes, within the budget of two and a half.
        queued = [asyncio.ensure_future(batcher.submit(image(v), with_attention=False)) for v in (2, 3)]
        await until_queued(batcher, 2)
        before = rejected("budget")
        with pytest.raises(Overloaded) as caught:  # a full batch ahead of it as well: about three minutes
            await batcher.submit(image(4), with_attention=False)
        refusal = caught.value
        assert refusal.status == 503 and refusal.headers == {"Retry-After": "1"}
        assert refusal.detail["queued"] == 2 and refusal.detail["budget_ms"] == 2.5 * SLOW * 1e3
        assert refusal.detail["predicted_ms"] == pytest.approx(3 * SLOW * 1e3, rel=0.01)
        assert "latency budget of 150000 ms" in refusal.message and "VITSERVE_LATENCY_BUDGET_MS" in refusal.message
        assert rejected("budget") == before + 1
        assert batcher.queue.qsize() == 2  # refused before anything was queued, with places free
        model.release.set()
        results: list[Result] = await asyncio.gather(running, *queued)
        assert [float(r.logits[0]) for r in results] == [1, 2, 3]
        assert model.batches == [[1], [2, 3]]

    policy = budget(2.5 * SLOW, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=8)
    run(model, policy, executor, scenario)


def test_a_budget_shorter_than_a_batch_still_admits_what_would_start_within_one_batch(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        batcher.times.observe(2, SLOW)
        assert batcher.within_a_batch() == 2 * SLOW  # one batch's wait, then its own
        assert batcher.within_a_batch(5) == 4 * SLOW  # more images than a batch holds: its own three batches
        running = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)
        queued = [asyncio.ensure_future(batcher.submit(image(v), with_attention=False)) for v in (2, 3)]
        await until_queued(batcher, 2)
        with pytest.raises(Overloaded):  # a whole batch queued ahead of it as well
            batcher.check_room(1)
        model.release.set()
        assert len(await asyncio.gather(running, *queued)) == 3

    run(model, budget(0.001, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=8), executor, scenario)


def test_adaptive_admission_takes_a_request_of_many_images_whole_when_the_queue_is_short(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        batcher.times.observe(2, SLOW)
        running = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)
        # Five images span three batches, but the request waits only for the running one to start: its own
        # size is its own latency, which it would have unloaded too. All five are queued, none refused.
        many = asyncio.ensure_future(batcher.submit_many([image(v) for v in range(2, 7)], with_attention=False))
        await until_queued(batcher, 5)
        with pytest.raises(Overloaded):  # behind it, a newcomer would wait for three more full batches
            batcher.check_room(1)
        batcher.policy = budget(10 * SLOW, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=16)
        batcher.check_room(6)  # within a longer budget, even a request as large
        model.release.set()
        await running
        assert [float(r.logits[0]) for r in await many] == [2, 3, 4, 5, 6]

    run(model, budget(0.001, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=16), executor, scenario)


def test_the_time_a_request_already_spent_in_the_server_counts_against_its_budget(executor):
    model = Scripted()
    model.release.clear()
    clock = SimpleNamespace(now=0.0)
    front_door = AdaptiveAdmission(16, budget=1.0, tolerance=1.5, clock=lambda: clock.now)

    async def scenario(batcher: DynamicBatcher) -> None:
        batcher.times.observe(2, SLOW)
        running = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)
        queued = [asyncio.ensure_future(batcher.submit(image(v), with_attention=False)) for v in (2, 3)]
        await until_queued(batcher, 2)
        assert front_door.enter("/v1/classify") is None  # this task's request, admitted at the front door
        batcher.check_room(1)  # answered in about three minutes, within the budget of four
        clock.now += 2 * SLOW  # two minutes spent decoding, say
        with pytest.raises(Overloaded) as caught:
            batcher.check_room(1)
        assert caught.value.detail["predicted_ms"] == pytest.approx(5 * SLOW * 1e3, rel=0.01)
        front_door.leave()
        model.release.set()
        assert len(await asyncio.gather(running, *queued)) == 3

    run(model, budget(4 * SLOW, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=8), executor, scenario)


def test_queue_admission_admits_until_the_queue_is_full(executor):
    model = Scripted()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher) -> None:
        batcher.times.observe(2, SLOW)
        running = asyncio.ensure_future(batcher.submit(image(1), with_attention=False))
        await until_running(model)
        queued = [asyncio.ensure_future(batcher.submit(image(v), with_attention=False)) for v in (2, 3, 4, 5)]
        await until_queued(batcher, 4)  # two full batches ahead of the last: adaptive would have refused it
        model.release.set()
        assert len(await asyncio.gather(running, *queued)) == 5

    policy = budget(0.001, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=8, admission="queue")
    run(model, policy, executor, scenario)


def test_the_queue_delay_is_part_of_the_floor_and_batches_feed_the_service_times(executor):
    model = Scripted()

    async def scenario(batcher: DynamicBatcher) -> None:
        assert batcher.within_a_batch() is None and batcher.predict(0) is None  # nothing ran yet
        await asyncio.gather(*(batcher.submit(image(v), with_attention=False) for v in (1, 2)))
        assert set(batcher.times.seconds) == {2}  # one batch of two ran, and was timed
        assert batcher.within_a_batch() == pytest.approx(2 * batcher.times.seconds[2] + 0.050)

    run(model, inprocess.policy(max_batch_size=2, max_queue_delay_ms=50), executor, scenario)
