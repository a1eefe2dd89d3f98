"""`AdaptiveAdmission`, the latency-gradient limit on inference requests in progress, driven by a controlled clock.

Its floor is the latency budget: answers that queue far beyond their unloaded time but come within the budget
(a closed loop of clients) never shrink it; a burst is let in whole; a standing excess past the budget shrinks it
and the next request is refused at once; it grows again while answers come within the budget; a model's own
budget (noted by its batcher) is what its requests are judged by; a route whose unloaded time is near the budget
is judged against a multiple of that instead; and the fixed cap stays the hard cap.

Each simulated request is admitted and answered in a context of its own, as each request is a task of its own in
the server (the limit remembers a request's start in a context variable).
"""

from __future__ import annotations

import contextvars

from prometheus_client import generate_latest

from service.core.admission import AdaptiveAdmission, note_budget, time_in_server
from service.errors import Overloaded
from service.obs.metrics import METRICS
from service.settings import Settings
from tests.conftest import metric

TOLERANCE = Settings.model_fields["admission_tolerance"].default
BUDGET = 0.050  # seconds: the tests' latency budget, 25x the unloaded time below
UNLOADED = 0.002


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(reason: str) -> float:
    return metric(generate_latest(METRICS.registry).decode(), "vitserve_http_refused_total", reason=reason)


def admission(cap: int = 256, budget: float = BUDGET) -> tuple[AdaptiveAdmission, Clock]:
    clock = Clock()
    return AdaptiveAdmission(cap, budget=budget, tolerance=TOLERANCE, clock=clock), clock


def round_trip(
    admission: AdaptiveAdmission,
    clock: Clock,
    seconds: float,
    route: str = "/v1/classify",
    count: int = 10**6,
    budget: float | None = None,
) -> int:
    """Admit up to `count` requests at once (as many as the limit allows), answer them all `seconds` later; how
    many got in. `budget`: what each request's model notes as its budget (as `ServiceState` does)."""
    admitted = []
    while len(admitted) < count:
        context = contextvars.Context()
        if context.run(admission.enter, route) is not None:
            break
        if budget is not None:
            context.run(note_budget, budget)
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


def test_a_closed_loop_that_queues_far_past_the_unloaded_time_but_within_the_budget_is_never_limited():
    limit, clock = admission()
    round_trip(limit, clock, UNLOADED, count=1)  # the unloaded time
    busy = held(limit)
    for _ in range(200):  # 64 clients that resend at once: each answer 20x the unloaded time, within the budget
        assert round_trip(limit, clock, 20 * UNLOADED, count=64) == 64
    assert limit.adaptive_limit == 256 and limit.ratio < 1
    busy.run(limit.leave)


def test_a_burst_that_drains_is_let_in_whole_and_leaves_the_limit_as_it_was():
    limit, clock = admission()
    round_trip(limit, clock, UNLOADED, count=1)
    for _ in range(8):  # bursts of 48 answered past the budget, the server idle for a second between them
        assert round_trip(limit, clock, 2 * BUDGET, count=48) == 48
        clock.now += 1.0
    assert limit.adaptive_limit == 256


def test_a_standing_excess_past_the_budget_shrinks_the_limit_and_the_next_request_is_refused_at_once_with_503():
    limit, clock = admission()
    round_trip(limit, clock, UNLOADED, count=1)
    busy = held(limit)
    for _ in range(40):  # one busy period: answers at twice the budget, round after round
        round_trip(limit, clock, 2 * BUDGET, count=32)
    assert limit.ratio > 1 and limit.adaptive_limit < 32
    cap = int(limit.adaptive_limit)
    admitted = [contextvars.Context() for _ in range(cap - 1)]  # with the held request: the limit
    assert all(context.run(limit.enter, "/v1/classify") is None for context in admitted)
    before = refused("adaptive")
    refusal = contextvars.Context().run(limit.enter, "/v1/classify")
    assert isinstance(refusal, Overloaded) and refusal.status == 503 and refusal.headers == {"Retry-After": "1"}
    assert refusal.detail == {"limit": cap} and f"adaptive limit of {cap}" in refusal.message
    assert "VITSERVE_LATENCY_BUDGET_MS" in refusal.message
    assert refused("adaptive") == before + 1
    for context in [*admitted, busy]:
        context.run(limit.leave)
    assert limit.in_progress == 0


def test_it_grows_again_while_answers_come_within_the_budget():
    limit, clock = admission()
    round_trip(limit, clock, UNLOADED, count=1)
    busy = held(limit)
    for _ in range(60):
        round_trip(limit, clock, 4 * BUDGET)
    busy.run(limit.leave)
    low = limit.adaptive_limit
    assert low < 4
    for _ in range(60):
        round_trip(limit, clock, BUDGET / 2)  # the limit in use and answers within the budget: room to grow
    assert limit.adaptive_limit >= low + 5, (low, limit.adaptive_limit)


def test_a_models_own_budget_is_what_its_requests_are_judged_by():
    limit, clock = admission()
    round_trip(limit, clock, UNLOADED, count=1)
    busy = held(limit)
    for _ in range(40):  # twice the server's budget, within the model's (serving.json) five times as long
        round_trip(limit, clock, 2 * BUDGET, count=32, budget=5 * BUDGET)
    assert limit.adaptive_limit == 256
    for _ in range(40):  # the same answers from a model with a stricter budget
        round_trip(limit, clock, 2 * BUDGET, count=32, budget=BUDGET / 2)
    assert limit.adaptive_limit < 32
    busy.run(limit.leave)


def test_a_route_whose_unloaded_time_is_past_the_budget_is_judged_against_a_multiple_of_it():
    limit, clock = admission()
    busy = held(limit)
    for _ in range(40):  # a fast route and one that takes four budgets alone, each in its own unloaded time
        round_trip(limit, clock, UNLOADED, "/v1/classify", count=32)
        round_trip(limit, clock, 4 * BUDGET, "/v1/models/big/attention/batch", count=32)
    assert limit.ratio <= 1 and limit.adaptive_limit == 256
    busy.run(limit.leave)


def test_the_time_in_the_server_is_the_admitted_requests_own():
    limit, clock = admission()
    assert time_in_server() == 0.0  # nothing admitted in this context
    context = contextvars.Context()
    assert context.run(limit.enter, "/v1/classify") is None
    clock.now += 0.25
    assert context.run(time_in_server) == 0.25
    context.run(limit.leave)
    assert context.run(time_in_server) == 0.0


def test_the_fixed_cap_stays_the_hard_cap():
    limit, clock = admission(cap=3)
    for _ in range(50):
        round_trip(limit, clock, 4 * BUDGET)
    assert limit.adaptive_limit <= 3
    for _ in range(50):
        round_trip(limit, clock, UNLOADED)
    assert limit.adaptive_limit == 3
    held = [contextvars.Context() for _ in range(3)]
    assert all(context.run(limit.enter, "/v1/classify") is None for context in held)
    before = refused("concurrency")
    refusal = contextvars.Context().run(limit.enter, "/v1/classify")
    assert isinstance(refusal, Overloaded) and "VITSERVE_MAX_CONCURRENT_REQUESTS" in refusal.message
    assert refused("concurrency") == before + 1
