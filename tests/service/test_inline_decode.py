"""Tiny images are decoded on the event loop, everything else in the CPU pool (ServiceState.prepare): shown by
holding every pool thread at a gate, so that only an inline decode can finish while it is closed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
from PIL import Image

from service.core.pipeline import prepare
from service.core.state import INLINE_IMAGE_PIXELS, ServiceState
from service.errors import Overloaded
from tests.service import inprocess
from tests.service.conftest import encode


def png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    return encode(Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)))


@asynccontextmanager
async def held_pool() -> AsyncIterator[tuple[ServiceState, threading.Event]]:
    """A served app's state with every CPU-pool thread waiting at a gate (opened on the way out)."""
    application = inprocess.app(inprocess.repository())
    async with inprocess.serve(application):
        state: ServiceState = application.state.vitserve
        gate = threading.Event()
        started = threading.Semaphore(0)

        def hold() -> None:
            started.release()
            gate.wait(30)

        threads = state.cpu_pool._max_workers
        for _ in range(threads):
            state.cpu_pool.submit(hold)
        for _ in range(threads):  # every thread is at the gate, none is free for a decode
            assert started.acquire(timeout=30)
        try:
            yield state, gate
        finally:
            gate.set()


def test_a_tiny_image_is_decoded_on_the_loop_a_larger_one_in_the_pool():
    small, large = png(32), png(int(INLINE_IMAGE_PIXELS**0.5) + 1)

    async def main() -> None:
        async with held_pool() as (state, gate):
            meta = state.model(None).meta
            done = await asyncio.wait_for(state.prepare(small, meta), 30)  # finishes with the pool held
            want = prepare(small, meta, max_pixels=state.settings.max_pixels)
            np.testing.assert_array_equal(done.pixels, want.pixels)
            waiting = asyncio.ensure_future(state.prepare(large, meta))
            for _ in range(100):  # a decode on the loop would have finished within one of these turns
                await asyncio.sleep(0)
            assert not waiting.done(), "a larger image must wait for a pool thread"
            gate.set()
            assert (await asyncio.wait_for(waiting, 30)).pixels.shape == want.pixels.shape

    asyncio.run(main())


@pytest.mark.parametrize("release", [True, False])
def test_a_full_decode_budget_sends_a_tiny_image_to_the_pool_not_a_blocked_loop(release: bool):
    """The loop never waits for budget: with none free, the tiny image goes to the pool, which waits up to its
    second for room (here given back by the loop itself, which a blocked loop could not do) or answers 503."""

    async def main() -> None:
        application = inprocess.app(inprocess.repository())
        async with inprocess.serve(application):
            state: ServiceState = application.state.vitserve
            budget = state.limits.decode
            assert budget is not None
            held = budget.reserve_now(budget.limit)
            assert held == budget.limit
            task = asyncio.ensure_future(state.prepare(png(32), state.model(None).meta))
            await asyncio.sleep(0)
            assert not task.done()
            if release:
                budget.release(held)
                assert (await asyncio.wait_for(task, 30)).pixels.shape[0] == 3
            else:
                with pytest.raises(Overloaded):
                    await asyncio.wait_for(task, 30)
                budget.release(held)

    asyncio.run(main())
