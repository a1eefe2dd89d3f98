"""The memory budget: how many bytes of request bodies and decoded images may be in flight at once.

A request's memory is mostly its body (up to `VITSERVE_MAX_BODY_BYTES`) and its decoded image (pixels times
bytes per pixel of the file's mode, plus the RGB copy). Each is reserved from a server-wide `ByteBudget`
before it is allocated and given back when it is freed; a request that does not fit waits up to
`BUDGET_WAIT_S` for others to finish, then gets 503 + Retry-After, never an out-of-memory kill. Peak memory is
then bounded by the formula in README's Reliability section:
`baseline + VITSERVE_BODY_BUDGET_BYTES + VITSERVE_DECODE_BUDGET_BYTES`.

`tune_allocator` makes glibc give freed large buffers back to the system: by default its mmap threshold grows
to the largest block freed (up to 32 MiB), after which 20 MB bodies come from the heap and their pages stay
with the process after a burst. Bodies still arrive in chunks of up to 256 KiB, which come from the heap; once a
budget that held `TRIM_AFTER_BYTES` or more at once is empty again, `malloc_trim` hands the free pages those
chunks left behind back (measured: 100 MiB kept after a burst of 20 MB bodies without it, tests/service/
test_memory.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import threading
import time

from service.errors import Overloaded
from service.obs.metrics import METRICS

log = logging.getLogger("vitserve.memory")

BUDGET_WAIT_S = 1.0  # a request that does not fit waits this long for memory before its 503
TRIM_AFTER_BYTES = 64 * 2**20  # a budget that held this much at once trims the heap when it is next empty

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class ByteBudget:
    """Bytes reserved against a limit, shared by the event loop and worker threads.

    A reservation larger than the whole budget is cut to the budget: such a request runs alone rather than
    never. `reserve` blocks (use it in worker threads); `reserve_async` waits without blocking the loop.
    """

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.used = 0
        self.high = 0  # the most held at once since the heap was last trimmed
        self._changed = threading.Condition()
        # When the first refusal since the last reservation that succeeded came (monotonic), or None: a budget
        # that only refuses for long is stuck, and readiness says so (ServiceState.readiness).
        self.refusing_since: float | None = None
        self._gauge = METRICS.budget_used.labels(budget=name)
        METRICS.budget_limit.labels(budget=name).set(limit)

    def _fits(self, size: int) -> bool:
        return self.used + size <= self.limit

    def _take(self, size: int) -> None:
        self.refusing_since = None
        self.used += size
        self.high = max(self.high, self.used)
        self._gauge.set(self.used)

    def reserve(self, size: int, wait_s: float = BUDGET_WAIT_S) -> int | None:
        """Reserve `size` bytes (cut to the limit) within `wait_s`; the amount reserved, or None."""
        size = min(size, self.limit)
        with self._changed:
            if not self._changed.wait_for(lambda: self._fits(size), timeout=wait_s):
                self._refused()
                return None
            self._take(size)
        return size

    def reserve_now(self, size: int) -> int | None:
        """Reserve `size` bytes if they fit now (no wait, not counted as a refusal: the caller has another way)."""
        with self._changed:
            if size > self.limit or not self._fits(size):
                return None
            self._take(size)
        return size

    async def reserve_async(self, size: int, wait_s: float = BUDGET_WAIT_S) -> int | None:
        size = min(size, self.limit)
        deadline = time.monotonic() + wait_s
        delay = 0.001
        while True:
            with self._changed:
                if self._fits(size):
                    self._take(size)
                    return size
            if time.monotonic() >= deadline:
                self._refused()
                return None
            await asyncio.sleep(delay)  # poll: a release from a worker thread cannot wake the loop cheaply
            delay = min(delay * 2, 0.05)

    def _refused(self) -> None:
        METRICS.budget_refused.labels(budget=self.name).inc()
        if self.refusing_since is None:
            self.refusing_since = time.monotonic()

    def stalled_s(self) -> float:
        """How long every reservation has been refused (0 while the last one since a refusal succeeded)."""
        since = self.refusing_since
        return 0.0 if since is None else time.monotonic() - since

    def release(self, size: int) -> None:
        with self._changed:
            self.used -= size
            self._gauge.set(self.used)
            self._changed.notify_all()
            burst_over = self.used == 0 and self.high >= TRIM_AFTER_BYTES
            if burst_over:
                self.high = 0
        if burst_over:
            trim_heap()


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing). A few ms after a burst."""
    with contextlib.suppress(AttributeError):  # not glibc, or no libc found
        _LIBC.malloc_trim(0)  # type: ignore[union-attr]


MMAP_THRESHOLD = 1 << 20  # allocations this large come from mmap (tune_allocator): fresh pages, a fault each


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> None:
    """Serve allocations of `mmap_threshold` bytes and more from mmap, so freeing them returns the memory."""
    try:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)  # type: ignore[union-attr]  # fixing it stops glibc raising it
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold)  # type: ignore[union-attr]
    except (AttributeError, TypeError):  # not glibc (musl, macOS): its allocator behaves otherwise
        log.debug("mallopt is not available; the allocator keeps its defaults")


class Reservation:
    """The bytes one request holds from a budget; given back when the `with` block ends."""

    def __init__(self, budget: ByteBudget | None, *, wait: bool = True) -> None:
        """`wait`: up to BUDGET_WAIT_S for room (a worker thread); False: only what fits now (the event loop)."""
        self.budget = budget
        self.wait = wait
        self.size = 0

    def take(self, size: int, what: str) -> None:
        """Reserve `size` more bytes for `what`, or raise Overloaded (503) when the budget stays full."""
        if self.budget is None:
            return
        got = self.budget.reserve(size) if self.wait else self.budget.reserve_now(size)
        if got is None:
            raise Overloaded(
                f"the server is decoding or holding too many large requests to take {what} now; retry shortly",
                detail={"budget": self.budget.name, "bytes": size},
            )
        self.size += got

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.budget is not None and self.size:
            self.budget.release(self.size)
            self.size = 0
