"""The sign-in rate limit as a rule: whatever the times of the attempts, no window ever holds
more failures than the limit, and an attempt is refused only when the window is full."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.accounts import password_problem, wait_before_next_attempt

START = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(minutes=15)


@given(limit=st.integers(1, 6),
       gaps=st.lists(st.integers(0, 20 * 60), min_size=1, max_size=60))
def test_no_window_ever_holds_more_failures_than_the_limit(limit: int, gaps: list[int]) -> None:
    now = START
    failures: list[datetime] = []
    for gap in gaps:
        now += timedelta(seconds=gap)
        wait = wait_before_next_attempt(failures, limit=limit, window=WINDOW, now=now)
        in_window = [t for t in failures if now - t < WINDOW]
        assert (wait is None) == (len(in_window) < limit)
        if wait is None:
            failures.append(now)  # every attempt that is let through fails
        else:
            assert timedelta(0) < wait <= WINDOW
            # Waiting that long is enough.
            assert wait_before_next_attempt(failures, limit=limit, window=WINDOW,
                                            now=now + wait) is None
    for t in failures:
        assert sum(1 for u in failures if t <= u < t + WINDOW) <= limit


def test_password_rules() -> None:
    assert password_problem("a good long password", name="ann") is None
    assert password_problem("ann" * 4, name="annannannann") is not None
    assert password_problem("short", name="ann") is not None
