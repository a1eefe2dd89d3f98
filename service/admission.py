"""The adaptive limit on inference requests in progress (`VITSERVE_ADMISSION=adaptive`, the default).

A latency-gradient concurrency limit in the manner of Netflix's concurrency-limits and Envoy's adaptive concurrency
filter. Each admitted request's time in the server (from its complete body to its answer) is compared with its
route's unloaded time (per route, since a classify of one image and an attention map of thirty-two are not
comparable): a moving average of the requests admitted with no other in progress, lowered by any request that was
faster. When the recent ratio stays above the tolerance (`VITSERVE_ADMISSION_TOLERANCE`, 1.5) through a busy period
longer than one round of `limit` answers, the limit shrinks in proportion to the excess (Little's law: to the
requests in progress times tolerance / ratio at once, then by that factor per round); while the ratio is within it,
the limit grows by one per round (only while it is what holds requests back). So under sustained overload the
requests in progress settle where each takes about 1.5 times its unloaded time on average, whatever the model, the
machine or the number of cores, and a request beyond that is refused at once (503 + Retry-After) before any of its
work is done. The goal (issue 12) is on the tail: accepted requests' p99 within twice the unloaded p99. Steering
the average to twice let the tail run far past it: the default model at 4x its capacity (benchmarks/overload.py
--quick, 1.5 and 2.0 interleaved, two runs each) had 503s' p99 at 93-146 ms and accepted requests' at 780-911 ms
with 2.0, 10-12 ms and 28-29 ms with 1.5. A burst that drains within one round (the server then idle for longer
than an answer takes) is let in whole, as before: like CoDel, the limit acts on a standing queue, not on a queue
that comes and goes. The limit starts at `VITSERVE_MAX_CONCURRENT_REQUESTS`, which stays the hard cap; at one,
every request measures the unloaded time again (under the load of the moment: refusing costs the event loop too).

Why at the front door as well as in the batcher (`service.batching`): when decoding, parsing and answering are
what saturates (a small model on few cores), requests wait for the event loop, not in the batcher's queue, and
only fewer requests in progress shortens that wait. `VITSERVE_MAX_CONCURRENT_REQUESTS` stays the hard cap.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable

from service.errors import Overloaded
from service.metrics import METRICS
from service.middleware import Admission

SMOOTHING = 0.1  # weight of each answer in the moving averages (the recent ratio, each route's unloaded time)
MAX_ROUTES = 256  # unloaded times kept; requests to further paths share one (any path a client sends is a key)

# (route, start, alone) of the request this task admitted: enter() and leave() run in the same task, whoever calls
# them. `alone`: no other request was in progress when it was admitted.
_ADMITTED: contextvars.ContextVar[tuple[str, float, bool] | None] = contextvars.ContextVar("admitted", default=None)


class AdaptiveAdmission(Admission):
    """`Admission` whose limit follows the latency of the requests it admitted, up to the fixed `cap`."""

    def __init__(self, cap: int, *, tolerance: float, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(cap)
        self.tolerance = tolerance
        self.clock = clock
        self.adaptive_limit = float(cap)
        self.busy_answers = 0  # answers since the server was last idle (none in progress for longer than one takes)
        self.recent = 0.0  # smoothed time in the server of recent answers, seconds
        self._idle_since: float | None = None  # when the last request in progress was answered
        self.ratio = 1.0  # recent (smoothed) time in the server / the route's unloaded time
        self.unloaded: dict[str, float] = {}  # seconds, by route
        self._refused = METRICS.refused.labels(reason="adaptive")

    def enter(self, route: str = "") -> Overloaded | None:
        if self.in_progress >= self.limit:
            return super().enter(route)  # the hard cap, counted and worded as before
        if self.in_progress >= int(self.adaptive_limit):
            self._refused.inc()
            return Overloaded(
                f"the server is at its adaptive limit of {int(self.adaptive_limit)} inference requests in progress "
                "(requests beyond it would wait; VITSERVE_ADMISSION); retry shortly",
                detail={"limit": int(self.adaptive_limit)},
                headers={"Retry-After": "1"},
            )
        now = self.clock()
        if self._idle_since is not None:
            # Idle for longer than an answer takes: a new busy period. A shorter gap, between requests of a
            # steady overload, is not: the excess it follows is still standing.
            if now - self._idle_since > self.recent:
                self.busy_answers = 0
            self._idle_since = None
        _ADMITTED.set((route.partition("?")[0], now, self.in_progress == 0))
        self.in_progress += 1
        return None

    def leave(self) -> None:
        admitted = _ADMITTED.get()
        if admitted is not None:
            _ADMITTED.set(None)
            route, started, alone = admitted
            self.observe(route, started, alone=alone, busy=self.in_progress >= self.adaptive_limit / 2)
        self.in_progress -= 1
        if not self.in_progress:
            self._idle_since = self.clock()

    def observe(self, route: str, started: float, *, alone: bool, busy: bool) -> None:
        """One answered request of `route`, admitted at `started`; `alone`: none other was in progress then;
        `busy`: the limit was what held requests back (more than half of it in use), so an answer within the
        tolerance is evidence that it may grow."""
        seconds = self.clock() - started
        self.recent += SMOOTHING * (seconds - self.recent)
        self.busy_answers += 1
        if route not in self.unloaded and len(self.unloaded) >= MAX_ROUTES:
            route = ""
        unloaded = self.unloaded.get(route)
        if unloaded is None:  # a route's first answer is its first measure of the unloaded time, alone or not
            unloaded = self.unloaded[route] = seconds
        elif alone or seconds < unloaded:  # a faster answer shows the unloaded time is at most that
            unloaded = self.unloaded[route] = unloaded + SMOOTHING * (seconds - unloaded)
        ratio = seconds / unloaded if unloaded > 0 else 1.0
        self.ratio += SMOOTHING * (ratio - self.ratio)
        limit = self.adaptive_limit
        if self.ratio > self.tolerance:
            if self.busy_answers > limit:  # a standing excess, not a burst that drains within one round
                # What Little's law says brings the time in the server back to tolerance x unloaded at the same
                # throughput: the requests in progress now, scaled by tolerance / ratio. At once if the limit is
                # far above that (it had not been reached), else by that factor over one round of answers.
                scale = self.tolerance / self.ratio
                limit = min(limit * scale ** (1 / limit), max(1.0, self.in_progress * scale))
        elif busy:
            limit += 1 / limit  # one more per round
        self.adaptive_limit = min(max(limit, 1.0), float(self.limit))
