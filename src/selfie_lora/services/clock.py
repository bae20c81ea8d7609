"""Whether this machine's clock agrees with the database's.

Every time the services share across machines (a lease's expiry, a key's revocation and its
rotation grace, the ``created_at`` that picks the latest dataset or training, the collector's
grace, a deletion's claim) is written from the writing process's clock (``common.utcnow``) and
compared with another process's. Those are only right while the machines' clocks agree; this
guard makes a disagreement past ``max_skew`` seconds impossible to miss instead of silently
revoking a key minutes late or taking live trainings over. The database's clock is the yardstick
(one clock every machine reaches); on SQLite (one machine, one clock) there is nothing to check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from selfie_lora.driver_errors import gave_no_answer
from selfie_lora.errors import (
    ClockSkewError,
    DatabaseUnreachableError,
    SelfieLoraError,
    describe,
)
from selfie_lora.services.common import Outage, utcnow

logger = logging.getLogger(__name__)

# What /readyz says of the clock check while it fails: safe to tell anyone (no host, no path).
SKEWED = "skewed"
SETTING = "SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS"

T = TypeVar("T")


@dataclass(frozen=True)
class ClockReading:
    """One comparison: this process's clock halfway through the database's answer, the
    database's time, and how long the question took (the reading is uncertain by half of it)."""

    local: datetime
    database: datetime
    round_trip: float

    @property
    def skew(self) -> float:
        """Seconds this machine's clock is ahead of the database's (negative: behind)."""
        return (self.local - self.database).total_seconds()

    def beyond(self, limit: float) -> bool:
        """Whether the skew is past ``limit`` whatever the round trip hid: a slow answer never
        makes a machine whose clock is right look skewed."""
        return abs(self.skew) - self.round_trip / 2 > limit

    def describe(self, limit: float) -> str:
        way = "ahead of" if self.skew > 0 else "behind"
        return (f"this machine's clock is {abs(self.skew):.1f} s {way} the database's (this "
                f"machine {self.local:%Y-%m-%d %H:%M:%S} UTC, database "
                f"{self.database:%Y-%m-%d %H:%M:%S} UTC, ±{self.round_trip / 2:.1f} s), more "
                f"than {SETTING} ({limit:g})")


