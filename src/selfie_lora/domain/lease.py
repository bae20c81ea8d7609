"""Leases: who is running a training, and what to do when that process is gone.

The queue is only a doorbell (a message can be lost with the worker that took it); the training's
row is the truth. A worker that runs a training holds a **lease** on its row: its identity
(``lease_owner``), the attempt number (``attempt``, which also fences out a previous holder's late
writes) and an expiry that the worker's heartbeat keeps pushing forward. A lease that expired (or
that ``expire_lease`` ended because its owner is known to be dead) is free to take:
the new holder resumes the training from wherever its row says it is. After ``max_attempts``
take-overs in a row from dead holders that made no progress the training is failed instead,
with a sentence a user can act on.
A worker that cannot reach what a remote run needs (the trainer's API, the storage the weights go
to) steps away from it (``step_away``) rather than failing it: that counts as such a take-over, so
an outage that never ends still fails the training after ``max_attempts``. A full disk is not
such an outage of what the training needs but of the machine: the worker leaves the training to
wait for room (``wait_for_room``) without counting it, so a disk freed an hour later still finds
a local training waiting, its checkpoints kept. A remote run's output outlives the wait only as
long as its backend keeps it (Replicate: about an hour); the row remembers when the wait began
(``waited_for_room_since``), so a training whose output expired meanwhile is failed naming the
full disk (or the quota used up, ``room_wait_was_quota``), not the backend.

Pure functions only: the service calls them inside its transactions.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from selfie_lora.domain.entities import Training

DEFAULT_HEARTBEAT_SECONDS = 5.0
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_RECONCILE_SECONDS = 10.0
DEFAULT_MAX_ATTEMPTS = 3
# How long a training stepped away from in an outage, with its remote run going on, waits before
# its next attempt: the first gap after the first step-away in a row, and so on (the last one
# after that). Back to back, the attempts spanned about 2 minutes of outage (3 x 31 s of retries)
# before a healthy, paid run was failed and canceled.
DEFAULT_OUTAGE_GAPS = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15))
# How long a training left for a full disk waits before it is tried again: the first gap after the
# first wait of an outage, and so on (the last one after that). Back to back, a local training
# spent its attempts in 20 s and failed, where freeing space takes a person minutes.
DEFAULT_FULL_DISK_GAPS = (timedelta(seconds=5), timedelta(seconds=15), timedelta(seconds=30),
                          timedelta(minutes=1))
# How long a training waits out an object storage outage uncounted (``wait_out``): past it, each
# further wait is counted as a step-away, so an outage that never ends (or a storage that keeps
# failing, a broken proxy's endless 502) still fails the training, after ``max_attempts`` more
# tries, naming the outage. A day: an S3 region's worst outages were hours.
DEFAULT_STORAGE_WAIT_LIMIT = timedelta(hours=24)
# A wait that begins this long after the last one ended begins a new outage: the training ran
# in between (the storage answered, or an hour of training went by before its LoRA was stored).
STORAGE_WAIT_BREAK = timedelta(hours=1)
# How long a consuming worker's row counts as ``stale`` in /metrics after it expired (the worker
# killed, its machine lost, its clock skewed): older rows are not counted, and the next beat of
# any worker deletes them. Bounded because a worker recreated under a new name (a container's
# new hostname, a pod) never takes its old row over: counted for a day, every unclean stop held a
# ``stale > 0`` alert for a day, and with every worker dead (no beat deleting) for ever. An hour:
# long enough for a dashboard and an alert held a few minutes (scrapes every 15-60 s) to see it
# and someone on call to look, short enough that it clears itself within the same shift; the
# lasting signal of no worker at all is ``live == 0``, which no window ends.
WORKER_STALE_FOR = timedelta(hours=1)

INTERRUPTED_MESSAGE = (
    "The training was interrupted {count} times because the worker running it stopped "
    "unexpectedly. Your active version is unchanged; start the training again, and contact "
    "support if it happens again."
)

OUTAGE_MESSAGE = (
    "The training was stopped after {count} interrupted attempts (the last one: {reason}). Your "
    "active version is unchanged; start the training again later, and contact support if it "
    "happens again."
)


@dataclass(frozen=True)
class LeasePolicy:
    """``ttl``: how long a lease lives without a heartbeat; ``heartbeat``: how often the holder
    renews it; ``max_attempts``: take-overs from dead holders before the training fails."""

    ttl: timedelta = timedelta(seconds=DEFAULT_LEASE_SECONDS)
    heartbeat: timedelta = timedelta(seconds=DEFAULT_HEARTBEAT_SECONDS)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    outage_gaps: tuple[timedelta, ...] = DEFAULT_OUTAGE_GAPS
    full_disk_gaps: tuple[timedelta, ...] = DEFAULT_FULL_DISK_GAPS
    storage_wait_limit: timedelta = DEFAULT_STORAGE_WAIT_LIMIT

    def __post_init__(self) -> None:
        if self.heartbeat <= timedelta(0):
            raise ValueError("the heartbeat interval must be positive")
        if self.ttl < 2 * self.heartbeat:
            # One late heartbeat must not hand a live training to another worker.
            raise ValueError("a lease must last at least two heartbeats")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def outage_gap(self, t: Training) -> timedelta:
        """How long ``t``, stepped away from in an outage while its remote run goes on, waits
        before its next claim: ``outage_gaps[n]`` after the n-th take-over in a row (counted as
        ``claim`` counts them); none when that claim ends it (``EXHAUSTED``), which a wait would
        only delay."""
        in_a_row = 0 if t.progressed and t.version_id is None else t.recoveries
        if in_a_row + 1 >= self.max_attempts:
            return timedelta(0)
        return _nth_gap(self.outage_gaps, in_a_row)

    def scoring_lock_gap(self, stops: int) -> timedelta:
        """How long a version's scoring, left on a database lock after ``stops`` of its stops
        (``scoring_stops``, the take-over of the attempt that met it included), waits before its
        next claim: ``outage_gaps[stops]``, so that its attempts span minutes of a lock, not the
        seconds of the database's own waits back to back; none when that claim judges it without
        scores (``scoring_exhausted``), which a wait would only delay. Past that (a lock met by
        the judging without scores, tried again as nothing ends a training whose version is
        stored) the gaps again: never rung back to back."""
        if stops + 1 == self.max_attempts:
            return timedelta(0)
        return _nth_gap(self.outage_gaps, stops)

    def storage_outage_gap(self, waits: int) -> timedelta:
        """How long a local training waits for the object storage after the ``waits``-th wait
        in a row (0: the first) of its outage (``wait_out``): the outage gaps, uncounted until
        the waits have lasted ``storage_wait_limit``."""
        return _nth_gap(self.outage_gaps, waits)

    def full_disk_gap(self, waits: int) -> timedelta:
        """How long a training waits for room after the ``waits``-th wait in a row (0: the
        first) of an outage of the disk."""
        return _nth_gap(self.full_disk_gaps, waits)

    @property
    def stale_after(self) -> timedelta:
        """A holder silent for this long is presumed dead when a user cancels (the lease itself
        lasts longer, so that a slow but live worker keeps its training)."""
        return min(self.ttl, 3 * self.heartbeat)


def _nth_gap(gaps: tuple[timedelta, ...], n: int) -> timedelta:
    """``gaps[n]``, the last one past the end; none without gaps."""
    return gaps[min(n, len(gaps) - 1)] if gaps else timedelta(0)


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # the caller holds it now and runs it
    BUSY = "busy"  # a live worker holds it: leave it alone
    ENDED = "ended"  # terminal: nothing to do
    EXHAUSTED = "exhausted"  # too many holders died: the caller fails it


def lease_is_live(t: Training, now: datetime) -> bool:
    """Somebody holds ``t`` until its expiry: a worker, or a wait (a hold, ``step_away``; a wait
    for room with no owner, ``wait_for_room``), which nobody may claim before it ends."""
    return t.lease_expires_at is not None and t.lease_expires_at > now


def holder_is_silent(t: Training, now: datetime, policy: LeasePolicy) -> bool:
    """No live lease, or a holder whose last heartbeat is older than ``stale_after``."""
    if not lease_is_live(t, now):
        return True
    beat = t.heartbeat_at
    return beat is None or now - beat > policy.stale_after


def claim(
    t: Training, *, owner: str, now: datetime, policy: LeasePolicy,
) -> tuple[ClaimOutcome, Training]:
    """Take ``t`` for ``owner``. A lease left behind (an owner set, no release) means its holder
    died: the take-over counts as a recovery. Counted in a row: the take-overs before an attempt
    that made progress its successor keeps (``t.progressed``) no longer count, so interruptions
    hours apart never add up to a failed training, while attempts that keep dying where they
    began (a poison training) still do. A training whose version is stored keeps its count: its
    scoring's stops are counted from it (``scoring_stops``)."""
    if t.status.is_terminal:
        return ClaimOutcome.ENDED, t
    if lease_is_live(t, now):
        return ClaimOutcome.BUSY, t
    earlier = 0 if t.progressed and t.version_id is None else t.recoveries
    recoveries = earlier + (1 if t.lease_owner is not None else 0)
    # A training whose version is stored is never failed: its version is judged without
    # another scoring attempt instead, once its scoring has had ``max_attempts`` of its own
    # (``scoring_exhausted``).
    if recoveries >= policy.max_attempts and t.version_id is None:
        return ClaimOutcome.EXHAUSTED, dataclasses.replace(
            t, recoveries=recoveries, lease_owner=None, lease_expires_at=None)
    return ClaimOutcome.CLAIMED, dataclasses.replace(
        t, attempt=t.attempt + 1, recoveries=recoveries, progressed=False, lease_owner=owner,
        lease_expires_at=now + policy.ttl, heartbeat_at=now,
    )


