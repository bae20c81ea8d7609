"""A clock a test moves by hand, for the services that take a ``clock`` callable; SQLite's clock
read as PostgreSQL's server clock is."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text


class Clock:
    """Answers ``now`` (default: the real time when it was made) until the test moves it."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def sqlite_server_clock(engine: Engine) -> Callable[[], datetime]:
    """SQLite's clock read as ``server_clock`` reads PostgreSQL's, a statement on a pool
    connection of its own: in place of ``wiring.server_clock`` (SQLite itself has no clock
    check: one machine, one clock), the clock check on as on PostgreSQL."""
    def read() -> datetime:
        with engine.connect() as conn:
            at = conn.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(at).replace(tzinfo=UTC)

    return read