class ClockGuard:
    """Compares this process's clock (``clock``, the services' ``utcnow``) with the database's
    (``database_clock``: None where there is no other clock, SQLite). ``max_skew`` seconds: 0
    turns the check off. ``reads_server``: ``database_clock`` reads the database server's own
    clock (``server_clock``, not one given to ``build_services``), which a statement asking
    that database more may read in its stead (``check_with``)."""

    def __init__(self, *, database_clock: Callable[[], datetime] | None, max_skew: float,
                 clock: Callable[[], datetime] = utcnow, reads_server: bool = False) -> None:
        self._database_clock = database_clock
        self._reads_server = reads_server
        self._max_skew = max_skew
        self._clock = clock
        self._skewed = False
        # Whether the last read got an answer: a worker's stop skips its last write when it did
        # not (``answered``).
        self._answered = True
        # A skew lasts as long as nobody fixes the machine: said once when it starts and once
        # when it ends, not every round.
        self._episode = Outage()

    @property
    def enabled(self) -> bool:
        return self._database_clock is not None and self._max_skew > 0

    @property
    def reads_server(self) -> bool:
        """Whether the check is on and its database clock is the server's own: a caller asking
        that database anyway reads it in its own statement (``check_with``)."""
        return self.enabled and self._reads_server

    @property
    def max_skew(self) -> float:
        """The limit, seconds (0: the check is off)."""
        return self._max_skew

    @property
    def skewed(self) -> bool:
        """What the last check found (False before any, and whenever the check is off)."""
        return self._skewed

    @property
    def answered(self) -> bool:
        """Whether the last check's read got an answer from the database (True before any, and
        whenever the check is off): False while it hangs (the read's wait ran out, its words
        say: ``driver_errors.gave_no_answer``), where a call more (a worker's last write as it
        stops) would wait as long again; a refused connection is an answer."""
        return self._answered

    def read(self) -> ClockReading | None:
        """One reading, None when the check is off. The database's errors propagate."""
        return self._read(self._database_clock)

    def _read(self, database_clock: Callable[[], datetime] | None) -> ClockReading | None:
        if database_clock is None or not self.enabled:
            return None
        before = self._clock()
        database = database_clock()
        after = self._clock()
        return ClockReading(local=before + (after - before) / 2, database=database,
                            round_trip=max(0.0, (after - before).total_seconds()))

    def require(self) -> None:
        """A process starting: ``ClockSkewError`` when this machine's clock is too far off, with
        what to do about it."""
        reading = self.read()
        if reading is not None and reading.beyond(self._max_skew):
            self._skewed = True
            raise ClockSkewError(
                f"refusing to start: {reading.describe(self._max_skew)}; leases, key revocations "
                "and 'latest' would be wrong across machines. Fix this machine's time (NTP: "
                "chrony or systemd-timesyncd; 'chronyc tracking' or 'timedatectl "
                "timesync-status' shows its offset), then start again")

    def check(self) -> bool:
        """A running process's periodic check: True while the clocks agree (or the check is off),
        False while skewed. The start and the end of a skewed episode are logged once each
        (a WARNING, then INFO). A database that does not answer keeps the last verdict: that
        is the database's outage, said by whoever meets it."""
        return self._check()[0]

    def observe(self) -> ClockReading | None:
        """``check``, giving the reading it took: None when the check is off or the database
        did not answer (the last verdict stands). A worker's beat writes its row from it, with
        no second question to a database that may hang on each."""
        return self._check()[1]

    def answered_check(self) -> bool:
        """``check`` for a loop that says the database's outage itself and would wait on it
        again straight after (the reconciler's round, whose reconcile asks the same database):
        a database that does not answer raises ``DatabaseUnreachableError`` with the read's
        words (or the read's own ``SelfieLoraError``), instead of keeping the last verdict."""
        return self._check(raising=True)[0]

    def check_with(self, read: Callable[[], tuple[T, datetime]]) -> T:
        """``check`` with the database's time read by ``read`` (what else its statement asked,
        and the database's clock), in place of this guard's own read, where ``reads_server``:
        ``/readyz``'s database check, which asks the same server on one pool connection (the
        clock's own read was a second checkout a probe, and a second wait on a hung server).
        Returns what else ``read`` read; the verdict is ``skewed``. ``read``'s errors propagate
        as they are: they are its caller's to say, the last verdict standing (``answered``
        follows them as ``check``'s read)."""
        if not self.enabled:
            return read()[0]
        others: list[T] = []

        def database_clock() -> datetime:
            other, database = read()
            others.append(other)
            return database

        self._check(database_clock=database_clock)
        return others[0]

    def _check(self, *, raising: bool = False,
               database_clock: Callable[[], datetime] | None = None,
               ) -> tuple[bool, ClockReading | None]:
        ticket = self._episode.attempt()  # before the read: see Outage
        try:
            reading = self._read(database_clock or self._database_clock)
        except Exception as exc:
            # Only a wait that ran out: a refused connection (a restart), a name that does not
            # resolve, fail at once, and a worker's stop may still remove its row.
            unanswered = (exc.unanswered if isinstance(exc, DatabaseUnreachableError)
                          else gave_no_answer(exc))
            self._answered = not unanswered
            if database_clock is not None:
                raise
            if not raising:
                logger.debug("the database's clock could not be read", exc_info=True)
                return not self._skewed, None
            if isinstance(exc, SelfieLoraError):
                raise
            # The driver's own error (the read is one bare statement, not one of the
            # repository's translated calls): whatever it says, the database gave no answer.
            raise DatabaseUnreachableError(
                f"its clock could not be read: {describe(exc)}", unanswered=unanswered) from exc
        self._answered = True
        if reading is None:
            return True, None
        skewed = reading.beyond(self._max_skew)
        self._skewed = skewed
        if skewed and self._episode.begins(ticket=ticket):
            logger.warning("%s: this process takes no new training and takes none over, and "
                           "/readyz answers 503, until it is back within; fix this machine's "
                           "time (NTP: chrony or systemd-timesyncd)",
                           reading.describe(self._max_skew))
        elif not skewed and self._episode.ends(ticket=ticket):
            logger.info("this machine's clock is back within %s of the database's (%.1f s): "
                        "taking trainings again", SETTING, reading.skew)
        return not skewed, reading