def lost_to_database_outage(t: Training, outages: Sequence[tuple[datetime, datetime]], *,
                            policy: LeasePolicy) -> bool:
    """Whether ``t``'s lease, run out, was lost to a database outage rather than to its holder's
    death: a worker held it (a heartbeat set it: not a hold, ``step_away``) and the database was
    seen away, unreachable, its disk full or taking no writes (``outages``: spans from the first
    failure seen to the first success after, by the worker that claims it now) over its expiry:
    from two heartbeats before it (a live holder renews once the database answers, so an outage
    that ended sooner did not cost it the lease) to a lease's length after it (the claimer's
    reconciler may meet the outage rounds late). Its take-over then counts no recovery, as the
    holder's own claim of it would not (``TrainingService._left_uncounted``): otherwise outages
    of a few minutes, each met by another worker, failed a healthy training as one "whose worker
    stopped". A holder that died during such an outage is not told apart: a recovery lost, where
    counting it would fail trainings for outages."""
    if t.lease_owner is None or t.heartbeat_at is None or t.lease_expires_at is None:
        return False
    first = t.lease_expires_at - 2 * policy.heartbeat
    last = t.lease_expires_at + policy.ttl
    return any(began <= last and ended >= first for began, ended in outages)


def scoring_stops(t: Training, *, recoveries_when_stored: int) -> int:
    """How many times the workers scoring ``t``'s version stopped: the take-overs since the
    version was stored, when ``t`` had had ``recoveries_when_stored``. Those made while it
    trained are not the scoring's: they were the training's own budget, and spent on it."""
    return max(0, t.recoveries - recoveries_when_stored)


