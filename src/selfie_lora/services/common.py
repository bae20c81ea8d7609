"""Small helpers shared by the services: clock, ids, and a per-user count of work under way."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from selfie_lora.disk_space import QUOTA_ADVICE, is_full_error, is_quota_error
from selfie_lora.domain.plan import TrainingDefaults, pin_for_training
from selfie_lora.errors import (
    BlobStoreUnreachableError,
    DatabaseLockedError,
    DatabaseRefusedError,
    DatabaseUnreachableError,
    InvalidInputError,
    SelfieLoraError,
    StorageError,
    StorageFullError,
    describe,
)

if TYPE_CHECKING:
    from selfie_lora.domain.entities import Model, Training, Version
    from selfie_lora.domain.likeness import LikenessSummary
    from selfie_lora.services.ports import Repository

logger = logging.getLogger(__name__)

# The audit event of an explicit re-pin (ModelService.change): the user's pin from then on.
REPINNED_EVENT = "trainer_version_changed"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


# A page of a list that grows with use (versions, the training log, the generations gallery):
# at most this many.
PAGE_MAX = 200


def page_limit(limit: int) -> int:
    if not 1 <= limit <= PAGE_MAX:
        raise InvalidInputError(f"limit must be 1 to {PAGE_MAX}")
    return limit


@dataclass(frozen=True)
class ModelHistory:
    """A model's versions (newest first), their likeness records by version id (summaries: no
    probe results) and its trainings, read once: the Versions page shows them in four ways
    (table, photo counts, comparison, training log), and reading them again for each cost the
    same rows four times."""

    model: Model
    versions: Sequence[Version]
    records: dict[str, LikenessSummary]
    trainings: Sequence[Training]


def read_history(repo: Repository, model: Model) -> ModelHistory:
    """``model`` with its versions, likeness summaries and trainings, each read once."""
    return ModelHistory(model=model, versions=repo.list_versions(model.id),
                        records={r.version_id: r for r in repo.list_likeness_summaries(model.id)},
                        trainings=repo.list_trainings(model.id))


@dataclass(frozen=True)
class PinFacts:
    """What ``plan_training`` needs to know of a model's past to decide its pin."""

    trained_before: bool
    repinned_by_user: bool

    @property
    def fixed(self) -> bool:
        """Whether the pin is the model's own already: else its first training takes the
        configured one."""
        return self.trained_before or self.repinned_by_user


def pin_facts(repo: Repository, model: Model, *,
              trainings: Sequence[Training] | None = None) -> PinFacts:
    """Whether ``model`` has had a training (of any outcome), and else whether its user re-pinned
    it explicitly: either fixes its trainer version; otherwise its first training takes the
    configured one (contract invariant 3). ``trainings``: the model's, where the caller has
    read them in this transaction already (a start's busy check), else read here."""
    if trainings is None:
        trainings = repo.list_trainings(model.id)
    trained_before = bool(trainings)
    return PinFacts(trained_before=trained_before, repinned_by_user=not trained_before and (
        repo.count_events(model.id, kind=REPINNED_EVENT) > 0))


def next_training_pin(repo: Repository, model: Model, defaults: TrainingDefaults, *,
                      trainings: Sequence[Training] | None = None) -> Model:
    """``model`` as its next training is pinned: what its photos are prepared and checked for,
    and what a start refuses (``TrainingService.start_refusal``). ``trainings`` as for
    ``pin_facts``."""
    facts = pin_facts(repo, model, trainings=trainings)
    return pin_for_training(model, defaults, trained_before=facts.trained_before,
                            repinned_by_user=facts.repinned_by_user)


