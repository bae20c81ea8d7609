"""A database that hangs: calls that, once it is hung, wait out an answer timeout and then fail,
as a PostgreSQL that stops answering (not refusing) does; for the tests that bound how long a
loop, a stop or a probe waits on one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

from selfie_lora.errors import DatabaseUnreachableError
from selfie_lora.services.common import utcnow
from selfie_lora.worker import Worker


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def no_answer(hang: float) -> Exception:
    """What the repository raises for a call that got no answer (the driver's answer timeout)."""
    return DatabaseUnreachableError(f"database error: no answer from the server in {hang:g} s "
                                    "(the connection is closed)", unanswered=True)


class HungDatabase:
    """Calls that, once ``hung`` is set, wait ``hang`` seconds and then fail, as on a PostgreSQL
    that hangs (not refusing) past each call's answer timeout; each such call named in
    ``calls``. A bare driver call (the clock's read) fails with the driver's error, a
    repository's call (``meet(..., repository=True)``) with the repository's (``no_answer``).
    ``released`` set ends the waits at once (they fail as at their end): for a test done with
    what its hung calls show, so that it does not sit out the rest of one."""

    def __init__(self, hang: float = 1.5) -> None:
        self.hang = hang
        self.hung = threading.Event()
        self.released = threading.Event()
        self.calls: list[str] = []

    def meet(self, call: str, *, repository: bool = False) -> None:
        if self.hung.is_set():
            self.calls.append(call)
            self.released.wait(self.hang)
            # The driver's words for a read of a hung PostgreSQL (BoundedConnection's).
            raise no_answer(self.hang) if repository else OSError(
                f"no answer from the server in {self.hang:g} s (the connection is closed)")

    def clock(self) -> datetime:
        """The database's clock (``database_clock``)."""
        self.meet("clock")
        return utcnow()

    def stops_in_time(self, worker: Worker, *, round_: str, first: str = "clock") -> None:
        """Hangs, and once a ``round_`` of ``worker`` is in its ``first`` call, its clock read
        (one begun just before may be in its next call), stops ``worker`` within a grace of
        more than one hung call and less than two, the stop's own calls included; that round,
        and the stop, made no call after the one that got no answer."""
        self.hung.set()
        until(lambda: first in self.calls, f"no {round_} met the hung database")
        started = time.monotonic()
        grace = 2 * self.hang - 0.2
        assert worker.stop(grace=grace), (
            f"stop overran its grace ({time.monotonic() - started:.1f} s): {self.calls}")
        took = time.monotonic() - started
        assert self.calls[self.calls.index(first):] == [first]
        assert took < grace, f"stop took {took:.1f} s: {self.calls}"