def scoring_exhausted(t: Training, policy: LeasePolicy, *, recoveries_when_stored: int) -> bool:
    """The workers scoring ``t``'s version stopped ``max_attempts`` times (``scoring_stops``):
    the gate decides without scores (held, unless there is nothing to beat), so the training
    can end."""
    return (t.version_id is not None
            and scoring_stops(t, recoveries_when_stored=recoveries_when_stored)
            >= policy.max_attempts)


def holds(t: Training, *, owner: str, attempt: int) -> bool:
    """Whether the holder of (``owner``, ``attempt``) still holds ``t``: the fence every write of
    a running worker passes. A worker whose lease was taken over finds a higher attempt."""
    return not t.status.is_terminal and t.lease_owner == owner and t.attempt == attempt


def is_held_back(t: Training, now: datetime) -> bool:
    """``t`` was stepped away from in an outage and waits out its hold (``step_away(hold=)``):
    a live lease that nobody runs. Only a hold leaves a live lease with no heartbeat (``claim``
    and every renewal set one)."""
    return lease_is_live(t, now) and t.heartbeat_at is None


def expire_lease(t: Training, now: datetime, dead_owners: Collection[str]) -> Training:
    """``t`` with its lease expired when its owner is one of ``dead_owners`` (a worker that
    restarted under its old name knows its old leases are dead). The owner stays, so the next
    claim counts the take-over as a recovery. A hold (``is_held_back``) is left alone: no
    process ran it, so its owner's restart says nothing about it, and ending it would spend an
    attempt polling into the outage it waits out."""
    if (t.lease_owner is None or t.lease_owner not in dead_owners or not lease_is_live(t, now)
            or is_held_back(t, now)):
        return t
    return dataclasses.replace(t, lease_expires_at=now)


