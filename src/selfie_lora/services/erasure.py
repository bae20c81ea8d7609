"""Deleting an account and everything it owns (``selfie-lora users delete``): a photo service
that holds people's faces must be able to forget a person.

The steps, in this order, so that a process killed at any line leaves what the same command run
again (or the garbage collector) finishes, each thing deleted once:

1. refuse, changing nothing, when the store's deployment marker names another deployment than
   this database's (``GarbageCollector.check_deployment``: that deployment's blobs lie under the
   same keys), and while a training of the user is queued or running (``force``: cancel it
   through ``TrainingService.cancel`` first, and wait for its worker to stop);
2. disable the account in one transaction (``UserService.disable``): from here sign-in, API
   keys and sessions are refused everywhere, and no new upload, training or generation starts;
3. read what the user owns and the keys of their blobs (photos, originals from the datasets'
   manifests, weights, generated pictures, probes, samples, checkpoints, charts, grids), the
   prefixes holding them and the trainings' work folders: the erasure plan, joined to the one
   an earlier run stored (step 4) if it was killed after that;
4. delete every row the user owns but the user's own, and store the plan on the user's row
   (``erasure_plan``), in one transaction: from here only the plan says what the blobs were;
5. delete those blobs through the collector (``GarbageCollector.erase``): planned against the
   references as they are now, so a photo or weights another account names too is kept;
6. delete the user's row, and the plan with it.

Killed before 4: the account stays disabled and the command run again does it all. Killed
between 4 and 6: the rows are gone and the user's row (disabled) is left holding the plan: the
command run again reads it back, deletes the blobs it names that are still there (at once, not
left to a ``gc`` and its grace period) and then the user's row.

Step 2 also records when the deletion was asked for (``erasure_requested_at``): the owner of an
account deleted through the API or the web page cannot run it again (step 2 locked them out), so
``finish_pending`` (a thread of every collecting worker and of ``serve --no-worker``, and
``selfie-lora gc``) finishes a deletion asked for longer ago than a live one takes
(``resume_after``), as the command run again would, after the same check of the store's marker:
refused, every one stays pending and due, and the refusal is logged. One that fails there on an
outage is due again soon (``ERASURE_RETRY``): the object storage or the database away, or a full
disk (an outage of the machine, over once space is freed, as trainings and gc wait it out; said
once while it lasts); on anything else, which no wait mends, it is parked (``ERASURE_PARKED``)
in one ERROR line naming ``users delete``, which finishes it at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from selfie_lora.disk_space import QUOTA_ADVICE
from selfie_lora.domain.accounts import (
    ErasurePlan,
    HoldingsChangedError,
    UserHoldings,
    fold_name,
)
from selfie_lora.domain.entities import User
from selfie_lora.domain.gc import GcSummary, format_bytes
from selfie_lora.domain.lease import wait_text
from selfie_lora.errors import (
    ConflictError,
    DatabaseRefusedError,
    DatabaseUnreachableError,
    DeploymentMismatchError,
    ErrorCode,
    SelfieLoraError,
    StorageError,
    StorageUnavailableError,
    describe,
)
from selfie_lora.services.common import (
    FULL_DISK,
    QUOTA_USED_UP,
    Outage,
    refusal_said,
    refused,
    utcnow,
)
from selfie_lora.services.gc import GarbageCollector
from selfie_lora.services.layout import (
    checkpoint_prefix,
    dataset_prefix,
    dataset_quality_prefix,
    generation_prefix,
    manifest_key,
    model_quality_prefix,
    photo_key,
    sample_prefix,
    version_quality_prefix,
)
from selfie_lora.services.ports import BlobStore, Repository
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import API_KEY_CACHE_TTL, UserService

logger = logging.getLogger(__name__)

# How long ``force`` waits for a worker to stop a training it was asked to cancel (it checks
# every second or two).
STOP_WAIT = timedelta(seconds=30)
# How much longer than its two waits (API_KEY_CACHE_TTL and the stop wait) a live deletion may
# take (its rows, then its blobs: weights of GBs held and deleted) before ``finish_pending``
# takes it for one whose process died. Two runs at once would be harmless (each step is
# idempotent), only wasted work.
RESUME_MARGIN = timedelta(minutes=10)


class _StoppedError(Exception):
    """The process stops (``finish_pending``'s ``stopping``): the deletion waits for the next
    check, of this or another process."""


# How many times the rows' deletion is planned again when a row was saved while it was planned
# (``HoldingsChangedError``): the account disabled, only work under way when it was (a
# generation, an upload) adds one, so a second try is all but always the last.
PLAN_ATTEMPTS = 5

# How soon a deletion cut short by a storage error in a live process is tried again.
ERASURE_RETRY = timedelta(seconds=30)
# How long a deletion that failed on what is not an outage waits before it is tried again on
# its own (``AccountEraser._park``): the operator's to fix, and to finish with ``users delete``.
ERASURE_PARKED = timedelta(hours=24)


class ErasureContinuesError(StorageError):
    """An outage, or the database refusing for a state of its own (a read-only standby, the
    pool's connections all taken), cut the deletion short after the account was disabled: it
    is finished by the next check (``finish_pending``), soon. Answered 503 ``deletion_pending`` ("finishes
    on its own"), with no Retry-After: a retry is refused, the account being disabled.
    ``cause``: what cut it short; ``retry``: when it is due again (``_due_soon``'s wait);
    ``name``: the account's, as it is (not as typed, in another case), for a front end that says
    them in its own words (``users delete``)."""

    code = ErrorCode.DELETION_PENDING
    http_status = 503

    def __init__(self, message: str, *, cause: StorageError, retry: timedelta,
                 name: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry = retry
        self.name = name


class ErasureBlockedError(ConflictError):
    """A training of the user's stopped the deletion. The message says what happened and what
    was (not) deleted, never how to go on: that is each front end's to add in its own words
    (the CLI's ``--force``, the API's ``"force": true``, the web page's Train page), from
    ``stage``: ``"active"`` (one queued or running: nothing changed), ``"started"`` (one
    started while the account was being disabled: it is disabled, nothing else deleted) or
    ``"stopping"`` (``force`` asked it to stop and it has not yet: the account stays
    disabled)."""

    def __init__(self, message: str, *, stage: Literal["active", "started", "stopping"],
                 training_ids: Sequence[str]) -> None:
        super().__init__(message, code=ErrorCode.TRAINING_IN_PROGRESS)
        self.stage = stage
        self.training_ids = tuple(training_ids)


@dataclass(frozen=True)
class ErasureSummary:
    """What ``users delete`` removed: rows per table, the blobs (and work folders), and the
    trainings it canceled first."""

    name: str
    rows: dict[str, int] = field(default_factory=dict)
    blobs: GcSummary = field(default_factory=lambda: GcSummary(dry_run=False))
    canceled: tuple[str, ...] = ()
    user_row: bool = True

    # What the account had in storage, as its owner (and an operator who forwards the answer)
    # is told: a photo or weights kept because another account stores the same bytes is,
    # from this account's side, deleted (its reference is gone). Told apart, it would tell one
    # user that someone else uploaded that photo; the log says how many were kept.
    @property
    def blob_count(self) -> int:
        return len(self.blobs.deleted) + len(self.blobs.kept)

    @property
    def blob_bytes(self) -> int:
        return sum(p.size for p in self.blobs.deleted) + self.blobs.kept_size

    def lines(self) -> list[str]:
        out = [f"deleted user {self.name}"]
        out.extend(f"  canceled training {t}" for t in self.canceled)
        rows = ", ".join(f"{n} {table}" for table, n in self.rows.items()) or "none left"
        out.append(f"  rows: {rows}; the account itself"
                   + ("" if self.user_row else " (already gone)"))
        out.append(f"  blobs and work folders: {self.blob_count}, "
                   f"{format_bytes(self.blob_bytes)}")
        return out

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "rows": self.rows, "canceled": list(self.canceled),
                "blobs": self.blob_count, "bytes": self.blob_bytes}


class _Refusal:
    """A refusal that lasts met by ``AccountEraser.finish_pending`` (a full disk, the database's
    pool exhausted, a read-only standby), and the users whose deletion it met (said or not) while
    it lasts, as one: it is said once while it lasts (``Outage``), where each check (30 s apart,
    for hours until space is freed) said a WARNING, and it ends when a deletion goes through or
    once none of those users' deletions is refused or pending any more, since another process's
    check or the operator's ``users delete`` may finish it (where only this check's success
    ended it, and a refusal of the same kind days later was said at DEBUG only), pending as
    ``finish_pending`` reads it: dated no further ahead than ``ERASURE_PARKED``. Two fields of
    the eraser before, each changed on its own.

    Not locked: one thread alone uses it. ``finish_pending`` is all that touches it (``erase``
    and ``erase_by_id``, run by the API's threads and ``users delete``, never do), and a process
    runs it in one thread: the ``erasures`` thread of the one ``Worker`` of a ``serve`` or
    ``worker`` (its loop calls it in turn, never two at once), or ``gc``'s main thread. The
    ``Outage`` inside has its lock anyway."""

    def __init__(self) -> None:
        self._outage = Outage()
        self._users: set[str] = set()

    @property
    def users(self) -> frozenset[str]:
        """The users whose deletion the refusal met while it lasts (none: there is none)."""
        return frozenset(self._users)

    def attempt(self) -> int:
        """Before a deletion is tried: its ticket (``Outage.attempt``)."""
        return self._outage.attempt()

    def met(self, user_id: str, kind: str, *, ticket: int) -> bool:
        """``user_id``'s deletion was refused for ``kind`` (``refusal_said``): whether to say it
        (``Outage.begins_as``: once while it lasts, each kind)."""
        began, _before = self._outage.begins_as(kind, ticket=ticket)
        self._users.add(user_id)
        return began

    def went_through(self, *, ticket: int) -> None:
        """A deletion went through: the refusal is over, and the next is said."""
        self._outage.ends(ticket=ticket)
        self._users.clear()

    def not_refused(self, user_ids: Set[str]) -> None:
        """The deletions of ``user_ids`` are no longer refused (finished elsewhere, or met
        something else): once none it was met for is, it ends, and the next is said."""
        if not self._users & user_ids:
            return
        self._users -= user_ids
        if not self._users:
            self._outage.ends(ticket=self._outage.attempt())


class AccountEraser:
    def __init__(self, *, repo: Repository, blobs: BlobStore, users: UserService,
                 training: TrainingService, gc: GarbageCollector,
                 stop_wait: timedelta = STOP_WAIT,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._repo = repo
        self._blobs = blobs
        self._users = users
        self._training = training
        self._gc = gc
        self._stop_wait = stop_wait
        self._sleep = sleep
        self._clock = clock
        # A deletion asked for longer ago than this is one whose process stopped.
        self.resume_after = API_KEY_CACHE_TTL + stop_wait + RESUME_MARGIN
        # A refusal that lasts met by ``finish_pending``, and whose deletions it met.
        self._refusal = _Refusal()

    def confirmed(self, *, name: str, typed: str | None) -> bool:
        """Whether ``typed`` (the name typed again to confirm: the API's ``confirm``, the
        Settings page's field, ``users delete``'s prompt) confirms the deletion of the account
        ``name``: its name in any case, a name being one whatever its case (``fold_name``), as
        it is to sign in. Each entry point compared on its own, the API and the CLI exactly."""
        return typed is not None and fold_name(typed) == fold_name(name)

    def holdings(self, *, name: str) -> tuple[User, UserHoldings]:
        """The user and what they own (what the command asks confirmation for)."""
        user = self._users.get_by_name(name=name)
        return user, self._repo.user_holdings(user.id)

    def erase(self, *, name: str, force: bool = False) -> ErasureSummary:
        """Delete the user ``name`` and everything they own: the operator's ``users delete
        NAME`` (``erase_by_id`` otherwise)."""
        return self.erase_by_id(user_id=self._users.get_by_name(name=name).id, force=force)

    def erase_by_id(self, *, user_id: str, force: bool = False) -> ErasureSummary:
        """Delete the user whose id is ``user_id`` and everything they own (module docstring).
        By id, for a signed-in caller's own account (``DELETE /api/me``, the Settings page): by
        name, which finds the first made of two an older release let share it in another case
        (``migrate.fill_folded_names``), "Erin" deleted "erin". ``NotFound`` for no such user;
        ``ErasureBlockedError`` (nothing changed) while a training of theirs is queued or
        running, unless ``force``, which cancels it; ``DeploymentMismatchError`` (nothing
        changed) when the store is another deployment's. A ``DatabaseRefusedError`` raised as
        it is (a read-only database, the pool's connections all taken) refused the account's
        disabling, the first write and one transaction: nothing changed; met after it, the
        deletion is cut short (``ErasureContinuesError``)."""
        user = self._users.get(user_id=user_id)
        held = self._repo.user_holdings(user.id)
        # Before anything changes: a store another deployment's marker names holds that
        # deployment's blobs under the same keys (``GarbageCollector.check_deployment``).
        self._gc.check_deployment(
            action=f"delete user {user.name} (nothing of theirs was deleted or disabled)")
        if held.active_training_ids and not force:
            raise ErasureBlockedError(
                f"{user.name} has a training queued or running "
                f"({', '.join(held.active_training_ids)}): nothing was deleted",
                stage="active", training_ids=held.active_training_ids)
        # Step 2: refused everywhere from here on, and known as a deletion under way.
        self._users.disable_by_id(user_id=user.id, for_erasure=True)
        # Other API servers remember a key they found valid for API_KEY_CACHE_TTL: a request
        # let in by one would answer as a user whose rows are going (404s, or a row written
        # after the delete). Waited out once, before anything is deleted.
        self._sleep(API_KEY_CACHE_TTL.total_seconds())
        try:
            return self._finish(user, force=force)
        except (StorageUnavailableError, DatabaseRefusedError) as exc:
            # The account is disabled: a retry is refused (403), so "retry in a moment" was
            # false, and the rest waited ``resume_after`` (10 min), meant for a dead process,
            # though this one is alive. Due again soon instead, at the next check. Only what
            # passes by itself: an outage, or the database refusing for a state of its own (a
            # read-only standby's 500 "retry in a moment", the busy pool's 503 with
            # Retry-After, both a retry refused too). Another storage error (refused keys, a
            # missing bucket) never finishes on its own, and its 500 says what is wrong; a
            # full disk's 507 (below) tells the operator to free space.
            retry = self._due_soon(user)
            raise ErasureContinuesError(
                f"user {user.name}: the deletion was cut short ({exc.message}); the account is "
                f"disabled, and the deletion is tried again in {wait_text(retry)}",
                cause=exc, retry=retry, name=user.name) from exc
        except Exception as exc:
            if refused(exc):
                # A full disk (whose 507 says to free space), a refusal that lasts until the
                # operator acts: no wait of ours mends it, but once space is freed the deletion
                # finishes by itself as the checks' refusals do (``finish_pending``): due soon.
                self._due_soon(user)
            raise

    def finish_pending(self, *,
                       stopping: threading.Event | None = None) -> list[ErasureSummary]:
        """Finish every deletion asked for more than ``resume_after`` ago: its process died
        (a server killed while answering ``DELETE /api/me``), and its owner, locked out, cannot
        ask again. Each is claimed first (its time moved to now, by one process alone), so two
        processes never finish one together; one that fails now (a training that does not
        stop) is tried again ``resume_after`` later. ``stopping`` set (a worker's stop): it
        takes no further account, and leaves the one it is waiting on. One left so, or
        interrupted (Ctrl-C, SIGTERM of ``gc``), gets its earlier time back: due at once again,
        as ``gc``'s "run gc again" says. What was finished."""
        now = self._clock()
        due = now - self.resume_after
        if self._refusal.users:
            # The pending deletions dated as this code dates them, to see whether those the
            # refusal was met for still are: only while one is said, so one read as before.
            # Not every one (``pending``): one dated further ahead than any of its writes (a
            # park is the furthest, ``ERASURE_PARKED`` less ``resume_after``; the bound leaves
            # that much for clocks apart) was claimed and re-dated by a machine whose clock
            # runs fast. Never due here, it is never tried here, so it kept the refusal up for
            # good and the next one, days later, was said at DEBUG only.
            still = self._repo.pending_erasures(requested_before=now + ERASURE_PARKED)
            self._refusal.not_refused(self._refusal.users - {user.id for user in still})
            pending = [user for user in still if user.erasure_requested_at is not None
                       and user.erasure_requested_at <= due]
        else:
            pending = list(self._repo.pending_erasures(requested_before=due))
        if pending:
            try:
                # Before any is claimed: refused, each stays pending, due as it was, and is
                # finished by a process given the right storage (or this one, once fixed).
                self._gc.check_deployment(
                    action=f"finish {len(pending)} pending account deletion(s) (they stay "
                           "pending)")
            except DeploymentMismatchError as exc:
                # A refusal, not a failure: its message says what to check; no traceback.
                logger.warning("%s", exc.message)
                return []
            except StorageError as exc:
                # The marker could not be read (the store unreachable, timing out): nothing is
                # claimed, so each stays due as it was. Not raised: ``gc`` calls this after its
                # collection, which must still say what it deleted, and a worker's next check
                # tries again.
                logger.warning("the storage could not be read to finish %d pending account "
                               "deletion(s): %s; they stay pending and are tried again at the "
                               "next check of a worker, serve or gc", len(pending), exc.message)
                return []
        finished: list[ErasureSummary] = []
        for user in pending:
            if stopping is not None and stopping.is_set():
                break
            if not self._repo.request_erasure(user.id, at=now, requested_before=due):
                continue  # another process claimed it meanwhile
            ticket = self._refusal.attempt()
            try:
                # Forced: its owner asked for the deletion, and a training started since (the
                # only one a disabled account can have) must not hold it up for ever.
                finished.append(self._finish(user, force=True, stopping=stopping))
            except _StoppedError:
                self._unclaim(user, claimed_at=now)
                logger.info("user %s: the deletion is left as this process stops; the next "
                            "check goes on with it", user.name)
                break
            except StorageUnavailableError as exc:
                # An outage, which passes: due again soon, as when it first cut the deletion
                # short, and said in one line (no traceback) each time it is met. Not when the
                # database gave no answer as this process stops: the due-soon write would wait
                # on it as long again (a hung PostgreSQL: ~20-30 s a call, and a worker's stop
                # overran its 30 s grace). It then stays due from its claim, for whichever
                # process checks next (the loop ends at its stop check).
                if (isinstance(exc, DatabaseUnreachableError) and stopping is not None
                        and stopping.is_set()):
                    retry = self.resume_after
                else:
                    retry = self._due_soon(user)
                logger.warning("user %s: the deletion could not be finished now: %s; tried "
                               "again in %s", user.name, exc.message, wait_text(retry))
                # Says nothing about a refusal met before being over: a fail-over's checks
                # meet a read-only standby and the server unreachable by turns, and ending it
                # here said the refusal "said once" at WARNING every other check.
                continue
            except ErasureBlockedError as exc:  # expected (a training that does not stop yet)
                logger.warning("user %s: the deletion could not be finished now: %s; tried "
                               "again in %s", user.name, exc.message, wait_text(self.resume_after))
            except Exception as exc:
                if refused(exc):
                    self._refused(user, exc, ticket=ticket)
                    continue
                self._park(user, exc)  # not an outage: parked, said once (see ``_park``)
            except BaseException:  # KeyboardInterrupt, SystemExit: the claim is let go
                self._unclaim(user, claimed_at=now)
                raise
            else:
                self._refusal.went_through(ticket=ticket)  # the next refusal is said
                # Said once it is done, not before: while an outage lasted each retry said
                # "finishing" and then "could not be finished now", two lines where the second
                # says it all. Not "whose process stopped": one cut short by an outage is due
                # again on purpose.
                logger.warning("user %s: the pending deletion was finished (it was cut short by "
                               "an outage, or its process stopped)", user.name)
            self._refusal.not_refused({user.id})  # a training, parked: refused no more
        return finished

    def _refused(self, user: User, exc: Exception, *, ticket: int) -> None:
        """The deletion refused for a state that lasts until it passes or the operator acts
        (``services.common.refused``: a full disk, the database's pool exhausted, a read-only
        standby), as trainings, scoring and gc take it, not a fault to park for a day: parked,
        the person's data stayed up to 24 h past the freeing of space (or the load's drop, the
        fail-over's end). Due again soon, said once while it lasts (``ticket``: ``_refusal``'s),
        and again for a refusal of another kind (each kind once while they last)."""
        retry = self._due_soon(user)
        words = exc.message if isinstance(exc, SelfieLoraError) else describe(exc)
        said = refusal_said(exc)
        if said == QUOTA_USED_UP:
            # A used-up quota (EDQUOT): the disk itself may have room, so "a full disk: free
            # space" sent the operator to ``df``, which does not see the quota.
            mend = f"{QUOTA_ADVICE}, and it finishes by itself"
        elif said == FULL_DISK:
            mend = "free space and it finishes by itself"
        else:
            mend = "it finishes by itself once that is over"
        # Said once a kind as said: a disk that fills after a quota was said is said too (one
        # kind, the operator kept reading "raise the quota" while the disk was full).
        began = self._refusal.met(user.id, said, ticket=ticket)
        logger.log(logging.WARNING if began else logging.DEBUG,
                   "user %s: the deletion could not be finished now: %s; tried again in %s "
                   "(said once while it is refused for %s: %s)", user.name, words,
                   wait_text(retry), said, mend)

    def _due_soon(self, user: User) -> timedelta:
        """Make ``user``'s deletion due ``ERASURE_RETRY`` from now (best effort: the database
        away too, it stays due ``resume_after`` later). The wait it got, for the lines that say
        when it is tried again: a read-only standby refuses this write as it refused the
        deletion, and "tried again in 30 s" was said beside "stays due in 10 min 31 s"."""
        try:
            self._repo.request_erasure(
                user.id, at=self._clock() - self.resume_after + ERASURE_RETRY)
        except StorageError as exc:
            logger.warning("user %s: the deletion stays due in %s: %s", user.name,
                           wait_text(self.resume_after), exc.message)
            return self.resume_after
        return ERASURE_RETRY

    def _park(self, user: User, exc: Exception) -> None:
        """A deletion that failed on what is not an outage (refused keys, a blob file it may not
        remove, a bug): no wait mends it, so it is not tried again at each
        dead-process wait (10 min 31 s, a traceback each time, for ever) but parked:
        due ``ERASURE_PARKED`` from now (its owner asked for it: it must not be dropped should
        the operator miss the line), said in one ERROR line naming the command that finishes it
        at once once the cause is fixed. A traceback only for what is neither ours nor the
        system's (a defect to trace). One account must not hold up the others: not raised."""
        what = exc.message if isinstance(exc, SelfieLoraError) else describe(exc)
        logger.error("user %s: the deletion failed: %s; this is not an outage, so it is parked: "
                     "tried again in %s, or at once by `selfie-lora users delete %s --yes` once "
                     "the cause is fixed", user.name, what, wait_text(ERASURE_PARKED), user.name,
                     exc_info=None if isinstance(exc, SelfieLoraError | OSError) else exc)
        try:
            self._repo.request_erasure(
                user.id, at=self._clock() - self.resume_after + ERASURE_PARKED)
        except StorageError as failed:
            logger.warning("user %s: the deletion stays due in %s: %s", user.name,
                           wait_text(self.resume_after), failed.message)

    def pending(self) -> list[tuple[str, datetime]]:
        """Every deletion still pending (its account disabled): the user's name, and when the
        next check of a worker, ``serve`` or ``gc`` may finish it."""
        return [(user.name, user.erasure_requested_at + self.resume_after)
                for user in self._repo.pending_erasures()
                if user.erasure_requested_at is not None]

    def _unclaim(self, user: User, *, claimed_at: datetime) -> None:
        """Give back the claim ``finish_pending`` took (the time it moved to ``claimed_at``):
        the deletion's earlier time, compared and set, so that another process's later claim is
        kept. Best effort: left claimed, it is only tried ``resume_after`` later."""
        if user.erasure_requested_at is None:
            return
        try:
            self._repo.request_erasure(user.id, at=user.erasure_requested_at,
                                       requested_before=claimed_at)
        except Exception as exc:  # the database gone: what the claim did stays, and is said
            # In the words the other lines say a wait and an error in (a raw timedelta, and a
            # traceback for an outage, before); a traceback only for what is no storage error.
            logger.warning("user %s: the deletion stays claimed; tried again in %s: %s",
                           user.name, wait_text(self.resume_after),
                           exc.message if isinstance(exc, SelfieLoraError) else describe(exc),
                           exc_info=None if isinstance(exc, SelfieLoraError) else exc)

    def _finish(self, user: User, *, force: bool,
                stopping: threading.Event | None = None) -> ErasureSummary:
        """Steps 3 to 6 (and the stop of step 1's trainings), the account disabled."""
        canceled = self._stop_trainings(user, force=force, stopping=stopping)
        # A run killed after step 4 left its plan: the rows it was read from are gone, so it
        # alone names those blobs (the rows read now are none, or only what came after).
        stored = self._repo.erasure_plan(user.id)
        if stored is not None:
            logger.info("user %s: finishing an earlier deletion's %d key(s) and %d prefix(es)",
                        user.name, len(stored.keys), len(stored.prefixes))
        for attempt in range(1, PLAN_ATTEMPTS + 1):
            held = self._repo.user_holdings(user.id)
            plan = self._erasure_plan(held).merged(stored)
            try:
                # Refused, deleting nothing, when a row the plan was not made from would go too
                # (a generation still being made as the account was disabled, saved since
                # ``held`` was read): its pictures would be named by nothing once its row is
                # gone. Planned again from the rows as they are now; the account being
                # disabled, only work already under way adds any, so this ends quickly.
                rows = self._repo.delete_user_data(user.id, plan=plan, held=held)
                break
            except HoldingsChangedError:
                if attempt == PLAN_ATTEMPTS:
                    raise
                logger.info("user %s: a row was saved while the deletion was planned; "
                            "planning again", user.name)
        logger.info("user %s: rows deleted: %s", user.name, rows)
        blobs = self._gc.erase(keys=plan.keys, prefixes=plan.prefixes,
                               work_folders=plan.work_folders)
        gone = self._repo.delete_user(user.id)
        # The words README quotes, as gc and users delete print them: what an operator greps for.
        logger.info("deleted user %s: %d blob(s) or folder(s)", user.name, len(blobs.deleted))
        if blobs.kept:
            # The operator's detail, never the user's answer (``ErasureSummary``): content keys
            # only, no other account named.
            logger.info("user %s: kept %d blob(s) another account names too, or stored again "
                        "meanwhile: %s", user.name, len(blobs.kept), ", ".join(blobs.kept))
        return ErasureSummary(name=user.name, rows=rows, blobs=blobs, canceled=canceled,
                              user_row=gone)

    def _stop_trainings(self, user: User, *, force: bool,
                        stopping: threading.Event | None = None) -> tuple[str, ...]:
        """Cancel the user's unfinished trainings and wait for their workers to stop them. A
        training started between the first check and the disabling is one too. ``stopping``
        set ends the wait (``_StoppedError``): a worker's stop must not wait up to
        ``stop_wait`` on another worker's training."""
        active = self._repo.user_holdings(user.id).active_training_ids
        if active and not force:
            raise ErasureBlockedError(
                f"{user.name} started a training meanwhile ({', '.join(active)}); the account "
                "is disabled", stage="started", training_ids=active)
        for training_id in active:
            self._training.cancel(user=user, training_id=training_id)
        waited = 0.0
        while (still := self._repo.user_holdings(user.id).active_training_ids):
            if waited >= self._stop_wait.total_seconds():
                raise ErasureBlockedError(
                    f"asked the worker running {', '.join(still)} to stop; it has not yet "
                    f"after {waited:.0f} s", stage="stopping", training_ids=still)
            if stopping is None:
                self._sleep(1.0)
            elif stopping.wait(1.0):
                raise _StoppedError
            waited += 1.0
        # A remote run (Replicate) a cancel here ended is canceled by its backend's trainer:
        # a process without it (``gc``), or a backend that does not answer, leaves the cancel
        # owed on the training's row. Deleting that row would leave the run going, billed, and
        # storing a LoRA of her face: the deletion waits for a worker to send it.
        owed = self._training.send_owed_remote_cancels(
            training_ids=self._repo.user_holdings(user.id).training_ids)
        if owed:
            runs = ", ".join(f"{t.backend} run {t.remote_id or '(id not known yet)'} of "
                             f"training {t.id}" for t in owed)
            raise ErasureBlockedError(
                f"the {runs} could not be canceled from this process (it has no trainers, as gc, "
                "or it did not answer): the deletion is left to a worker, which cancels it "
                "first", stage="stopping", training_ids=[t.id for t in owed])
        return active

    def _erasure_plan(self, held: UserHoldings) -> ErasurePlan:
        """The keys the user's rows name, the prefixes holding the blobs their ids key
        (``services.layout``) and their trainings' work folders."""
        keys = [photo_key(h) for h in held.photo_hashes]
        keys.extend(held.weights_keys)
        keys.extend(held.image_keys)
        for dataset_id in held.dataset_ids:
            keys.extend(self._originals(dataset_id))
        prefixes = [p for d in held.dataset_ids
                    for p in (dataset_prefix(d), dataset_quality_prefix(d))]
        prefixes.extend(generation_prefix(g) for g in held.generation_ids)
        prefixes.extend(version_quality_prefix(v) for v in held.version_ids)
        for t in held.training_ids:
            prefixes.extend((sample_prefix(t), checkpoint_prefix(t)))
        if held.model_id is not None:
            prefixes.append(model_quality_prefix(held.model_id))
        # A comparison grid is keyed by two versions: of one model, so both the user's.
        mine = set(held.version_ids)
        if mine:
            prefixes.extend(
                info.key.rsplit("/", 1)[0] for info in self._blobs.list("quality/compare")
                if any(info.key.startswith(f"quality/compare/{v}-") for v in mine))
        return ErasurePlan(keys=tuple(sorted(set(keys))), prefixes=tuple(sorted(set(prefixes))),
                           work_folders=tuple(sorted(set(held.training_ids))))

    def _originals(self, dataset_id: str) -> list[str]:
        """The originals a dataset's manifest names (the row does not)."""
        try:
            manifest = json.loads(self._blobs.get(manifest_key(dataset_id)))
            return [str(p["original"]) for p in manifest["photos"] if p.get("original")]
        except (SelfieLoraError, ValueError, KeyError, TypeError):
            logger.warning("users delete: the manifest of dataset %s cannot be read; its "
                           "originals are left to the garbage collection", dataset_id)
            return []
