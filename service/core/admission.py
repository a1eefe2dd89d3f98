"""The front door's guard against overload (`VITSERVE_ADMISSION=adaptive`, the default): a limit on inference
requests in progress that follows their latency, with the latency budget as its floor.

A request is refused for latency only when the server predicts it cannot be answered within its latency budget
(`VITSERVE_LATENCY_BUDGET_MS`, or the model's `serving.json`), from its complete body to its answer. Most of that
prediction is the batcher's (`service.core.batching`: the queue ahead, each batch size's measured service time, the
model's instances), which sees every request of a model. This limit is for what the batcher cannot see: when
reading, decoding and answering are what saturates (a small model on few cores), requests wait for the event loop,
not in the queue, and only fewer requests in progress shortens that wait.

A latency-gradient limit in the manner of Netflix's concurrency-limits and Envoy's adaptive concurrency filter,
steering the time in the server to a target, not to a multiple of the unloaded time: each answered request's
time in the server is compared with its target, the longer of its latency budget (noted by the batcher it went
through, `note_budget`; else the server's) and `VITSERVE_ADMISSION_TOLERANCE` times its route's unloaded time (a
moving average of the requests admitted with no other in progress, lowered by any that was faster: only a route
whose unloaded time is near the budget, an attention map of many images on a slow model, gets a target above the
budget). When the recent ratio (a moving average) stays above 1 through a busy period longer than one round of
`limit` answers, the limit shrinks in proportion to the excess (Little's law: to the requests in progress over the
ratio at once, then by that factor per round); while it is within 1, the limit grows by one per round (only while
it is what holds requests back). A burst that drains within one round (the server then idle for longer than an
answer takes) is let in whole: like CoDel, the limit acts on a standing queue, not one that comes and goes. So a
closed loop of clients, whose queue is bounded by their number, is never refused while its answers come within
the budget. The limit starts at `VITSERVE_MAX_CONCURRENT_REQUESTS`, which stays the hard cap.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable

from service.errors import Overloaded
from service.obs.metrics import METRICS

SMOOTHING = 0.1  # weight of each answer in the moving averages (the recent ratio, each route's unloaded time)
MAX_ROUTES = 256  # unloaded times kept; requests to further paths share one (any path a client sends is a key)


class _Admitted:
    """One admitted request, as its task sees it: where it went, when it was admitted (by `clock`), whether it was
    alone (no other in progress then), and its latency budget once the batcher of its model noted it (seconds)."""

    __slots__ = ("alone", "budget", "clock", "route", "started")

    def __init__(self, route: str, clock: Callable[[], float], started: float, alone: bool) -> None:
        self.route = route
        self.clock = clock
        self.started = started
        self.alone = alone
        self.budget: float | None = None


# The request this task admitted: enter() and leave() run in the same task, whoever calls them. A record, not a
# value: a budget noted in a copy of the context (a task the request's handler started) still reaches leave().
_ADMITTED: contextvars.ContextVar[_Admitted | None] = contextvars.ContextVar("admitted", default=None)


def time_in_server() -> float:
    """Seconds since the front door admitted the request of this task; 0 where none did (the engine process of
    multi-process mode, `VITSERVE_ADMISSION=queue`, a test calling the batcher directly)."""
    admitted = _ADMITTED.get()
    return 0.0 if admitted is None else admitted.clock() - admitted.started


def note_budget(seconds: float) -> None:
    """The latency budget of the model serving this task's request: what its time in the server is judged by."""
    admitted = _ADMITTED.get()
    if admitted is not None:
        admitted.budget = seconds


class Admission:
    """At most `limit` inference requests in progress (from a complete body to the answer); one more is refused
    at once with 503 + Retry-After instead of queueing without bound. One per server process, taken through the
    gate (service.http.gate) by every transport; one event loop, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0

    def enter(self, route: str = "") -> Overloaded | None:
        """Admit the request (then `leave()` when it is answered), or the error to answer with. `route`: its path,
        for `service.core.admission.AdaptiveAdmission`, which keeps each route's latency."""
        if self.in_progress >= self.limit:
            METRICS.refused.labels(reason="concurrency").inc()
            return Overloaded(
                f"the server has {self.limit} inference requests in progress "
                "(VITSERVE_MAX_CONCURRENT_REQUESTS); retry shortly",
                detail={"limit": self.limit},
            )
        self.in_progress += 1
        return None

    def leave(self) -> None:
        self.in_progress -= 1


class AdaptiveAdmission(Admission):
    """`Admission` whose limit follows the latency of the requests it admitted against their latency budget, up to
    the fixed `cap`. `budget`: seconds, for requests whose model noted none."""

    def __init__(
        self, cap: int, *, budget: float, tolerance: float, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        super().__init__(cap)
        self.budget = budget
        self.tolerance = tolerance
        self.clock = clock
        self.adaptive_limit = float(cap)
        self.busy_answers = 0  # answers since the server was last idle (none in progress for longer than one takes)
        self.recent = 0.0  # smoothed time in the server of recent answers, seconds
        self._idle_since: float | None = None  # when the last request in progress was answered
        self.ratio = 0.0  # recent (smoothed) time in the server / its target
        self.unloaded: dict[str, float] = {}  # seconds, by route
        self._refused = METRICS.refused.labels(reason="adaptive")

    def enter(self, route: str = "") -> Overloaded | None:
        if self.in_progress >= self.limit:
            return super().enter(route)  # the hard cap, counted and worded as before
        if self.in_progress >= int(self.adaptive_limit):
            self._refused.inc()
            return Overloaded(
                f"the server is at its adaptive limit of {int(self.adaptive_limit)} inference requests in progress: "
                "answers are taking longer than their latency budget (VITSERVE_LATENCY_BUDGET_MS); retry shortly",
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
        _ADMITTED.set(_Admitted(route.partition("?")[0], self.clock, now, self.in_progress == 0))
        self.in_progress += 1
        return None

    def leave(self) -> None:
        admitted = _ADMITTED.get()
        if admitted is not None:
            _ADMITTED.set(None)
            self.observe(
                admitted.route,
                admitted.started,
                alone=admitted.alone,
                busy=self.in_progress >= self.adaptive_limit / 2,
                budget=self.budget if admitted.budget is None else admitted.budget,
            )
        self.in_progress -= 1
        if not self.in_progress:
            self._idle_since = self.clock()

    def observe(self, route: str, started: float, *, alone: bool, busy: bool, budget: float | None = None) -> None:
        """One answered request of `route`, admitted at `started`; `alone`: none other was in progress then;
        `busy`: the limit was what held requests back (more than half of it in use), so an answer within its
        target is evidence that it may grow; `budget`: its latency budget, seconds (default: the server's)."""
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
        target = max(self.budget if budget is None else budget, self.tolerance * unloaded)
        self.ratio += SMOOTHING * (seconds / target - self.ratio)
        limit = self.adaptive_limit
        if self.ratio > 1.0:
            if self.busy_answers > limit:  # a standing excess, not a burst that drains within one round
                # What Little's law says brings the time in the server back to its target at the same throughput:
                # the requests in progress now, over the ratio. At once if the limit is far above that (it had not
                # been reached), else by that factor over one round of answers.
                scale = 1.0 / self.ratio
                limit = min(limit * scale ** (1 / limit), max(1.0, self.in_progress * scale))
        elif busy:
            limit += 1 / limit  # one more per round
        self.adaptive_limit = min(max(limit, 1.0), float(self.limit))
