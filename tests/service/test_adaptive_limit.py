"""`AdaptiveAdmission`, the latency-gradient limit on inference requests in progress, driven by a controlled clock:
it starts at one, grows while answers stay within twice their route's unloaded time, shrinks when they do not,
keeps each route's unloaded time apart, and never passes the fixed cap.

Each simulated request is admitted and answered in a context of its own, as each request is a task of its own in
the server (the limit remembers a request's start in a context variable).
"""

from __future__ import annotations

import contextvars

from prometheus_client import generate_latest

from service.admission import TOLERANCE, AdaptiveAdmission
from service.errors import Overloaded
from service.metrics import METRICS
from tests.conftest import metric


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(reason: str) -> float:
    return metric(generate_latest(METRICS.registry).decode(), "vitserve_http_refused_total", reason=reason)


def round_trip(admission: AdaptiveAdmission, clock: Clock, seconds: float, route: str = "/v1/classify") -> int:
    """Admit as many requests as the limit allows at once, answer them all `seconds` later; how many got in."""
    admitted = []
    while True:
        context = contextvars.Context()
        if context.run(admission.enter, route) is not None:
            break
        admitted.append(context)
    clock.now += seconds
    for context in admitted:
        context.run(admission.leave)
    return len(admitted)


def test_it_starts_at_one_and_refuses_the_next_at_once_with_503():
    admission = AdaptiveAdmission(256, clock=Clock())
    first = contextvars.Context()
    assert first.run(admission.enter, "/v1/classify") is None
    before = refused("adaptive")
    refusal = contextvars.Context().run(admission.enter, "/v1/classify")
    assert isinstance(refusal, Overloaded) and refusal.status == 503 and refusal.headers == {"Retry-After": "1"}
    assert refusal.detail == {"limit": 1} and "adaptive limit of 1" in refusal.message
    assert refused("adaptive") == before + 1
    first.run(admission.leave)
    assert admission.in_progress == 0
    assert contextvars.Context().run(admission.enter, "/v1/classify") is None


def test_it_grows_while_answers_take_their_unloaded_time_and_shrinks_when_they_take_longer():
    clock = Clock()
    admission = AdaptiveAdmission(256, clock=clock)
    for _ in range(60):
        round_trip(admission, clock, 0.010)  # as fast with many in progress as alone: room to grow
    grown = round_trip(admission, clock, 0.010)
    assert grown >= 8, admission.adaptive_limit
    for _ in range(5):
        round_trip(admission, clock, 0.010 * 10)  # ten times the unloaded time: requests wait for each other
    assert admission.ratio > TOLERANCE and admission.adaptive_limit < grown / 2
    # Down at one, every request is alone: the slower time becomes the unloaded one, and the limit grows again.
    for _ in range(60):
        round_trip(admission, clock, 0.010 * 10)
    assert admission.unloaded["/v1/classify"] > 0.09 and admission.adaptive_limit > 2


def test_each_route_is_judged_against_its_own_unloaded_time():
    clock = Clock()
    admission = AdaptiveAdmission(256, clock=clock)
    for _ in range(40):  # a fast route and a slow one, each answering in its own unloaded time
        round_trip(admission, clock, 0.002, "/v1/classify")
        round_trip(admission, clock, 0.200, "/v1/models/big/attention")
    assert admission.ratio <= TOLERANCE
    assert admission.adaptive_limit >= 4


def test_the_fixed_cap_stays_the_hard_cap():
    clock = Clock()
    admission = AdaptiveAdmission(3, clock=clock)
    for _ in range(50):
        round_trip(admission, clock, 0.010)
    assert admission.adaptive_limit == 3
    held = [contextvars.Context() for _ in range(3)]
    assert all(context.run(admission.enter, "/v1/classify") is None for context in held)
    before = refused("concurrency")
    refusal = contextvars.Context().run(admission.enter, "/v1/classify")
    assert isinstance(refusal, Overloaded) and "VITSERVE_MAX_CONCURRENT_REQUESTS" in refusal.message
    assert refused("concurrency") == before + 1