def release(t: Training) -> Training:
    """``t`` handed back cleanly (a graceful shutdown): the next worker takes it over without
    counting a recovery."""
    return dataclasses.replace(t, lease_owner=None, lease_expires_at=None)


def step_away(t: Training, now: datetime, *, reason: str,
              hold: timedelta = timedelta(0)) -> Training:
    """``t`` left by a worker that could not reach what its remote run needs (``reason``, a
    sentence; on an unfinished training ``error`` holds only that). Free to claim once ``hold``
    has passed (at once, like ``release``, without one), but the owner stays, so the next claim
    counts a recovery: the remote run is adopted again by its id, and an outage that never ends
    fails the training after ``max_attempts`` (``exhausted_error``) instead of being retried for
    ever. While held back nobody runs it: no heartbeat, so a cancel ends it at once."""
    if hold <= timedelta(0):
        return dataclasses.replace(t, lease_expires_at=now, error=reason)
    return dataclasses.replace(t, lease_expires_at=now + hold, heartbeat_at=None, error=reason)


def wait_for_room(t: Training, now: datetime, *, reason: str, hold: timedelta,
                  quota: bool = False) -> Training:
    """``t`` left by a worker whose disk is full (``reason``, a sentence, on ``error``): it
    waits out ``hold`` (nobody claims it before: the reconciler rings once it is over) and is
    claimed then with no recovery counted, as after ``release``: the owner goes, since the
    machine's disk, not the training nor its worker, failed. An attempt that made progress keeps
    that (``progressed``), so the count of the take-overs before it starts again as usual. With
    no heartbeat, a cancel meanwhile ends it at once (``holder_is_silent``). The first wait of
    an outage is noted (``waited_for_room_since``), and with each wait whether it was for a
    quota used up (``quota``: EDQUOT) rather than a full disk (``room_wait_was_quota``), and
    when its hold ends (``until``), which tells it from a later wait for the object storage."""
    note = t.metrics.get(ROOM_WAIT_KEY) if waited_for_room_since(t) is not None else None
    if not isinstance(note, dict):
        note = {"since": now.isoformat(), "remote_id": t.remote_id}
    metrics = {**t.metrics, ROOM_WAIT_KEY: {**note, "quota": quota,
                                            "until": (now + hold).isoformat()}}
    return _waiting(t, now, reason=reason, hold=hold, metrics=metrics)


def _waiting(t: Training, now: datetime, *, reason: str, hold: timedelta,
             metrics: dict[str, Any]) -> Training:
    """``t`` let go to wait out ``hold`` uncounted (``wait_for_room``, ``wait_out``): no owner
    (its next claim counts no recovery), no heartbeat (a cancel ends it at once)."""
    return dataclasses.replace(t, lease_owner=None, lease_expires_at=now + hold,
                               heartbeat_at=None, error=reason, metrics=metrics)


# The key of ``Training.metrics`` that holds when the training's waits for the object storage
# began and when the last one ends (``wait_out``), and which remote run's finished output, if
# any, waited in them to be stored (``storage_waited_for_weights``).
STORAGE_WAIT_KEY = "waits_for_storage"


