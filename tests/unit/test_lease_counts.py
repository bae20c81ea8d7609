"""The count of take-overs that fails a training (``domain.lease.claim``): attempts in a row that
got nowhere, as the README says; an attempt that made progress its successor keeps (a checkpoint
past its resume point, a poll of its remote run) starts the count again."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.domain.lease import (
    ROOM_WAIT_KEY,
    ClaimOutcome,
    LeasePolicy,
    claim,
    exhausted_error,
    expire_lease,
    lease_is_live,
    lost_to_database_outage,
    outage_waited,
    release,
    room_wait_was_quota,
    step_away,
    wait_for_room,
    wait_out,
    waited_for_room_since,
)
from selfie_lora.domain.recipes import get_recipe

POLICY = LeasePolicy(max_attempts=3)
NOW = datetime(2026, 12, 5, tzinfo=UTC)

# How an attempt ends: whether it made progress, and how it left (died holding the lease, stepped
# away from an outage, or handed back by a stopping worker).
ATTEMPTS = st.lists(st.tuples(st.booleans(), st.sampled_from(["died", "stepped_away",
                                                               "handed_back"])), max_size=12)


def _queued() -> Training:
    return Training(id="t", model_id="m", dataset_id="d", backend="local",
                    status=TrainingStatus.PROCESSING, is_retraining=False, trigger_word="tok",
                    destination="local/tok", trainer_version="local-tiny-v1",
                    recipe=get_recipe("local-tiny-v1"), preserved={}, created_at=NOW)


@given(ATTEMPTS)
def test_only_takeovers_in_a_row_without_progress_fail_a_training(
        attempts: list[tuple[bool, str]]) -> None:
    t, now, in_a_row = _queued(), NOW, 0
    outcome, t = claim(t, owner="w", now=now, policy=POLICY)
    for progressed, ended in attempts:
        assert outcome is ClaimOutcome.CLAIMED
        assert not t.progressed  # each attempt starts with none of its own
        if progressed:
            t = dataclasses.replace(t, progressed=True)
            in_a_row = 0
        now += timedelta(hours=1)
        if ended == "died":
            in_a_row += 1  # its lease runs out, its owner still on the row
        elif ended == "stepped_away":
            in_a_row += 1
            t = step_away(t, now, reason="the database could not be reached")
        else:
            t = release(t)
        outcome, t = claim(t, owner="w", now=now, policy=POLICY)
        assert t.recoveries == in_a_row
        if in_a_row >= POLICY.max_attempts:
            assert outcome is ClaimOutcome.EXHAUSTED
            return
    assert outcome is ClaimOutcome.CLAIMED


def test_three_interruptions_that_each_made_progress_do_not_fail_a_training() -> None:
    """The review's repro: killed at steps 3, 9 and 20, each attempt past its checkpoint."""
    t = claim(_queued(), owner="w", now=NOW, policy=POLICY)[1]
    for hour in range(1, 4):
        t = dataclasses.replace(t, progressed=True)
        outcome, t = claim(t, owner="w", now=NOW + timedelta(hours=hour), policy=POLICY)
        assert outcome is ClaimOutcome.CLAIMED
        assert t.recoveries == 1


def test_a_stored_version_keeps_its_count_for_its_scoring() -> None:
    """Its scoring's stops are counted from the count when it was stored (``scoring_stops``):
    progress made before the store does not start it again."""
    t = claim(_queued(), owner="w", now=NOW, policy=POLICY)[1]
    t = dataclasses.replace(t, recoveries=2, progressed=True, version_id="v")
    outcome, t = claim(t, owner="w", now=NOW + timedelta(hours=1), policy=POLICY)
    assert (outcome, t.recoveries) == (ClaimOutcome.CLAIMED, 3)


def test_outage_step_aways_are_spaced_and_the_last_is_not_held() -> None:
    """1, then 5 minutes between attempts that step away in an outage; no hold before the claim
    that fails the training (it would only delay the failure); a held training has no holder's
    heartbeat, so a cancel is not kept waiting for one."""
    t, now, gaps = _queued(), NOW, []
    outcome, t = claim(t, owner="w", now=now, policy=POLICY)
    while outcome is ClaimOutcome.CLAIMED:
        gap = POLICY.outage_gap(t)
        gaps.append(gap)
        t = step_away(t, now, reason="Replicate could not be reached", hold=gap)
        if gap:
            early = now + gap - timedelta(seconds=1)
            assert claim(t, owner="w", now=early, policy=POLICY)[0] is ClaimOutcome.BUSY
            assert t.heartbeat_at is None
        now += gap
        outcome, t = claim(t, owner="w", now=now, policy=POLICY)
    assert outcome is ClaimOutcome.EXHAUSTED
    assert gaps == [timedelta(minutes=1), timedelta(minutes=5), timedelta(0)]


