"""A worker that holds a training's lease and meets a fault (see "What survives a crash" in the
README): another worker of the same machine takes the training over while this one still runs
it (the earlier attempt leaves the later one alone); a renewal of the lease fails with what
nobody expected (the heartbeat goes on); the database fails a write of the training's progress
(the worker steps away and the next attempt finishes the training), also the write of the
likeness gate's decision (the training then succeeds with no error)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.config import Settings
from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.errors import (
    DatabaseLockedError,
    DatabaseRefusedError,
    DatabaseUnreachableError,
    SelfieLoraError,
    StorageError,
    StorageFullError,
)
from selfie_lora.services.checkpoints import TrainingCheckpoints
from selfie_lora.services.common import Outage
from selfie_lora.services.layout import checkpoint_step, photo_key
from selfie_lora.services.ports import (
    GenerationJob,
    ProgressSink,
    TrainingJob,
    TrainingResult,
)
from selfie_lora.services.training import (
    DATABASE_LOCKED,
    DATABASE_UNREACHABLE,
    STORAGE_UNREACHABLE,
    TrainingService,
    _Held,
    _Sink,
)
from selfie_lora.testing.fakes import (
    FakeGenerator,
    FakeTrainer,
    RecordingTelemetry,
    SimulatedCrash,
)
from selfie_lora.wiring import Services, build_services, training_defaults
from selfie_lora.worker import Identity, Worker
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip
from tests.support.processes import run_killed, services_script


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class FailingRenewals(SqlRepository):
    """The database, but its next ``failures`` renewals of a lease raise an error that no
    adapter translated (a bug, a vendor's error the repository did not know)."""

    def __init__(self, engine: Engine, *, failures: int) -> None:
        super().__init__(engine)
        self.failures = failures
        self.renewals = 0

    def renew_lease(self, training_id: str, **lease: Any) -> bool:
        self.renewals += 1
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("not a SelfieLoraError")
        return super().renew_lease(training_id, **lease)


class Blinking(SqlRepository):
    """The database, but once armed (``fail_in``), the ``fail_in``-th transaction from then on
    fails as one that blinked does, raised as the repository raises it: SQLite's write lock
    held past its busy timeout (``DatabaseLockedError``, counted), or with ``cut`` a fail-over's
    cut connection (``DatabaseUnreachableError``, waited out uncounted). "database is locked"
    was raised here as a plain ``StorageError``, which the repository never raises."""

    def __init__(self, engine: Engine, *, cut: bool = False) -> None:
        super().__init__(engine)
        self.fail_in = 0
        self.cut = cut

    @contextmanager
    def atomic(self) -> Iterator[SqlRepository]:
        if self.fail_in > 0:
            self.fail_in -= 1
            if self.fail_in == 0:
                if self.cut:
                    raise DatabaseUnreachableError("database error: terminating connection due "
                                                   "to administrator command")
                raise DatabaseLockedError("database error: database is locked", lock=True)
        with super().atomic() as tx:
            yield tx


class Machine:
    """Workers of one machine: one database, one HOME (so one work folder), a service each."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: list[Services] = []

    def worker(self, trainer: FakeTrainer, *, generator: FakeGenerator | None = None) -> Services:
        svc = build_services(self.settings, trainers={"local": trainer},
                             face_analyzer=one_person_analyzer(),
                             generators={"local": generator or FakeGenerator()},
                             telemetry=RecordingTelemetry())
        self.workers.append(svc)
        return svc

    def training_service(self, svc: Services, repo: SqlRepository) -> TrainingService:
        """``svc``'s training service, on ``repo``."""
        return TrainingService(repo=repo, blobs=svc.blobs, queue=svc.queue,
                               trainers=svc.trainers,
                               defaults=lambda: training_defaults(self.settings),
                               work_dir=self.settings.work_dir, likeness=svc.likeness,
                               lease=self.settings.lease_policy)

    def close(self) -> None:
        for svc in self.workers:
            svc.close()


def queued_for_ann(svc: Services) -> str:
    """The id of a training queued by a new user's upload."""
    user, _ = svc.users.create(name="ann")
    started = svc.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    return started.training.id


def row(svc: Services, training_id: str) -> Training:
    found = svc.repo.get_training(training_id)
    assert found is not None
    return found


def _machine(tmp_path: Path, *, heartbeat_seconds: float, lease_seconds: float) -> Iterator[Machine]:
    m = Machine(make_settings(tmp_path, heartbeat_seconds=heartbeat_seconds,
                              lease_seconds=lease_seconds))
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    # Heartbeats minutes apart: a lease ends only when the test ends it, never by a late beat.
    yield from _machine(tmp_path, heartbeat_seconds=300, lease_seconds=600)


@pytest.fixture
def beating(tmp_path: Path) -> Iterator[Machine]:
    """A machine whose heartbeats come fast (50 a second)."""
    yield from _machine(tmp_path, heartbeat_seconds=0.02, lease_seconds=60)


def test_a_worker_taken_over_leaves_the_later_attempts_folder_alone(machine: Machine) -> None:
    """Worker A's lease ends while A still runs the training (its heartbeats were late); worker
    B, on the same machine, takes it over. A then stops: it removes its own attempt's folder,
    not B's, and B's training ends as if A had never been there."""
    gate_a, gate_b = threading.Event(), threading.Event()
    trainer_a, trainer_b = FakeTrainer(gate=gate_a, steps=1), FakeTrainer(gate=gate_b, steps=1)
    a, b = machine.worker(trainer_a), machine.worker(trainer_b)
    user, _ = a.users.create(name="ann")
    started = a.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    training_id = started.training.id
    stop_a = threading.Event()
    run_a = threading.Thread(target=a.training.run, args=(training_id,),
                             kwargs={"owner": "A", "stopping": stop_a})
    run_b = threading.Thread(target=b.training.run, args=(training_id,), kwargs={"owner": "B"})
    run_a.start()
    try:
        _until(lambda: len(trainer_a.jobs) == 1)
        folder_a = trainer_a.jobs[0].work_dir

        b.training.reconcile(dead_owners=("A",))  # A's lease ends (A is alive, unaware)
        run_b.start()
        _until(lambda: len(trainer_b.jobs) == 1)
        folder_b = trainer_b.jobs[0].work_dir
        assert folder_b != folder_a
        assert not folder_a.exists()  # an earlier attempt's folder is of no use to B

        stop_a.set()  # A notices at its next safe point, cleans up, finds the training not its own
        run_a.join(10)
        assert not run_a.is_alive()
        assert folder_b.is_dir()

        gate_b.set()
        run_b.join(10)
        assert not run_b.is_alive()
    finally:  # no thread outlives a failed assertion
        stop_a.set()
        gate_a.set()
        gate_b.set()
        run_a.join(10)
        if run_b.ident is not None:
            run_b.join(10)
    final = b.repo.get_training(training_id)
    assert final is not None
    assert (final.status, final.attempt, final.error) == (TrainingStatus.SUCCEEDED, 2, None)
    assert not folder_b.parent.exists()  # the last attempt takes the training's folder with it


def test_a_heartbeat_goes_on_after_an_error_nobody_expected(
        beating: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """A heartbeat whose renewal raised anything but a SelfieLoraError used to end for good:
    the training went on under a lease nobody renewed, and another worker took it over while
    this one still ran it. It tries again at the next beat, as after a database error."""
    svc = beating.worker(FakeTrainer())
    repo = FailingRenewals(svc.engine, failures=2)
    worker = beating.training_service(svc, repo)
    user, _ = svc.users.create(name="ann")
    started = svc.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    held = worker._claim(started.training.id, owner="A", stopping=threading.Event())
    assert held is not None
    claimed = svc.repo.get_training(started.training.id)
    assert claimed is not None
    assert claimed.heartbeat_at is not None
    with held.heartbeat():
        _until(lambda: repo.renewals >= 5, timeout=5)
    assert not held.lost.is_set()
    renewed = svc.repo.get_training(started.training.id)
    assert renewed is not None
    assert renewed.heartbeat_at is not None
    assert renewed.heartbeat_at > claimed.heartbeat_at
    failures = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info is not None for r in failures)  # a bug shows its traceback


class FullDiskRenewals(SqlRepository):
    """The database, but while ``full`` its renewals of a lease fail as on a full disk
    (SQLite's "database or disk is full", PostgreSQL's disk_full), or with ``quota`` as over a
    used-up disk quota (``StorageFullError.quota``)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.full = False
        self.quota = False
        self.failed = 0
        self.renewed = 0

    def renew_lease(self, training_id: str, **lease: Any) -> bool:
        if self.full and self.quota:
            self.failed += 1
            raise StorageFullError("database error: the quota of this account on the disk "
                                   "holding /srv/selfie-lora.db is used up (the disk itself has "
                                   "2.0 GB free): database or disk is full", quota=True)
        if self.full:
            self.failed += 1
            raise StorageFullError("database error: the disk holding /srv/selfie-lora.db is "
                                   "full (0 KB free): database or disk is full")
        kept = super().renew_lease(training_id, **lease)
        self.renewed += 1
        return kept


_R = TypeVar("_R", bound=SqlRepository)


def _held_by_a(beating: Machine, make_repo: Callable[[Engine], _R]
               ) -> tuple[Services, _R, TrainingService, str, _Held]:
    """A worker on ``make_repo``'s repository that has claimed ann's queued training as A: the
    services, that repository, the worker, the training's id and its hold (beats not begun)."""
    svc = beating.worker(FakeTrainer())
    repo = make_repo(svc.engine)
    worker = beating.training_service(svc, repo)
    training_id = queued_for_ann(svc)
    held = worker._claim(training_id, owner="A", stopping=threading.Event())
    assert held is not None
    return svc, repo, worker, training_id, held


def _beats_refused(held: _Held, caplog: pytest.LogCaptureFixture, *,
                   refuse: Callable[[bool], None], refused: Callable[[], int],
                   renewed: Callable[[], int]) -> list[logging.LogRecord]:
    """``held``'s heartbeat with its renewals refused (``refuse(True)``) for six beats, then
    three renewals once they go through again: what its failed beats said."""
    caplog.set_level(logging.DEBUG, logger="selfie_lora.services.training")
    with held.heartbeat():
        refuse(True)
        _until(lambda: refused() >= 6, timeout=5)
        refuse(False)
        _until(lambda: renewed() >= 3, timeout=5)
    return [r for r in caplog.records if "heartbeat failed" in r.getMessage()]


def test_a_heartbeat_on_a_full_database_disk_says_it_once_and_its_end_once(
        beating: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """Every beat (every 5 s per running training) logged a WARNING "heartbeat failed: ...
    database or disk is full" while the database's disk stayed full. Now its start is said
    once (WARNING), the beats between at DEBUG, and its end once (INFO), as an outage of the
    database server is."""
    _svc, repo, worker, _id, held = _held_by_a(beating, FullDiskRenewals)
    beats = _beats_refused(held, caplog, refuse=lambda on: setattr(repo, "full", on),
                           refused=lambda: repo.failed, renewed=lambda: repo.renewed)
    assert not held.lost.is_set()
    assert len(beats) >= 6
    assert [r.levelno for r in beats if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert all(r.exc_info is None for r in beats)
    ends = [r for r in caplog.records if "takes writes again" in r.getMessage()]
    assert [r.levelno for r in ends] == [logging.INFO]
    # Noted as the database away, ended by the renewals after it: a take-over of a lease that
    # ran out meanwhile counts no attempt (old code: no span, the full disk not noted).
    after = datetime.now(UTC)
    assert [ended < after for _, ended in worker._database_away.spans(after)] == [True]


@pytest.mark.parametrize(("quota", "lasts", "over"), [
    (True, "said once while the disk quota stays used up: raise the quota or delete files it "
           "counts; its end is logged", "the database's disk quota takes writes again"),
    (False, "said once while the disk stays full; its end is logged",
     "the database's disk takes writes again"),
], ids=["quota", "full"])
def test_a_heartbeat_over_a_used_up_quota_says_the_quota_not_a_full_disk(
        beating: Machine, caplog: pytest.LogCaptureFixture, quota: bool, lasts: str,
        over: str) -> None:
    """A quota is not a full disk: the operator raises it (``df`` shows room the quota does not
    give). The heartbeat said "the disk stays full" and "the database's disk takes writes
    again" for a used-up quota too (``refusal_kind`` folds it into a full disk)."""
    _svc, repo, _worker, training_id, held = _held_by_a(beating, FullDiskRenewals)
    repo.quota = quota
    beats = _beats_refused(held, caplog, refuse=lambda on: setattr(repo, "full", on),
                           refused=lambda: repo.failed, renewed=lambda: repo.renewed)
    said = [r.getMessage() for r in beats if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    # Old code, for the quota: "(said once while the disk stays full; ...)".
    assert said[0].endswith(f"({lasts})"), said[0]
    ends = [r.getMessage() for r in caplog.records if "takes writes again" in r.getMessage()]
    assert ends == [f"training {training_id}: {over}"]


class CountedRenewals(SqlRepository):
    """The database, counting the renewals of a lease and what they answered."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.answers: list[bool] = []

    def renew_lease(self, training_id: str, **lease: Any) -> bool:
        kept = super().renew_lease(training_id, **lease)
        self.answers.append(kept)
        return kept


def test_a_heartbeat_after_its_training_ended_warns_of_no_lost_lease(
        beating: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """Review repro: "lease lost (attempt 1)" was logged as a WARNING right after "training ...
    succeeded": the training's end released the lease before its heartbeat stopped."""
    svc, repo, worker, training_id, held = _held_by_a(beating, CountedRenewals)
    caplog.set_level("DEBUG", logger="selfie_lora.services.training")
    with held.heartbeat():
        _until(lambda: len(repo.answers) >= 2, timeout=5)
        # the training's own end releases the lease while this worker is still in it
        worker._finish_failed(held, user_message="x", reason="x", code="training_failed")
        _until(lambda: False in repo.answers, timeout=5)
    assert row(svc, training_id).status is TrainingStatus.FAILED
    assert not [r for r in caplog.records
                if r.levelname == "WARNING" and "lease lost" in r.getMessage()]
    assert any("has ended; its heartbeat stops" in r.getMessage() for r in caplog.records)


def test_a_heartbeat_that_really_lost_its_lease_still_warns(
        beating: Machine, caplog: pytest.LogCaptureFixture) -> None:
    svc, repo, _worker, training_id, held = _held_by_a(beating, CountedRenewals)
    with held.heartbeat():
        _until(lambda: len(repo.answers) >= 1, timeout=5)
        # another worker's attempt holds it now
        with svc.repo.atomic() as tx:
            current = tx.get_training(training_id, for_update=True)
            assert current is not None
            tx.save_training(dataclasses.replace(current, lease_owner="B",
                                                 attempt=current.attempt + 1))
        _until(held.lost.is_set, timeout=5)
    assert any(r.levelname == "WARNING" and "lease lost" in r.getMessage()
               for r in caplog.records)


def test_a_database_that_blinks_interrupts_a_training_and_does_not_fail_it(
        beating: Machine) -> None:
    """One failed write of a local training's progress used to fail the training ("The
    training could not run: database error: ..."), though the heartbeat takes the same error
    for a passing one. The worker steps away instead, as from an outage of a remote run: the
    attempt is counted, the row says why meanwhile, and the next attempt finishes it."""
    trainer = FakeTrainer(steps=3)
    svc = beating.worker(trainer)
    repo = Blinking(svc.engine)
    worker = beating.training_service(svc, repo)

    def arm(job: TrainingJob) -> None:
        if len(trainer.jobs) == 1:
            repo.fail_in = 3  # its start and first step are written, its second is not
    trainer.on_train = arm
    training_id = queued_for_ann(svc)

    worker.run(training_id, owner="A")
    waiting = row(svc, training_id)
    assert (waiting.status, waiting.step, waiting.attempt, waiting.error) == (
        TrainingStatus.PROCESSING, 1, 1, DATABASE_LOCKED)
    assert training_id in svc.queue.queued_training_ids()  # rung again at once

    worker.run(training_id, owner="A")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.recoveries, final.error) == (
        TrainingStatus.SUCCEEDED, 2, 1, None)
    assert len(trainer.jobs) == 2


class DatabaseDown(SqlRepository):
    """The database, but once armed (``fail_in``), from the ``fail_in``-th transaction on the
    next ``down_for`` transactions fail as with PostgreSQL stopped (refused connections)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.fail_in = 0
        self.down_for = 0

    @contextmanager
    def atomic(self) -> Iterator[SqlRepository]:
        if self.fail_in > 0:
            self.fail_in -= 1
        if self.fail_in == 0 and self.down_for > 0:
            self.down_for -= 1
            raise DatabaseUnreachableError("database error: connection failed: Connection "
                                           "refused")
        with super().atomic() as tx:
            yield tx


@pytest.mark.parametrize("recorded", [True, False], ids=["step-away-written", "database-away"])
def test_database_outages_spend_none_of_a_training_s_attempts(
        beating: Machine, recorded: bool) -> None:
    """A PostgreSQL restart made the worker step away, counted as a take-over from a dead worker
    (the step-away's own write failing too, the worker took it over "from itself"): two routine
    restarts failed every running training, "interrupted 3 times because the worker running it
    stopped unexpectedly" (found in review). Outages of the database spend no attempt, whether
    the step-away could be written or not."""
    trainer = FakeTrainer(steps=3)
    svc = beating.worker(trainer)
    repo = DatabaseDown(svc.engine)
    worker = beating.training_service(svc, repo)
    outages = 4  # more than SELFIE_LORA_MAX_ATTEMPTS (3), each before any progress

    def arm(job: TrainingJob) -> None:
        if len(trainer.jobs) <= outages:
            # Its start is written, its first step is not (and with the database away, neither
            # is the step-away).
            repo.fail_in, repo.down_for = 2, (1 if recorded else 1000)
    trainer.on_train = arm
    training_id = queued_for_ann(svc)

    for attempt in range(1, outages + 1):
        worker.run(training_id, owner="A")
        repo.down_for = 0  # the database is back
        waiting = row(svc, training_id)
        assert (waiting.status, waiting.attempt) == (TrainingStatus.STARTING, attempt)
        if recorded:
            assert (waiting.lease_owner, waiting.error) == (None, DATABASE_UNREACHABLE)
        else:  # its lease runs out (here: ended at once), and the reconciler rings
            worker.reconcile(dead_owners=("A",))
    worker.run(training_id, owner="A")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.recoveries, final.error) == (
        TrainingStatus.SUCCEEDED, outages + 1, 0, None)


class FailingReconcile(SqlRepository):
    """The database, but while ``failing`` is set its read of the active trainings (the
    reconciler's first) raises it: PostgreSQL stopped, or a full disk."""

    failing: SelfieLoraError | None = None

    def active_trainings(self) -> Any:
        if self.failing is not None:
            raise self.failing
        return super().active_trainings()


# The reconciler's outages: the server away, and SQLite's "database or disk is full".
AWAY = DatabaseUnreachableError("database error: connection failed: Connection refused")
DISK_FULL = StorageFullError("database error: the disk holding /srv/selfie-lora.db is full: "
                             "database or disk is full")


@pytest.mark.parametrize("seen", [True, False], ids=["outage-seen", "holder-died"])
def test_a_take_over_by_another_worker_after_a_database_outage_spends_no_attempt(
        beating: Machine, seen: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Worker A met a database outage and could not write even its step-away: its lease ran
    out while the database was away. Only A's own next claim counted nothing
    (``_left_uncounted``): worker B's reconciler rang, B took it over "from A, which stopped
    holding it" and counted an attempt, so three outages with a take-over each failed a healthy
    training. A take-over of a lease that ran out while this worker saw the database away now
    counts none; one whose holder died with no outage seen still counts."""
    trainer = FakeTrainer(steps=3)
    svc = beating.worker(trainer)
    repo_a = DatabaseDown(svc.engine)
    worker_a = beating.training_service(svc, repo_a)
    repo_b = FailingReconcile(svc.engine)
    worker_b = beating.training_service(svc, repo_b)

    def arm(job: TrainingJob) -> None:
        if len(trainer.jobs) == 1:  # its start is written; then the database goes away
            repo_a.fail_in, repo_a.down_for = 2, 1000
    trainer.on_train = arm
    training_id = queued_for_ann(svc)

    worker_a.run(training_id, owner="A")
    if seen:  # B's reconciler meets the same outage
        repo_b.failing = AWAY
        with pytest.raises(DatabaseUnreachableError):
            worker_b.reconcile()
        repo_b.failing = None
    repo_a.down_for = 0  # the database is back
    left = row(svc, training_id)
    assert (left.lease_owner, left.attempt, left.recoveries) == ("A", 1, 0)
    # A's lease runs out (its heartbeats could not renew it).
    with svc.repo.atomic() as tx:
        tx.save_training(dataclasses.replace(left, lease_expires_at=datetime.now(UTC)))

    caplog.set_level(logging.INFO, logger="selfie_lora.services.training")
    worker_b.run(training_id, owner="B")
    final = row(svc, training_id)
    assert (final.status, final.attempt) == (TrainingStatus.SUCCEEDED, 2)
    if seen:
        assert final.recoveries == 0  # old code: 1
        assert "not counted" in caplog.text
    else:
        assert final.recoveries == 1
        assert "takes it over from A, which stopped holding it" in caplog.text


def _taken_over_after(machine: Machine, caplog: pytest.LogCaptureFixture,
                      refusal: SelfieLoraError) -> Training:
    """A's training, its lease run out while B's reconciler met ``refusal`` (as A's beats did),
    then run to its end by B once that passed: its row."""
    svc = machine.worker(FakeTrainer(steps=3))
    repo_b = FailingReconcile(svc.engine)
    worker_b = machine.training_service(svc, repo_b)
    training_id = queued_for_ann(svc)
    assert svc.training._claim(training_id, owner="A", stopping=threading.Event()) is not None
    repo_b.failing = refusal  # B's reconciler meets it while A's beats fail on it
    with pytest.raises(type(refusal)):
        worker_b.reconcile()
    repo_b.failing = None  # it passed: space freed, the primary reached
    with svc.repo.atomic() as tx:  # A's lease ran out meanwhile (its renewals refused)
        current = tx.get_training(training_id, for_update=True)
        assert current is not None
        tx.save_training(dataclasses.replace(current, lease_expires_at=datetime.now(UTC)))

    caplog.set_level(logging.INFO, logger="selfie_lora.services.training")
    worker_b.run(training_id, owner="B")
    return row(svc, training_id)


def test_a_take_over_after_a_full_database_disk_spends_no_attempt(
        machine: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """A full database disk refuses every heartbeat's renewal, so the holder's lease runs out as
    in an outage of the server (README: an outage of the machine). Only an unreachable database
    was noted by the worker that took it over, so once space was freed its take-over counted an
    attempt "from A, which stopped holding it". Now a full disk seen over the lease's expiry
    counts none either."""
    final = _taken_over_after(machine, caplog, DISK_FULL)
    assert (final.status, final.attempt) == (TrainingStatus.SUCCEEDED, 2)
    assert final.recoveries == 0  # old code: 1
    assert "its disk was full (attempt 2, queued): not counted" in caplog.text


READ_ONLY = DatabaseRefusedError("database error: cannot execute UPDATE in a read-only "
                                 "transaction")
POOL_EXHAUSTED = DatabaseRefusedError("database error: QueuePool limit of size 5 overflow 0 "
                                      "reached, connection timed out, timeout 30.00",
                                      pool_exhausted=True)
# SQLite's write lock held past the busy timeout (PostgreSQL's lock_timeout, statement_timeout):
# said once as a refusal, but no sign that the holder could not renew (on PostgreSQL a row lock
# or a slow statement is this worker's own), so a take-over after it counts (review 4).
LOCKED = DatabaseLockedError("database error: database is locked")


@pytest.mark.parametrize(("refusal", "counted"),
                         [(READ_ONLY, 0), (POOL_EXHAUSTED, 1), (LOCKED, 1)],
                         ids=["read-only-standby", "pool-exhausted", "locked"])
def test_a_take_over_after_a_read_only_standby_spends_no_attempt(
        machine: Machine, caplog: pytest.LogCaptureFixture, refusal: DatabaseRefusedError,
        counted: int) -> None:
    """Review (read-report3 RISK 3): in a fail-over's read-only window every heartbeat's renewal
    is refused as every worker's writes are, so the holder's lease runs out as in an outage of
    the server; the worker that took it over once the primary answered counted an attempt (a
    long enough window spent them all and failed the training). A read-only database seen over
    the lease's expiry now counts none. This process's own pool exhausted is no sign that the
    holder could not write (its pool is its own): that take-over still counts; nor, since
    review 4, a lock held past its wait (on PostgreSQL this worker's own, a row lock or a slow
    statement: uncounted, a poison training was taken over for ever)."""
    final = _taken_over_after(machine, caplog, refusal)
    assert (final.status, final.attempt) == (TrainingStatus.SUCCEEDED, 2)
    assert final.recoveries == counted  # old code: 1 for both
    assert ("took no writes or its disk was full (attempt 2, queued): not counted"
            in caplog.text) == (counted == 0)


# PostgreSQL's 57014: a statement of this worker's own past statement_timeout (or cancelled).
TIMED_OUT = DatabaseLockedError("database error: canceling statement due to statement timeout")


def test_a_training_that_kills_its_worker_fails_though_each_take_over_follows_a_lock(
        machine: Machine) -> None:
    """Review 4 (point 4, RISK 1): a lock or a statement past its timeout met by this worker's
    reconcile was taken as the database away, so a take-over of a lease that ran out near it
    counted no attempt. On PostgreSQL a row lock or one slow statement is this worker's alone
    (the holder's beats go through): with a reconcile statement always slower than a lowered
    statement_timeout, a training that kills its worker at every attempt (out of memory) was
    taken over uncounted for ever, never failed. Such a take-over counts again."""
    svc = machine.worker(FakeTrainer(steps=3))
    repo_b = FailingReconcile(svc.engine)
    worker_b = machine.training_service(svc, repo_b)
    training_id = queued_for_ann(svc)
    max_attempts = worker_b.lease.max_attempts
    for n in range(max_attempts + 3):
        # Attempt n's worker takes it and dies; B's reconcile statement is cancelled meanwhile.
        if worker_b._claim(training_id, owner=f"W{n}", stopping=threading.Event()) is None:
            break  # failed by this take-over
        repo_b.failing = TIMED_OUT
        with pytest.raises(DatabaseLockedError):
            worker_b.reconcile()
        repo_b.failing = None
        with svc.repo.atomic() as tx:  # W{n}'s lease runs out: it died
            current = tx.get_training(training_id, for_update=True)
            assert current is not None
            tx.save_training(dataclasses.replace(current, lease_expires_at=datetime.now(UTC)))
    # Old code: still queued after max_attempts + 3 take-overs, none counted.
    final = row(svc, training_id)
    assert n == max_attempts
    assert (final.status, final.recoveries) == (TrainingStatus.FAILED, max_attempts)


class RefusedRenewals(SqlRepository):
    """The database, but while ``refusing`` is set its renewals of a lease raise it."""

    refusing: DatabaseRefusedError | None = None
    refused = 0
    renewed = 0

    def renew_lease(self, training_id: str, **lease: Any) -> bool:
        if self.refusing is not None:
            self.refused += 1
            raise self.refusing
        kept = super().renew_lease(training_id, **lease)
        self.renewed += 1
        return kept


@pytest.mark.parametrize(("refusal", "noted"),
                         [(READ_ONLY, [True]), (POOL_EXHAUSTED, []), (LOCKED, [])],
                         ids=["read-only-standby", "pool-exhausted", "locked"])
def test_a_heartbeat_refused_by_a_read_only_standby_is_noted_as_the_database_away(
        beating: Machine, refusal: DatabaseRefusedError, noted: list[bool]) -> None:
    # What decides a take-over of a lease that ran out meanwhile: this worker's spans of the
    # database away, ended by the renewals after (old code: none for a read-only standby).
    _svc, repo, worker, _id, held = _held_by_a(beating, RefusedRenewals)
    with held.heartbeat():
        repo.refusing = refusal
        _until(lambda: repo.refused >= 3, timeout=5)
        repo.refusing = None
        _until(lambda: repo.renewed >= 3, timeout=5)
    after = datetime.now(UTC)
    assert [ended < after for _, ended in worker._database_away.spans(after)] == noted


@pytest.mark.parametrize(("refusal", "over"), [
    (READ_ONLY, "the database takes writes again"),
    # Review (read-report10 nit 4): said "takes writes again", which it had never stopped.
    (POOL_EXHAUSTED, "the database's connections are free again"),
    # Review (task locks): "go through in time again" and "refused for statements kept waiting
    # past the database's timeout" named a timeout alone, for a lock too.
    (LOCKED, "the database no longer keeps its statements waiting"),
], ids=["read-only-standby", "pool-exhausted", "locked"])
def test_a_heartbeat_refused_by_the_database_says_it_once_and_its_end_once(
        beating: Machine, caplog: pytest.LogCaptureFixture,
        refusal: DatabaseRefusedError, over: str) -> None:
    """Review (read-report8 RISK 4): a full disk and an unreachable server were said once, but a
    read-only standby (or the pool's connections all taken) logged a WARNING at every beat (5 s)
    of every running training for the whole fail-over window, or for good on a replica's URL."""
    _svc, repo, _worker, _id, held = _held_by_a(beating, RefusedRenewals)
    beats = _beats_refused(
        held, caplog, refuse=lambda on: setattr(repo, "refusing", refusal if on else None),
        refused=lambda: repo.refused, renewed=lambda: repo.renewed)
    assert len(beats) >= 6
    # Old code: a WARNING at each beat.
    assert [r.levelno for r in beats if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert refusal.message in beats[0].getMessage()
    if refusal is LOCKED:
        assert "refused for statements kept waiting by a lock or past the database's timeout" \
            in beats[0].getMessage(), beats[0].getMessage()
    ends = [r for r in caplog.records if over in r.getMessage()]
    assert [r.levelno for r in ends] == [logging.INFO]


def test_a_refusal_ended_by_another_thread_as_it_begins_is_said_over_in_its_own_words(
        machine: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """A hold's refusal is met and ended by two threads, the training's (its cancel reads) and
    its heartbeat's. The kind its end is said in was a field of its own (``refused_as``),
    written unlocked after the refusal had begun: a beat that went through in between said the
    end of the pool's connections all taken as "the database's disk takes writes again". The
    kind is now the refusal's own, read and ended under its lock (``Outage.ends_as``)."""
    _svc, _repo, _worker, training_id, held = _held_by_a(machine, RefusedRenewals)

    class BeatBetween(Outage):
        """The heartbeat's renewal going through just as the training's read was refused."""

        def begins_as(self, kind: str, *, ticket: int) -> tuple[bool, str]:
            said = super().begins_as(kind, ticket=ticket)
            held.answered(held.tickets())
            return said

    held.database_refused = BeatBetween()
    caplog.set_level(logging.INFO, logger="selfie_lora.services.training")
    held.failed(POOL_EXHAUSTED, held.tickets(), what="could not read whether it was canceled")
    # Old code: "the database's disk takes writes again".
    assert [r.getMessage() for r in caplog.records if "again" in r.getMessage()] == [
        f"training {training_id}: the database's connections are free again"]


@pytest.mark.parametrize(("before", "said"), [
    ("B", "training {id}: B continues it after this worker's restart: its previous process's "
          "lease ran out while the database could not be reached, took no writes or its disk "
          "was full (attempt 2, queued): not counted as one of its attempts"),
    ("A", "training {id}: B takes it over from A, whose lease ran out while the database could "
          "not be reached, took no writes or its disk was full (attempt 2, queued): not counted "
          "as one of its attempts"),
], ids=["same-name", "another-worker"])
def test_a_take_over_after_an_outage_from_this_worker_s_own_name_says_it_restarted(
        machine: Machine, caplog: pytest.LogCaptureFixture, before: str, said: str) -> None:
    """Worker B restarted (same name) and saw the database away over its old lease's expiry: the
    take-over was logged "B takes it over from B", where the one with no outage says it
    continues after this worker's restart."""
    svc = machine.worker(FakeTrainer())
    repo_b = FailingReconcile(svc.engine)
    worker_b = machine.training_service(svc, repo_b)
    training_id = queued_for_ann(svc)
    assert svc.training._claim(training_id, owner=before, stopping=threading.Event()) is not None
    repo_b.failing = DISK_FULL
    with pytest.raises(StorageFullError):
        worker_b.reconcile()
    repo_b.failing = None
    with svc.repo.atomic() as tx:  # the lease ran out in the outage
        current = tx.get_training(training_id, for_update=True)
        assert current is not None
        tx.save_training(dataclasses.replace(current, lease_expires_at=datetime.now(UTC)))
    caplog.set_level(logging.INFO, logger="selfie_lora.services.training")
    assert worker_b._claim(training_id, owner="B", stopping=threading.Event()) is not None
    assert [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"training {training_id}: ")] == [
        said.format(id=training_id)]


class ArmingGenerator(FakeGenerator):
    """The fake generator, which arms ``repo`` (its next transaction fails) at the first probe
    of a scoring: the next transaction the worker makes is the gate's decision."""

    def __init__(self) -> None:
        super().__init__()
        self.repo: Blinking | None = None
        self.armed = False

    def generate(self, job: GenerationJob) -> list[bytes]:
        if self.repo is not None and not self.armed:
            self.armed = True
            self.repo.fail_in = 1
        return super().generate(job)


def test_a_training_that_succeeds_after_a_database_blink_while_scored_says_no_error(
        machine: Machine) -> None:
    """A database that failed the write of the gate's decision made the worker step away,
    rightly, with "the database could not be reached" on the row; the next attempt ended the
    training succeeded, and that sentence stayed its ``error`` (the progress answered
    "succeeded" with it, and the status page "The training succeeded. the database could not
    be reached")."""
    generator = ArmingGenerator()
    svc = machine.worker(FakeTrainer(steps=1), generator=generator)
    generator.repo = repo = Blinking(svc.engine, cut=True)
    worker = machine.training_service(svc, repo)  # scoring with svc's likeness: the generator
    training_id = queued_for_ann(svc)

    worker.run(training_id, owner="A")
    waiting = row(svc, training_id)
    assert waiting.version_id is not None  # stored; its scoring stepped away
    assert (waiting.status, waiting.error) == (TrainingStatus.PROCESSING, DATABASE_UNREACHABLE)

    worker.run(training_id, owner="A")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.version_id) == (
        TrainingStatus.SUCCEEDED, 2, waiting.version_id)
    assert final.error is None  # DATABASE_UNREACHABLE on the previous code
    # The cut connection's path (an outage, waited out uncounted), not a plain StorageError's
    # (counted: the fake's old error, which these assertions alone did not tell apart).
    assert final.recoveries == 0, final


def test_a_scoring_step_away_of_a_remote_training_is_not_held_back(machine: Machine) -> None:
    """The outage hold is for a remote run that goes on. A Replicate training whose version is
    stored keeps its remote id, and a database blink while it was scored held it back a minute
    (then 5), with no remote run to wait for (review daydiff2 finding 7)."""
    generator = ArmingGenerator()
    # Keyed as the local backend, it reports a remote id as a Replicate trainer does.
    svc = machine.worker(FakeTrainer(steps=1, backend="replicate"), generator=generator)
    generator.repo = repo = Blinking(svc.engine, cut=True)
    worker = machine.training_service(svc, repo)
    training_id = queued_for_ann(svc)
    svc.queue.flush()

    worker.run(training_id, owner="A")
    waiting = row(svc, training_id)
    assert waiting.remote_id is not None
    assert waiting.version_id is not None  # stored; its scoring stepped away
    assert (waiting.status, waiting.error) == (TrainingStatus.PROCESSING, DATABASE_UNREACHABLE)
    assert waiting.lease_expires_at is not None
    assert waiting.lease_expires_at <= datetime.now(UTC)  # old code: held back a minute
    assert training_id in svc.queue.queued_training_ids()  # rung again at once

    worker.run(training_id, owner="B")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.error) == (TrainingStatus.SUCCEEDED, 2, None)
    # The cut connection's path, uncounted (see the test above): a plain StorageError counted.
    assert final.recoveries == 0, final


class FlakyPhotos(FileSystemBlobStore):
    """Blobs on disk, but the next ``failures`` reads of a photo fail as an outage of the store
    would (object storage out of reach)."""

    failures = 0

    def get(self, key: str) -> bytes:
        if key.startswith("photos/") and self.failures > 0:
            self.failures -= 1
            raise StorageError(f"object storage could not read {key!r}: connection refused")
        return super().get(key)


def test_a_blob_store_out_of_reach_interrupts_a_training_and_does_not_fail_it(
        machine: Machine) -> None:
    """The photos a worker reads for a training, in the store's outage, used to fail it ("The
    training could not run: object storage could not read ..."), as if they were gone. The
    worker steps away as from a database outage, and the next attempt trains."""
    trainer = FakeTrainer(steps=2)
    svc = machine.worker(trainer)
    blobs = FlakyPhotos(svc.blobs.root)  # type: ignore[attr-defined]
    worker = TrainingService(repo=svc.repo, blobs=blobs, queue=svc.queue, trainers=svc.trainers,
                             defaults=lambda: training_defaults(machine.settings),
                             work_dir=machine.settings.work_dir, likeness=svc.likeness,
                             lease=machine.settings.lease_policy)
    user, _ = svc.users.create(name="ann")
    started = svc.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    training_id = started.training.id

    blobs.failures = 1
    worker.run(training_id, owner="A")
    waiting = svc.repo.get_training(training_id)
    assert waiting is not None
    assert waiting.status is TrainingStatus.STARTING
    assert (waiting.attempt, waiting.error) == (1, STORAGE_UNREACHABLE)
    assert trainer.jobs == []
    assert training_id in svc.queue.queued_training_ids()  # rung again at once

    worker.run(training_id, owner="A")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.error) == (TrainingStatus.SUCCEEDED, 2, None)


def test_a_photo_gone_from_the_store_fails_the_training_and_says_so(machine: Machine) -> None:
    trainer = FakeTrainer(steps=2)
    svc = machine.worker(trainer)
    user, _ = svc.users.create(name="ann")
    started = svc.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    dataset = svc.repo.get_dataset(started.training.dataset_id)
    assert dataset is not None
    svc.blobs.delete(photo_key(dataset.photo_hashes[1]))

    svc.training.run(started.training.id, owner="A")
    final = svc.repo.get_training(started.training.id)
    assert final is not None
    assert final.status is TrainingStatus.FAILED
    assert final.error is not None
    assert "gone from storage" in final.error
    assert "upload the photos again" in final.error
    assert trainer.jobs == []


class DatasetReadFails(SqlRepository):
    """The database, but the next ``fails`` reads of a dataset raise ``error`` (by default a
    plain database error, as a lost connection was before outages were told apart)."""

    fails = 0
    error: StorageError = StorageError(
        "database error: server closed the connection unexpectedly")

    def get_dataset(self, dataset_id: str) -> Any:
        if self.fails > 0:
            self.fails -= 1
            raise self.error
        return super().get_dataset(dataset_id)


def _failing_dataset_reads(machine: Machine) -> tuple[Services, DatasetReadFails,
                                                      TrainingService, str]:
    """A worker whose database fails the reads of a dataset when told, its training service
    on that database, and ann's training queued."""
    svc = machine.worker(FakeTrainer(steps=2))
    repo = DatasetReadFails(svc.engine)
    return svc, repo, machine.training_service(svc, repo), queued_for_ann(svc)


def test_a_database_failing_the_read_of_the_photos_list_is_said_as_the_databases(
        machine: Machine) -> None:
    svc, repo, worker, training_id = _failing_dataset_reads(machine)
    repo.fails = 1
    worker.run(training_id, owner="A")
    waiting = row(svc, training_id)
    assert (waiting.status, waiting.error) == (TrainingStatus.STARTING, DATABASE_UNREACHABLE)
    worker.run(training_id, owner="A")
    assert row(svc, training_id).status is TrainingStatus.SUCCEEDED


def test_a_database_outage_at_the_read_of_the_photos_list_spends_no_attempt(
        machine: Machine) -> None:
    # Old code: the _UnreachableError of that read (``_job``) did not say it was an outage, as
    # those of the fenced writes do: each was a counted step-away, and the fourth PostgreSQL
    # restart in a row failed the training ("interrupted 3 times").
    svc, repo, worker, training_id = _failing_dataset_reads(machine)
    # PostgreSQL restarting (refused connections), more times than SELFIE_LORA_MAX_ATTEMPTS (3).
    repo.error = DatabaseUnreachableError("database error: connection failed: Connection refused")
    repo.fails = 4
    for _ in range(4):
        worker.run(training_id, owner="A")
        waiting = row(svc, training_id)
        assert not waiting.status.is_terminal, waiting.error
        assert (waiting.lease_owner, waiting.error) == (None, DATABASE_UNREACHABLE)
    worker.run(training_id, owner="A")
    final = row(svc, training_id)
    assert (final.status, final.recoveries, final.error) == (TrainingStatus.SUCCEEDED, 0, None)


class FailsOnceTheVersionIsStored(SqlRepository):
    """The database, but the first call after ``training_id``'s version is stored (a read or a
    transaction: the first the scoring makes) fails as a terminated connection does."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.training_id: str | None = None
        self.failed = False

    def _fail_now(self) -> None:
        if self.failed or self.training_id is None:
            return
        current = super().get_training(self.training_id)
        if current is not None and current.version_id is not None:
            self.failed = True
            raise StorageError("database error: terminating connection due to administrator "
                               "command")

    def get_training(self, training_id: str, **kwargs: Any) -> Training | None:
        self._fail_now()
        return super().get_training(training_id, **kwargs)

    @contextmanager
    def atomic(self) -> Iterator[SqlRepository]:
        self._fail_now()
        with super().atomic() as tx:
            yield tx


def test_a_database_failing_the_first_read_of_the_scoring_steps_away_at_once(
        machine: Machine) -> None:
    """The scoring's first read of the training and its version was made outside the fence: a
    database error there escaped ``run`` (the worker logged "failed to run it"), the lease left
    live with no heartbeat and no message queued, so the training sat until the lease ran out
    and the take-over was counted as a dead worker's."""
    svc = machine.worker(FakeTrainer(steps=1))
    repo = FailsOnceTheVersionIsStored(svc.engine)
    worker = machine.training_service(svc, repo)
    training_id = queued_for_ann(svc)
    svc.queue.flush()
    repo.training_id = training_id

    worker.run(training_id, owner="A")  # raised StorageError on the old code
    assert repo.failed
    waiting = row(svc, training_id)
    assert waiting.version_id is not None
    assert (waiting.status, waiting.error) == (TrainingStatus.PROCESSING, DATABASE_UNREACHABLE)
    assert waiting.lease_expires_at is not None
    assert waiting.lease_expires_at <= datetime.now(UTC)  # free to claim now
    assert training_id in svc.queue.queued_training_ids()  # rung again at once

    worker.run(training_id, owner="B")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.error) == (TrainingStatus.SUCCEEDED, 2, None)


@dataclass
class DiesWhere(FakeTrainer):
    """Each attempt, in turn, dies (the worker killed with -9) after storing a checkpoint past the
    one it resumed from ("progress"), or before storing one ("nothing"); then trainings run."""

    kills: list[str] = field(default_factory=list)

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        if not self.kills:
            return super().train(job, sink=sink)
        where = self.kills.pop(0)
        self.jobs.append(job)
        sink.started(remote_id=None)
        if where == "progress":
            assert job.checkpoints is not None
            checkpoint = job.work_dir / "checkpoint"
            checkpoint.write_bytes(b"state")
            job.checkpoints.save(checkpoint, step=10 * len(self.jobs))
        raise SimulatedCrash(f"killed after {where}")


def _killed(svc: Services, training_id: str) -> None:
    with pytest.raises(SimulatedCrash):
        svc.training.run(training_id, owner="A")
    svc.training.reconcile(dead_owners=("A",))  # restarted at once: its old lease is dead


def test_interruptions_that_each_made_progress_never_add_up_to_a_failure(
        machine: Machine) -> None:
    """Killed four times, each attempt past its resume checkpoint (the review killed a worker at
    steps 3, 9 and 20, hours apart in a FLUX run): the third take-over failed the training "The
    training was interrupted 3 times", though the README counts such attempts "in a row"."""
    trainer = DiesWhere(kills=["progress"] * 4)
    svc = machine.worker(trainer)
    training_id = queued_for_ann(svc)
    for _ in range(4):
        _killed(svc, training_id)
        assert not row(svc, training_id).status.is_terminal
    svc.training.run(training_id, owner="A")
    final = row(svc, training_id)
    assert (final.status, final.attempt, final.recoveries) == (TrainingStatus.SUCCEEDED, 5, 1)


def test_attempts_in_a_row_that_get_nowhere_still_fail_the_training(machine: Machine) -> None:
    """The poison-training guard: after one attempt that made progress, three that died before
    their first checkpoint fail it."""
    trainer = DiesWhere(kills=["progress", "nothing", "nothing", "nothing"])
    svc = machine.worker(trainer)
    training_id = queued_for_ann(svc)
    for _ in range(3):
        _killed(svc, training_id)
    svc.training.run(training_id, owner="A")  # no fourth attempt: its claim fails the training
    failed = row(svc, training_id)
    assert failed.status is TrainingStatus.FAILED
    assert failed.recoveries == 3
    assert len(trainer.jobs) == 3


class ReadsDown(SqlRepository):
    """The database, but while ``down`` its reads of a training and its lease renewals fail
    as with PostgreSQL stopped."""

    down = False

    def get_training(self, training_id: str, *, for_update: bool = False) -> Training | None:
        if self.down:
            raise DatabaseUnreachableError("database error: connection failed: refused")
        return super().get_training(training_id, for_update=for_update)

    def active_trainings(self) -> Any:
        if self.down:
            raise DatabaseUnreachableError("database error: connection failed: refused")
        return super().active_trainings()


def test_a_database_outage_is_said_once_per_loop_and_its_end_once(
        machine: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL down: each reconciler round logged an ERROR with a 140-line traceback, and each
    running training's cancel check (several a second) a WARNING (found in review: ~870 lines
    per idle worker in a 40 s outage). Now one WARNING when it begins and one INFO when it ends
    per loop, the rounds between at DEBUG; an error that is not an outage keeps its traceback."""
    svc = machine.worker(FakeTrainer())
    repo = ReadsDown(svc.engine)
    service = machine.training_service(svc, repo)
    worker = Worker(training=service, queue=svc.queue, identity=Identity(name="w-test"),
                    threads=0)
    training_id = queued_for_ann(svc)
    held = service._claim(training_id, owner="A", stopping=threading.Event())
    assert held is not None
    sink = _Sink(service, held)

    def said(text: str, level: int) -> int:
        return sum(text in r.getMessage() and r.levelno == level for r in caplog.records)

    with caplog.at_level(logging.DEBUG):
        repo.down = True
        for _round in range(3):
            worker._reconcile()
            assert sink.cancel_requested() is False
        repo.down = False
        worker._reconcile()
        assert sink.cancel_requested() is False
    assert said("reconciling trainings: the database cannot be reached", logging.WARNING) == 1
    assert said("reconciling trainings: the database cannot be reached", logging.DEBUG) == 2
    assert said("reconciling trainings: the database answers again", logging.INFO) == 1
    assert said("could not read whether it was canceled", logging.WARNING) == 1
    assert said("could not read whether it was canceled", logging.DEBUG) == 2
    assert said(f"training {training_id}: the database answers again", logging.INFO) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


class TakenOverDuringUpload(FileSystemBlobStore):
    """Blobs on disk, but while a checkpoint of step ``at`` is uploaded its worker is paused
    (SIGSTOP) past its lease: ``meanwhile`` runs (another worker takes the training over)."""

    at = 30
    meanwhile: Callable[[], None] | None = None

    def put_file(self, key: str, path: Path) -> None:
        super().put_file(key, path)
        if self.meanwhile is not None and checkpoint_step(key) == self.at:
            run, self.meanwhile = self.meanwhile, None
            run()


class SavesOnceThenCrashes(FakeTrainer):
    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        self.jobs.append(job)
        sink.started(remote_id=None)
        assert job.checkpoints is not None
        checkpoint = job.work_dir / "checkpoint"
        checkpoint.write_bytes(b"the paused attempt's")
        job.checkpoints.save(checkpoint, step=30)
        raise SimulatedCrash("stops")


def test_a_worker_paused_past_its_lease_deletes_no_checkpoint_of_the_one_that_took_over(
        machine: Machine, tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP) while it uploaded a checkpoint went on, once resumed, to delete
    the training's other checkpoints before it noticed the lease was lost (found in review):
    every other one, later steps too, so the newer checkpoint of the worker that took over went.
    The lease is checked again once the upload is done, before anything is deleted."""
    svc = machine.worker(SavesOnceThenCrashes())
    blobs = TakenOverDuringUpload(svc.blobs.root)  # type: ignore[attr-defined]
    paused = TrainingService(repo=svc.repo, blobs=blobs, queue=svc.queue, trainers=svc.trainers,
                             defaults=lambda: training_defaults(machine.settings),
                             work_dir=machine.settings.work_dir, likeness=svc.likeness,
                             lease=machine.settings.lease_policy)
    training_id = queued_for_ann(svc)
    newer = tmp_path / "newer"
    newer.write_bytes(b"the new owner's")

    def taken_over() -> None:
        svc.training.reconcile(dead_owners=("A",))  # its lease ran out
        assert svc.training._claim(training_id, owner="B", stopping=threading.Event())
        TrainingCheckpoints(svc.blobs).keep(training_id, newer, step=40)  # B's checkpoint
    blobs.meanwhile = taken_over

    with pytest.raises(SimulatedCrash):
        paused.run(training_id, owner="A")
    assert blobs.meanwhile is None  # it was paused
    latest = TrainingCheckpoints(svc.blobs).latest(training_id)
    assert latest is not None
    assert latest.step == 40


@pytest.mark.parametrize(("before", "said"), [
    ("vm/9a22e5f0/w0", "training {id}: vm/9a22e5f0/w0 continues it after this worker's "
                       "restart: its previous process stopped holding it (attempt 2, queued)"),
    ("vm/1b2c3d4e/w0", "training {id}: vm/9a22e5f0/w0 takes it over from vm/1b2c3d4e/w0, which "
                       "stopped holding it (attempt 2, queued)"),
], ids=["same-name", "another-worker"])
def test_a_take_over_from_this_worker_s_own_name_says_it_restarted(
        machine: Machine, caplog: pytest.LogCaptureFixture, before: str, said: str) -> None:
    """A worker's name is its machine and index: a serve killed mid-training and started again
    on the same machine logged "vm/9a22e5f0/w0 takes it over from vm/9a22e5f0/w0" (upgrade
    review aside), as if it took the training from itself."""
    svc = machine.worker(FakeTrainer())
    training_id = queued_for_ann(svc)
    assert svc.training._claim(training_id, owner=before, stopping=threading.Event()) is not None
    with svc.repo.atomic() as tx:  # its process was killed: the lease ran out
        current = tx.get_training(training_id, for_update=True)
        assert current is not None
        tx.save_training(dataclasses.replace(
            current, lease_expires_at=datetime(2020, 1, 1, tzinfo=UTC)))
    restarted = machine.worker(FakeTrainer())
    caplog.set_level(logging.INFO, logger="selfie_lora.services.training")
    assert restarted.training._claim(training_id, owner="vm/9a22e5f0/w0",
                                     stopping=threading.Event()) is not None
    assert [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"training {training_id}: ")] == [
        said.format(id=training_id)]


# Old code: the failure was committed, then its "training_failed" event in a transaction of its
# own: a worker killed between the two left a failed training that the log never said ended (0
# end events; the chaos loop's "one end event per training"), and nothing wrote the event later.
def test_a_worker_killed_as_its_training_fails_leaves_the_failure_logged_once(
        tmp_path: Path) -> None:
    script = (
        services_script(trainer="FakeTrainer(outcomes=['failed'])",
                        imports="from tests.support.photos import photo_zip\n") +
        "ann, _key = svc.users.create(name='ann')\n"
        "started = svc.training.upload_zip(user=ann, data=photo_zip(4))\n"
        "print(started.training.id, flush=True)\n"
        "def killed(training_id):\n"
        "    os._exit(9)  # the failure is committed: the worker dies right after\n"
        "svc.training._checkpoints.drop = killed\n"
        "svc.training.run(started.training.id, owner='w1')\n"
    )
    training_id = run_killed(script, str(tmp_path)).stdout.split()[0]

    home = tmp_path / "home"
    svc = build_services(make_settings(tmp_path, intake_workers=1,
                                       database_url=f"sqlite:///{home / 'selfie-lora.db'}"),
                         trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    try:
        svc.training.reconcile()
        svc.training.run(training_id, owner="w2")
        training = svc.repo.get_training(training_id)
        assert training is not None
        assert training.status is TrainingStatus.FAILED
        assert training.error is not None
        assert "ran out of memory" in training.error
        ends = [e for e in svc.repo.list_events(training.model_id)
                if e["kind"] in ("training_succeeded", "training_failed", "training_canceled")
                and e["data"]["training_id"] == training_id]
        assert [e["kind"] for e in ends] == ["training_failed"], ends
    finally:
        svc.close()