def wait_out(t: Training, now: datetime, *, reason: str, hold: timedelta,
             limit: timedelta, weights_of: str | None = None) -> Training:
    """``t`` left by a worker whose object storage could not be reached (``reason``, on
    ``error``): as ``wait_for_room``, it waits out ``hold`` and is claimed then with no recovery
    counted (the owner goes: the storage, not the training nor its worker, failed), so an outage
    of seconds no longer spends its attempts back to back. The row notes when the outage's
    waits began (``STORAGE_WAIT_KEY``); once they have lasted ``limit``, the wait is a
    ``step_away`` instead, counted, so an outage that never ends still fails the training
    (``exhausted_error``, naming it) after ``max_attempts``. ``weights_of``: the remote run
    whose downloaded output this wait could not store; noted, and kept for the rest of the
    outage (a later wait of it may be the photos' read at the run's adoption). Its output
    written on this machine's disk, any wait for room of that run is over (``room_wait_over``):
    an expiry now is the storage's, not a disk full or a quota used up that is long gone."""
    waited = storage_waited(t, now)
    since = now - waited
    note: dict[str, Any] = {"since": since.isoformat(), "until": (now + hold).isoformat()}
    earlier = t.metrics.get(STORAGE_WAIT_KEY)
    metrics = t.metrics
    if weights_of is not None and weights_of == t.remote_id:
        metrics = room_wait_over(metrics)
    if weights_of is None and waited > timedelta(0) and isinstance(earlier, dict):
        weights_of = earlier.get("weights_of")
    if weights_of is not None:
        note["weights_of"] = weights_of
    metrics = {**metrics, STORAGE_WAIT_KEY: note}
    if now - since >= limit:
        return dataclasses.replace(step_away(t, now, reason=reason, hold=hold), metrics=metrics)
    return _waiting(t, now, reason=reason, hold=hold, metrics=metrics)


def storage_waited(t: Training, now: datetime) -> timedelta:
    """How long ``t``'s waits for the object storage (``wait_out``) have lasted at ``now`` in
    the outage they wait out: zero when it has none, or its last wait ended over
    ``STORAGE_WAIT_BREAK`` ago (a new outage)."""
    note = t.metrics.get(STORAGE_WAIT_KEY)
    if not isinstance(note, dict):
        return timedelta(0)
    try:
        began = datetime.fromisoformat(str(note["since"]))
        ended = datetime.fromisoformat(str(note["until"]))
    except (KeyError, ValueError):
        return timedelta(0)
    return now - began if now - ended <= STORAGE_WAIT_BREAK else timedelta(0)


def storage_waited_for_weights(t: Training, now: datetime) -> timedelta:
    """``storage_waited``, counted only when the outage's waits held the finished output of
    ``t``'s current remote run (``wait_out(weights_of=)``): a wait while its photos were read
    before the run was made is not one its output could expire in."""
    note = t.metrics.get(STORAGE_WAIT_KEY)
    if (t.remote_id is None or not isinstance(note, dict)
            or note.get("weights_of") != t.remote_id):
        return timedelta(0)
    return storage_waited(t, now)


# The key of ``Training.metrics`` that holds when the training's current wait for room began, and
# for which remote run: a run created after it is not one whose output that wait outlasted; and
# whether its last wait was for a quota used up.
ROOM_WAIT_KEY = "waits_for_room"


def waited_for_room_since(t: Training) -> datetime | None:
    """When ``t``'s wait for room (``wait_for_room``) began, if its current run (``remote_id``)
    waited and has not moved since (``room_wait_over``), nor had its output written and waited
    for the object storage to store it after its last wait for room (``_room_wait_outlived``)."""
    wait = t.metrics.get(ROOM_WAIT_KEY)
    if (not isinstance(wait, dict) or wait.get("remote_id") != t.remote_id
            or _room_wait_outlived(t, wait)):
        return None
    try:
        return datetime.fromisoformat(str(wait["since"]))
    except (KeyError, ValueError):
        return None


