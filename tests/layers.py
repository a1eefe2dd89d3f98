"""Which test is running, for `require_mark`.

Its own module because pytest imports tests/conftest.py twice (as the plugin `conftest`, and as `tests.conftest`
where tests import its helpers): state kept there would be split between the two copies.
"""

from __future__ import annotations

import pytest

running: pytest.Item | None = None  # the test being set up, run or torn down (set by tests/conftest.py)


def require_mark(mark: str, what: str) -> None:
    """Fail the running test unless it carries `mark` (so `make test-fast` leaves it out)."""
    if running is not None and running.get_closest_marker(mark) is None:
        pytest.fail(f"{running.nodeid} {what}: mark it `@pytest.mark.{mark}` (see tests/conftest.py)", pytrace=False)