def test_a_scoring_s_lock_gaps_are_none_only_before_the_judging_without_scores() -> None:
    """A version's scoring left on a lock waits the outage gaps, none before the claim that
    judges it without scores (``max_attempts - 1`` stops: a wait would only delay it), and past
    that the gaps again: the judging without scores met by a lock is never rung back to
    back."""
    for attempts in (1, 2, 3, 5):
        policy = dataclasses.replace(POLICY, max_attempts=attempts)
        gaps = policy.outage_gaps
        assert policy.scoring_lock_gap(attempts - 1) == timedelta(0)
        for stops in range(attempts - 1):
            assert policy.scoring_lock_gap(stops) == gaps[min(stops, len(gaps) - 1)] > timedelta(0)
        for stops in range(attempts, attempts + 4):
            gap = policy.scoring_lock_gap(stops)
            assert gap == gaps[min(stops, len(gaps) - 1)] > timedelta(0), (attempts, stops)
    assert [POLICY.scoring_lock_gap(n) for n in range(5)] == [
        timedelta(minutes=1), timedelta(minutes=5), timedelta(0), timedelta(minutes=15),
        timedelta(minutes=15)]


def test_a_worker_restarting_under_its_name_leaves_a_hold_alone() -> None:
    """A restart (a deploy, systemd) expires the leases under its reused slot name
    (``expire_lease``): those of the trainings it ran are dead. A training held back in an outage
    is nobody's run: its hold goes on, or the next attempt polled into the same outage at once
    and the hold's minutes were lost (review daydiff2 finding 5: hold_restart.py)."""
    outcome, t = claim(_queued(), owner="w0", now=NOW, policy=POLICY)
    assert outcome is ClaimOutcome.CLAIMED
    held = step_away(t, NOW, reason="Replicate could not be reached", hold=POLICY.outage_gap(t))
    restart = NOW + timedelta(seconds=5)

    after = expire_lease(held, restart, ("w0",))

    assert lease_is_live(after, restart)  # old code: expired, and claimed with a recovery
    assert after.lease_expires_at == NOW + timedelta(minutes=1)
    assert claim(after, owner="w0", now=restart, policy=POLICY)[0] is ClaimOutcome.BUSY
    # An ordinary lease of the same owner (a training it ran when it died) is still recovered.
    outcome, running = claim(_queued(), owner="w0", now=NOW, policy=POLICY)
    assert not lease_is_live(expire_lease(running, restart, ("w0",)), restart)


_STORAGE_AWAY = "the trained LoRA could not be stored (the object storage could not be reached)"


def test_an_object_storage_outage_that_never_ends_still_fails_the_training() -> None:
    # Old code: wait_out never counted, 200 waits (2 days) later still claimed, recoveries 0.
    t, now, waited, outcome = _queued(), NOW, timedelta(0), ClaimOutcome.CLAIMED
    for waits in range(200):
        outcome, t = claim(t, owner="w1", now=now, policy=POLICY)
        if outcome is not ClaimOutcome.CLAIMED:
            break
        gap = POLICY.storage_outage_gap(waits)
        t = wait_out(t, now, reason=_STORAGE_AWAY, hold=gap, limit=POLICY.storage_wait_limit)
        now, waited = now + gap, waited + gap
    assert outcome is ClaimOutcome.EXHAUSTED
    assert POLICY.storage_wait_limit <= waited < POLICY.storage_wait_limit + timedelta(hours=1)
    assert "could not be stored" in exhausted_error(t)


def test_object_storage_outages_far_apart_are_each_waited_out_anew() -> None:
    t, now = _queued(), NOW
    for _ in range(30):  # a short outage a day for a month: never counted
        outcome, t = claim(t, owner="w1", now=now, policy=POLICY)
        assert outcome is ClaimOutcome.CLAIMED
        t = wait_out(t, now, reason=_STORAGE_AWAY, hold=timedelta(minutes=15),
                     limit=POLICY.storage_wait_limit)
        now += timedelta(days=1)
    assert t.recoveries == 0


def test_the_waits_gauge_names_each_outage_wait_while_its_hold_lasts() -> None:
    _, t = claim(_queued(), owner="w", now=NOW, policy=POLICY)
    hold, limit = timedelta(minutes=1), timedelta(minutes=2)
    stored = wait_out(t, NOW, reason="S3 away", hold=hold, limit=limit)
    assert outage_waited(stored, NOW) == "object_storage"
    assert outage_waited(stored, NOW + hold) is None  # its hold is over: free to claim
    # Past the limit the wait is counted (the owner stays) but is still the storage's.
    _, again = claim(stored, owner="w", now=NOW + hold, policy=POLICY)
    counted = wait_out(again, NOW + 3 * hold, reason="S3 away", hold=hold, limit=limit)
    assert counted.lease_owner == "w"
    assert outage_waited(counted, NOW + 3 * hold) == "object_storage"
    room = wait_for_room(t, NOW, reason="the disk is full", hold=hold)
    assert outage_waited(room, NOW) == "full_disk"
    # Neither a running training nor a step-away for a remote backend waits out an outage.
    assert outage_waited(t, NOW) is None
    assert outage_waited(step_away(t, NOW, reason="Replicate away", hold=hold), NOW) is None