def _room_wait_outlived(t: Training, wait: dict[str, Any]) -> bool:
    """Whether a wait of ``t``'s current run for the object storage to store its output
    (``wait_out(weights_of=)``) came after its last wait for room (``wait`` its note): the disk
    had room for the output then. ``wait_out`` drops the note itself; this reads it from the
    holds' ends as well, since a worker of an older release (a rolling upgrade) writes the
    storage's note, ``until`` included, without dropping the room's. A note with no ``until``
    (an older release's) is taken as the last wait, as that release did."""
    storage = t.metrics.get(STORAGE_WAIT_KEY)
    if (t.remote_id is None or not isinstance(storage, dict)
            or storage.get("weights_of") != t.remote_id):
        return False
    try:
        return (datetime.fromisoformat(str(storage["until"]))
                > datetime.fromisoformat(str(wait["until"])))
    except (KeyError, ValueError):
        return False


def room_wait_was_quota(t: Training) -> bool:
    """Whether the last wait for room of ``t``'s current one (``waited_for_room_since``) was for
    a quota used up (EDQUOT), not a full disk: what its user is told to do differs, as freeing
    space on the disk need not help a quota."""
    wait = t.metrics.get(ROOM_WAIT_KEY)
    return (waited_for_room_since(t) is not None and isinstance(wait, dict)
            and wait.get("quota") is True)


def room_wait_over(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the note of a wait for room: the training moved on since."""
    if ROOM_WAIT_KEY not in metrics:
        return metrics
    return {k: v for k, v in metrics.items() if k != ROOM_WAIT_KEY}


# What a training waits out uncounted or not (``outage_waited``): the reasons of the
# ``selfie_lora_trainings_waiting`` gauge, each one there from the start.
OUTAGE_WAITS = ("full_disk", "object_storage")

# The states of the ``selfie_lora_workers`` gauge: a consuming worker is live while the row it
# renews every heartbeat has not expired (a lease's time), stale once it has (a worker that
# died without stopping: killed, its machine lost; counted for WORKER_STALE_FOR after).
WORKER_STATES = ("live", "stale")


def outage_waited(t: Training, now: datetime) -> str | None:
    """Which outage ``t`` waits out now, of ``OUTAGE_WAITS``: held back (a live lease nobody
    runs, ``is_held_back``) by the wait its row notes. A wait for the object storage
    (``wait_out``) notes when its hold ends, so a hold ending then is that wait's, counted or
    not; a wait for room (``wait_for_room``) lets the owner go. None when it runs, is free to
    claim, or is held back for another reason (a ``step_away`` for a remote backend)."""
    if t.status.is_terminal or not is_held_back(t, now) or t.lease_expires_at is None:
        return None
    note = t.metrics.get(STORAGE_WAIT_KEY)
    if isinstance(note, dict):
        try:
            until = datetime.fromisoformat(str(note["until"]))
        except (KeyError, ValueError):
            pass
        else:
            # The same instant; a database may round it below a millisecond.
            if abs(until - t.lease_expires_at) < timedelta(milliseconds=1):
                return "object_storage"
    if t.lease_owner is None and waited_for_room_since(t) is not None:
        return "full_disk"
    return None


def wait_text(waited: timedelta) -> str:
    """A wait in words: ``45 s``, ``12 min``, ``1 h 5 min``."""
    seconds = max(0, int(waited.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def exhausted_error(t: Training) -> str:
    """The sentence of a training failed after ``t.recoveries`` take-overs: an outage's when the
    last attempt stepped away for one (its reason is still on the row), else a dead worker's."""
    if t.error:
        return OUTAGE_MESSAGE.format(count=t.recoveries, reason=t.error.rstrip("."))
    return INTERRUPTED_MESSAGE.format(count=t.recoveries)


class Recovery(enum.Enum):
    NONE = "none"  # running, ended, or its message waits in the queue
    ENQUEUE = "enqueue"  # nobody runs it and no message will reach a worker: ring again
    CANCEL = "cancel"  # its user asked to cancel and nobody is there to do it


def recovery_action(t: Training, *, now: datetime, queued_ids: Collection[str],
                    policy: LeasePolicy) -> Recovery:
    """What the reconciler does about ``t``. A cancel does not wait for the lease to run out:
    a holder silent for a few heartbeats is taken for dead."""
    if t.status.is_terminal:
        return Recovery.NONE
    if t.cancel_requested and holder_is_silent(t, now, policy):
        return Recovery.CANCEL
    if lease_is_live(t, now) or t.id in queued_ids:
        return Recovery.NONE
    return Recovery.ENQUEUE
