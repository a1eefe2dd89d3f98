"""A short soak (benchmarks/soak.py): mixed load, honest 503s, no unexpected error, memory that stays put.

1,500 requests at concurrency 32, the full mix (classify, attention, batches, V2, bad inputs), against a server
whose queue holds only 16 requests, so that overload happens and its accounting is checked: every 503 is
`overloaded` with `Retry-After`, and `vitserve_rejected_total` agrees. The memory bound is loose (25%)
because a short run ends close to its warm-up; `python benchmarks/soak.py` runs 20,000 with a 10% bound.
"""

from __future__ import annotations

from benchmarks.soak import MODEL, run_soak, summary
from tests.conftest import MODELS, Server

REQUESTS = 1500
CONCURRENCY = 32
QUEUE = 16  # with batches of 8 images in the mix, 32 clients overfill it


def test_short_soak_has_no_unexpected_error_and_no_memory_growth(tmp_path):
    server = Server(
        MODELS,
        tmp_path / "server.log",
        VITSERVE_MODELS=f'["{MODEL}"]',
        VITSERVE_DEFAULT_MODEL=MODEL,
        VITSERVE_MAX_QUEUE_SIZE=str(QUEUE),
        VITSERVE_MAX_BATCH_FILES="8",  # the largest batch in the mix; must not exceed the queue
    ).wait_ready()
    try:
        result = run_soak(
            server.url, pid=server.process.pid, requests=REQUESTS, concurrency=CONCURRENCY, max_growth=0.25
        )
    finally:
        server.stop()
    print("\n" + summary(result))
    assert result.ok, summary(result)
    assert result.requests == REQUESTS and result.statuses.get("200", 0) > REQUESTS // 2
    assert result.rss_mb["samples"] >= 10
    log = server.log.read_text()
    assert "Traceback" not in log, log