def test_a_wait_for_room_notes_its_start_once_and_whether_its_last_wait_was_a_quota() -> None:
    """A remote run whose output expired while it waited is failed naming what it waited for
    (``room_wait_was_quota``): the note keeps when the outage began, and says the quota of the
    last wait (one noted "full" told a user over a quota to free space)."""
    _, t = claim(_queued(), owner="w", now=NOW, policy=POLICY)
    hold = timedelta(minutes=1)
    assert not room_wait_was_quota(t)
    first = wait_for_room(t, NOW, reason="quota", hold=hold, quota=True)
    assert waited_for_room_since(first) == NOW
    assert room_wait_was_quota(first)
    _, again = claim(first, owner="w", now=NOW + hold, policy=POLICY)
    later = wait_for_room(again, NOW + 2 * hold, reason="full", hold=hold)
    assert waited_for_room_since(later) == NOW  # the same outage: its start kept
    assert not room_wait_was_quota(later)
    assert room_wait_was_quota(wait_for_room(later, NOW + 3 * hold, reason="quota", hold=hold,
                                             quota=True))


# Old code: the note of a wait for room stayed until the run's step moved, which a finished run's
# never does: its output written once the quota was raised, an expiry while the object storage
# was away was told as the quota ("a disk quota ... was used up for 1 h"), long gone by then.
def test_a_wait_for_room_is_over_once_the_run_s_output_waits_for_the_object_storage() -> None:
    """``waited_for_room_since`` (and ``room_wait_was_quota``): a wait for the object storage to
    store the run's output (``wait_out(weights_of=)``) after its wait for room ends that one, the
    output having been written on the disk; also when a worker of an older release wrote that
    wait, leaving the room's note in the row (the holds' ``until`` tell which came last)."""
    hold, limit = timedelta(minutes=1), timedelta(minutes=20)
    _, t = claim(dataclasses.replace(_queued(), backend="replicate", remote_id="r1"),
                 owner="w", now=NOW, policy=POLICY)
    waited = wait_for_room(t, NOW, reason="quota", hold=hold, quota=True)
    assert waited_for_room_since(waited) == NOW
    _, again = claim(waited, owner="w", now=NOW + hold, policy=POLICY)
    away = wait_out(again, NOW + 2 * hold, reason="storage away", hold=hold, limit=limit,
                    weights_of="r1")
    assert waited_for_room_since(away) is None
    assert not room_wait_was_quota(away)
    # An older release's wait_out: the same storage note, the room's kept as it was.
    old_away = dataclasses.replace(away, metrics={**away.metrics,
                                                  ROOM_WAIT_KEY: waited.metrics[ROOM_WAIT_KEY]})
    assert waited_for_room_since(old_away) is None
    assert not room_wait_was_quota(old_away)
    # A wait for room after it is the last one again: a new outage, from its own start.
    _, third = claim(away, owner="w", now=NOW + 3 * hold, policy=POLICY)
    _, third_old = claim(old_away, owner="w", now=NOW + 3 * hold, policy=POLICY)
    for before in (third, third_old):
        full = wait_for_room(before, NOW + 3 * hold, reason="full", hold=hold)
        assert waited_for_room_since(full) == NOW + 3 * hold
        assert not room_wait_was_quota(full)
    # A wait for the photos (no output yet) says nothing of the disk's room; nor does a note of
    # an older release's wait for room (no until), taken as the last wait, as that release did.
    photos = wait_out(again, NOW + 2 * hold, reason="storage away", hold=hold, limit=limit)
    assert waited_for_room_since(photos) == NOW
    legacy = {"since": NOW.isoformat(), "remote_id": "r1", "quota": True}
    assert waited_for_room_since(dataclasses.replace(
        old_away, metrics={**old_away.metrics, ROOM_WAIT_KEY: legacy})) == NOW


def test_a_lease_lost_to_a_database_outage_is_told_by_the_outage_over_its_expiry() -> None:
    """``lost_to_database_outage``: the outage seen by the claimer must cover the lease's expiry
    (from two heartbeats before it to a lease's length after); an outage over well before (a
    live holder would have renewed since), none at all, or a hold (no heartbeat) is a dead
    holder's or the hold's, counted."""
    _, held = claim(_queued(), owner="A", now=NOW, policy=POLICY)
    expiry = held.lease_expires_at
    assert expiry is not None

    def lost(began: timedelta, ended: timedelta, t: Training = held) -> bool:
        return lost_to_database_outage(t, [(expiry + began, expiry + ended)], policy=POLICY)

    assert lost(-POLICY.ttl, timedelta(seconds=1))  # away over the expiry
    assert lost(-POLICY.heartbeat, -POLICY.heartbeat)  # back just before it: no beat since
    assert lost(POLICY.ttl, POLICY.ttl * 2)  # first met by the claimer's reconciler, late
    assert not lost(-POLICY.ttl * 3, -POLICY.heartbeat * 3)  # over well before: a dead holder
    assert not lost(POLICY.ttl * 2, POLICY.ttl * 3)  # began long after it
    assert not lost_to_database_outage(held, [], policy=POLICY)
    hold = step_away(held, NOW, reason="r", hold=timedelta(minutes=1))
    assert not lost(-POLICY.ttl, POLICY.ttl, hold)  # a hold: nobody heartbeat it
