"""`AdaptiveAdmission`, the latency-gradient limit on inference requests in progress, driven by a controlled clock:
a burst is let in whole; a standing excess (a busy period of slow answers longer than a round) shrinks the limit
and the next request is refused at once; it grows again while answers stay within the tolerance of their route's
unloaded time, keeps each route's unloaded time apart, and never passes the fixed cap.

Each simulated request is admitted and answered in a context of its own, as each request is a task of its own in
the server (the limit remembers a request's start in a context variable).
"""

from __future__ import annotations

import contextvars

from prometheus_client import generate_latest

from service.admission import AdaptiveAdmission
from service.errors import Overloaded
from service.metrics import METRICS
from service.settings import Settings
from tests.conftest import metric

TOLERANCE = Settings.model_fields["admission_tolerance"].default


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(reason: str) -> float:
    return metric(generate_latest(METRICS.registry).decode(), "vitserve_http_refused_total", reason=reason)


def round_trip(
    admission: AdaptiveAdmission, clock: Clock, seconds: float, route: str = "/v1/classify", count: int = 10**6
) -> int:
    """Admit up to `count` requests at once (as many as the limit allows), answer them all `seconds` later; how
    many got in."""
    admitted = []
    while len(admitted) < count:
        context = contextvars.Context()
        if context.run(admission.enter, route) is not None:
            break
        admitted.append(context)
    clock.now += seconds
    for context in admitted:
        context.run(admission.leave)
    return len(admitted)


def held(admission: AdaptiveAdmission) -> contextvars.Context:
    """A request that stays in progress: the server is never idle, so what follows is one busy period."""
    context = contextvars.Context()
    assert context.run(admission.enter, "/v1/slow") is None
    return context


def test_a_burst_that_drains_is_let_in_whole_and_leaves_the_limit_as_it_was():
    clock = Clock()
    admission = AdaptiveAdmission(256, tolerance=TOLERANCE, clock=clock)
    round_trip(admission, clock, 0.010, count=1)  # the unloaded time
    for _ in range(8):  # bursts of 48 answered ten times slower, the server idle for a second between them
        assert round_trip(admission, clock, 0.100, count=48) == 48
        clock.now += 1.0
    assert admission.adaptive_limit == 256


def test_a_standing_excess_shrinks_the_limit_and_the_next_request_is_refused_at_once_with_503():
    clock = Clock()
    admission = AdaptiveAdmission(256, tolerance=TOLERANCE, clock=clock)
    round_trip(admission, clock, 0.010, count=1)
    busy = held(admission)
    for _ in range(40):  # one busy period: ten times the unloaded time, round after round
        round_trip(admission, clock, 0.100, count=32)
    assert admission.ratio > TOLERANCE and admission.adaptive_limit < 32
    limit = int(admission.adaptive_limit)
    admitted = [contextvars.Context() for _ in range(limit - 1)]  # with the held request: the limit
    assert all(context.run(admission.enter, "/v1/classify") is None for context in admitted)
    before = refused("adaptive")
    refusal = contextvars.Context().run(admission.enter, "/v1/classify")
    assert isinstance(refusal, Overloaded) and refusal.status == 503 and refusal.headers == {"Retry-After": "1"}
    assert refusal.detail == {"limit": limit} and f"adaptive limit of {limit}" in refusal.message
    assert refused("adaptive") == before + 1
    for context in [*admitted, busy]:
        context.run(admission.leave)
    assert admission.in_progress == 0


def test_it_grows_again_while_answers_take_their_unloaded_time():
    clock = Clock()
    admission = AdaptiveAdmission(256, tolerance=TOLERANCE, clock=clock)
    round_trip(admission, clock, 0.010, count=1)
    busy = held(admission)
    for _ in range(60):
        round_trip(admission, clock, 0.100)
    busy.run(admission.leave)
    low = admission.adaptive_limit
    assert low < 4
    for _ in range(60):
        round_trip(admission, clock, 0.010)  # as fast with the limit in use as alone: room to grow
    assert admission.adaptive_limit >= low + 5, (low, admission.adaptive_limit)


def test_each_route_is_judged_against_its_own_unloaded_time():
    clock = Clock()
    admission = AdaptiveAdmission(256, tolerance=TOLERANCE, clock=clock)
    busy = held(admission)
    for _ in range(40):  # a fast route and a slow one, each answering in its own unloaded time
        round_trip(admission, clock, 0.002, "/v1/classify", count=32)
        round_trip(admission, clock, 0.200, "/v1/models/big/attention", count=32)
    assert admission.ratio <= TOLERANCE and admission.adaptive_limit == 256
    busy.run(admission.leave)


def test_the_fixed_cap_stays_the_hard_cap():
    clock = Clock()
    admission = AdaptiveAdmission(3, tolerance=TOLERANCE, clock=clock)
    for _ in range(50):
        round_trip(admission, clock, 0.010)
    assert admission.adaptive_limit == 3
    held = [contextvars.Context() for _ in range(3)]
    assert all(context.run(admission.enter, "/v1/classify") is None for context in held)
    before = refused("concurrency")
    refusal = contextvars.Context().run(admission.enter, "/v1/classify")
    assert isinstance(refusal, Overloaded) and "VITSERVE_MAX_CONCURRENT_REQUESTS" in refusal.message
    assert refused("concurrency") == before + 1