class PerUserSlots:
    """How many of something each user has under way in this process, ``limit`` at most (a
    user's generations, a user's uploads being taken in). ``take`` one, or get the error
    ``refused(held)`` makes; ``release`` it when done (``hold``: both around a block). A user
    with none under way has no entry left."""

    def __init__(self, limit: int, *, refused: Callable[[int], SelfieLoraError]) -> None:
        self._limit = limit
        self._refused = refused
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, user_id: str) -> None:
        with self._lock:
            held = self._held.get(user_id, 0)
            if held >= self._limit:
                raise self._refused(held)
            self._held[user_id] = held + 1

    def release(self, user_id: str) -> None:
        with self._lock:
            left = self._held.get(user_id, 0) - 1
            if left > 0:
                self._held[user_id] = left
            else:
                self._held.pop(user_id, None)

    def held(self, user_id: str) -> int:
        with self._lock:
            return self._held.get(user_id, 0)

    @contextmanager
    def hold(self, user_id: str) -> Iterator[None]:
        self.take(user_id)
        try:
            yield
        finally:
            self.release(user_id)


class EnqueueListeners:
    """What an ``EnqueueBell`` queue calls after each of its enqueues: the waiting workers of
    this process (``Worker``), each added with ``add`` and removed by the call it returns."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add(self, listener: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def ring(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        # After the message is stored: a listener's exception escaping here made the enqueue
        # look failed ("could not be queued now") and left the later listeners unrung.
        for listener in listeners:
            try:
                listener()
            except Exception:
                logger.exception("a listener of the queue's enqueues failed; the message is "
                                 "queued, and the workers find it at their next poll")


class Outage:
    """Whether a dependency (the queue) is in an outage that was already logged: a loop that
    retries it every second says its start once and its end once, instead of a line (or a
    traceback) at every retry. Shared by threads.

    Each call takes a ticket (``attempt``) before it tries, and its result counts only if the
    outage neither began nor ended since: a slow read (a connect timeout) that started during an
    outage and failed after another thread's read had ended it began that outage again, a second
    warning and recovery for one outage (diffweb review 3); the same for a success that started
    before the outage began."""

    def __init__(self) -> None:
        self._down = False
        self._kind = ""  # what the outage was said as (``begins_as``)
        # Every kind said since the outage began: one met again is not said again (two that
        # alternate, a fail-over's pool timeouts and read-only standby by turns, said a WARNING
        # at every call), until the outage ends.
        self._said: set[str] = set()
        self._changes = 0  # how many times an outage began, changed kind or ended: a ticket
        self._lock = threading.Lock()

    def attempt(self) -> int:
        """Before a call: its ticket, for ``begins`` or ``ends`` after it."""
        with self._lock:
            return self._changes

    def begins(self, *, ticket: int) -> bool:
        """A call failed: True when this starts the outage (say it), False while it lasts or
        when the call started before the last recovery (it says nothing of the queue since)."""
        return self.begins_as("", ticket=ticket)[0]

    def begins_as(self, kind: str, *, ticket: int) -> tuple[bool, str]:
        """A call failed for ``kind`` (what keeps failing it, in words): whether to say it (True
        when this starts the outage, or when the outage was said as another kind: what the
        operator was told to mend is no longer what fails the calls, unless that kind was said
        already since the outage began), and the kind said before ("" when this starts it).
        False as in ``begins`` for a call of a stale ticket."""
        with self._lock:
            if ticket != self._changes or (self._down and kind == self._kind):
                return False, self._kind
            before = self._kind if self._down else ""
            if not self._down:
                self._said.clear()
            said = kind not in self._said
            self._down = True
            self._kind = kind
            self._said.add(kind)
            self._changes += 1
            return said, before

    def ends(self, *, ticket: int) -> bool:
        """A call succeeded: True when it ends an outage (say so); False when there is none, or
        the call started before the outage began (the next one, started since, ends it)."""
        return self.ends_as(ticket=ticket) is not None

    def ends_as(self, *, ticket: int) -> str | None:
        """``ends``, saying the kind the outage it ends was met as last (``begins_as``; "" for
        ``begins``), None where ``ends`` is False: read as it ends, under the lock, for the line
        that says it over in the words of what failed. Kept apart by a caller, that kind was
        written by one thread after the outage began and read by another as it ended."""
        if not self._down:  # read without the lock: the usual case, at every call
            return None
        with self._lock:
            if not self._down or ticket != self._changes:
                return None
            kind = self._kind
            self._down = False
            self._kind = ""
            self._said.clear()
            self._changes += 1
            return kind


class LoopOutages:
    """A loop's failures, an outage said as one: the database unreachable
    (``DatabaseUnreachableError``) and the object storage unreachable
    (``BlobStoreUnreachableError``) are each said once at WARNING when they begin (``Outage``),
    their own words and no traceback, at DEBUG at each retry, and their end once at INFO, where
    every round logged a traceback while PostgreSQL was down (and a WARNING while S3 was). So is
    a refusal that lasts (``refused``: a full disk, the database's or this machine's, a used-up
    quota, the pool's connections all taken, a read-only standby), its traceback at DEBUG at
    each retry.
    Any other error keeps its traceback (a defect to see), except, with
    ``refusals_are_outages``, any other ``StorageError``: said as a refusal."""

    def __init__(self, loop: str, *, retried: str, refusals_are_outages: bool = False) -> None:
        self._loop = loop  # "reconciling trainings", ...
        self._retried = retried  # "tried again in 10 s", ...
        self._outage = Outage()
        self._storage = Outage()
        self._refusals_are_outages = refusals_are_outages
        self._refused = Outage()

    @contextmanager
    def watch(self, *, failed: str) -> Iterator[None]:
        """Runs the block; an error of it is logged (``failed``: its words when it is not an
        outage) and not raised."""
        ticket = self._outage.attempt()
        storage_ticket = self._storage.attempt()
        refused_ticket = self._refused.attempt()
        try:
            yield
        except DatabaseUnreachableError as exc:
            began = self._outage.begins(ticket=ticket)
            logger.log(logging.WARNING if began else logging.DEBUG,
                       "%s: the database cannot be reached (%s); %s (its end is logged)",
                       self._loop, exc.message, self._retried)
            return
        except BlobStoreUnreachableError as exc:
            # The object storage away: expected, its own words in one line (a traceback of ~45
            # lines, obstore's debug dump in it, said nothing more), once an outage.
            began = self._storage.begins(ticket=storage_ticket)
            logger.log(logging.WARNING if began else logging.DEBUG,
                       "%s: %s; %s (its end is logged)", failed, exc.message, self._retried)
            return
        except Exception as exc:
            if not (refused(exc) or (self._refusals_are_outages
                                     and isinstance(exc, StorageError))):
                logger.exception("%s; %s", failed, self._retried)
                return
            # What refuses the round is a state that lasts (a disk to free, a pool too small, a
            # fail-over's read-only standby): a traceback at every round (the reconciler's every
            # 10 s) said nothing more. The presence loop, whose round is one small write of its
            # own, takes any storage error so. The traceback stays at DEBUG for whoever debugs.
            # A refusal of another kind than the one said (the disk freed, then a fail-over's
            # read-only standby met before a round went through) is said too, naming the one
            # it takes over from: at DEBUG only, the operator would still read the first one's.
            # Each kind once until a round goes through (``Outage.begins_as``).
            # A used-up quota (EDQUOT) told apart from a full disk (``refusal_said``), as the
            # training heartbeat says it: "refused for a full disk" sent the operator to free
            # space ``df`` shows is there, where the quota is to be raised.
            kind = refusal_said(exc)
            began, before = self._refused.begins_as(kind, ticket=refused_ticket)
            words = exc.message if isinstance(exc, SelfieLoraError) else describe(exc)
            was = f"; it was refused for {before} until now" if began and before else ""
            if began and kind == QUOTA_USED_UP:
                was += f"; {QUOTA_ADVICE}"
            elif began and isinstance(exc, DatabaseRefusedError) and exc.pool_exhausted:
                # The pool's words point at its size alone; a connection a defect never gives
                # back exhausts it too (once an ERROR with its traceback each round).
                was += ("; SELFIE_LORA_DB_POOL_SIZE too small for the load, or, if raising it "
                        "does not help, a connection held by a defect (a leak)")
            elif began and isinstance(exc, DatabaseLockedError) and exc.lock:
                # SQLite's busy timeout, PostgreSQL's lock_timeout: the lock alone (SQLite has
                # no statement timeout nor a backend to cancel, review 7).
                was += ("; a transaction elsewhere holds a lock it needs (a long command, a "
                        "backup, another process)")
            elif began and isinstance(exc, DatabaseLockedError):
                # Nothing of this process's to resize: what holds the lock is elsewhere. 57014
                # is an outside cancel too (told apart by words only, which lc_messages may
                # translate): one cause among three, not a timeout alone (review 4).
                was += ("; a transaction elsewhere holds a lock it needs (a long command, a "
                        "backup, another process), the statement is slower than the statement "
                        "timeout (a server too loaded, a large database: "
                        "SELFIE_LORA_DB_STATEMENT_TIMEOUT), or it was cancelled from outside "
                        "(pg_cancel_backend, a pooler's query_timeout)")
            logger.log(logging.WARNING if began else logging.DEBUG,
                       "%s: %s; %s (its end is logged%s)", failed, words, self._retried, was,
                       exc_info=not began)
            return
        if self._refused.ends(ticket=refused_ticket):
            logger.info("%s: goes through again after the storage refused it", self._loop)
        if self._outage.ends(ticket=ticket):
            logger.info("%s: the database answers again", self._loop)
        # A round that went through: the storage is back, or this round did not need it (one
        # with nothing to do); either way the loop is no longer held up by it.
        if self._storage.ends(ticket=storage_ticket):
            logger.info("%s: goes through again after the object storage outage", self._loop)


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal that lasts until it passes or the operator acts, not a
    defect: a full disk (``StorageFullError``, or an ``OSError`` ENOSPC or EDQUOT no adapter
    mapped: a hold's copy, a work folder) or the database refusing for a state of its own
    (``DatabaseRefusedError``: its pool exhausted, a read-only standby, a lock or a statement
    kept waiting past its bound)."""
    return isinstance(exc, (StorageFullError, DatabaseRefusedError)) or is_full_error(exc)


FULL_DISK = "a full disk"  # ``refusal_kind``'s for StorageFullError or an OSError ENOSPC
POOL_TAKEN = "the database's connections all taken"  # its for DatabaseBusyError's pool
# ... for DatabaseLockedError: a lock held elsewhere, a statement past its timeout or cancelled.
# Both named: "past the database's timeout" alone said a timeout for SQLite's busy lock and
# PostgreSQL's 55P03 too (a lock, where SQLite has no statement timeout).
KEPT_WAITING = "statements kept waiting by a lock or past the database's timeout"


def refusal_kind(exc: BaseException) -> str:
    """What refuses, in words, as a loop tells one refusal from another (``LoopOutages``): each
    asks the operator for something else. Not its message, which changes with the statement
    refused (a read-only standby's UPDATE, then INSERT)."""
    if isinstance(exc, StorageFullError) or is_full_error(exc):
        return FULL_DISK
    if isinstance(exc, DatabaseLockedError):
        return KEPT_WAITING
    if isinstance(exc, DatabaseRefusedError):
        return (POOL_TAKEN if exc.pool_exhausted
                else "a read-only database")
    return "a storage error"  # the presence loop's, any other StorageError


# ``refusal_said``'s for a used-up quota (EDQUOT, or a ``StorageFullError`` of one).
QUOTA_USED_UP = "a used-up disk quota"


def refusal_said(exc: BaseException) -> str:
    """``refusal_kind`` as a line says it to the operator (a training's heartbeat,
    ``LoopOutages``, an account deletion's): a used-up quota told apart from a full disk
    (``QUOTA_USED_UP``), since the disk itself may have room (``df`` does not see a quota) and
    the mend is to raise the quota, not to free space."""
    kind = refusal_kind(exc)
    if kind == FULL_DISK and (is_quota_error(exc)
                              or (isinstance(exc, StorageFullError) and exc.quota)):
        return QUOTA_USED_UP
    return kind
