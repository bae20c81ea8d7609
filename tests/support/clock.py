"""A clock a test moves by hand, for the services that take a ``clock`` callable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Answers ``now`` (default: the real time when it was made) until the test moves it."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)
