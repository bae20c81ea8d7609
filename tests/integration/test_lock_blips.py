"""A database lock met by a worker (SQLite's write lock held past its busy timeout, PostgreSQL's
lock_timeout or statement_timeout: ``DatabaseLockedError``) is a blip the next attempt goes on
through, said as a lock. Old code: while a version was scored it was recorded ``failed`` (the
likeness gate held the version for good, and alerted, for a lock of seconds); while it trained,
its row said "the database could not be reached" and the next attempt's line this worker's
restart."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.domain import alerts
from selfie_lora.domain.entities import Dataset, GateStatus, Training, TrainingStatus, Version
from selfie_lora.domain.likeness import (
    UNDECIDED_AGAINST,
    UNDECIDED_BOX,
    UNDECIDED_NOTES,
    UNDECIDED_WORDS,
    LikenessStatus,
    Undecided,
)
from selfie_lora.errors import DatabaseLockedError
from selfie_lora.services.layout import reference_key
from selfie_lora.services.likeness import AlertSends, LikenessService
from selfie_lora.services.ports import GenerationJob, TrainingJob
from selfie_lora.services.training import (
    CANCELED_MESSAGE,
    DATABASE_LOCKED,
    SCORING_LOCKED,
    TrainingService,
)
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer, RecordingAlerter, SimulatedCrash
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip
from tests.support.trainings import HoldClock

# What the repository raises for SQLite's "database is locked" (``_kept_waiting``).
LOCKED = "database error: database is locked"


class _Rig:
    """Two trainings of one user: the first succeeds (its version active, the baseline), the
    second's scoring reads its photos' dataset (``reference``), where ``locks`` say: each
    ``get_dataset`` once its trainer has run raises the repository's lock error while
    ``locks`` is above 0 (one less each time), for ever at -1."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.locks = 0
        self.met = 0
        self.scoring = False
        self.alerter = RecordingAlerter()
        self.clock = HoldClock()
        self.generator = FakeGenerator()

        def trained(job: TrainingJob) -> None:
            # Its photos' faces analysed anew by the scoring (a faces file of another face model,
            # or from before likeness tracking): the scoring reads the dataset's row.
            t = self.training(job.training_id)
            self.services.blobs.delete(reference_key(t.dataset_id, self.faces))
            self.scoring = True  # what reads the dataset from here on is the scoring

        read = SqlRepository.get_dataset

        def get_dataset(repo: SqlRepository, dataset_id: str) -> Dataset | None:
            if self.scoring and self.locks != 0:
                self.locks -= 1 if self.locks > 0 else 0
                self.met += 1
                raise DatabaseLockedError(LOCKED, lock=True)
            return read(repo, dataset_id)

        monkeypatch.setattr(SqlRepository, "get_dataset", get_dataset)
        settings = make_settings(tmp_path)
        analyzer = one_person_analyzer()
        self.faces = analyzer.model_name
        self.services: Services = build_services(
            settings, trainers={"local": FakeTrainer(on_train=trained)},
            generators={"local": self.generator}, alerter=self.alerter,
            face_analyzer=analyzer, clock=self.clock.now)
        self.user, _ = self.services.users.create(name="ann")

    def train(self, offset: int) -> Training:
        started = self.services.training.upload_zip(
            user=self.user, data=photo_zip(3, offset=offset, size=1100))
        assert started.training is not None
        self.scoring = False
        self.services.training.run(started.training.id)
        return self.training(started.training.id)

    def next_attempt(self, t: Training,
                     caplog: pytest.LogCaptureFixture) -> tuple[Training, str]:
        """Run ``t`` again once its step-away has passed: its row then, and the line its claim
        logged (``training ID: OWNER ... (attempt N, STATUS)``)."""
        self.clock.past(t)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="selfie_lora"):
            self.services.training.run(t.id)
        [took] = [r.getMessage() for r in caplog.records
                  if f"training {t.id}: " in r.getMessage() and "(attempt" in r.getMessage()]
        return self.training(t.id), took

    def version(self, t: Training) -> Version:
        """``t``'s stored version."""
        assert t.version_id is not None
        version = self.services.repo.get_version(t.version_id)
        assert version is not None
        return version

    def training(self, training_id: str) -> Training:
        t = self.services.repo.get_training(training_id)
        assert t is not None
        return t


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Rig:
    return _Rig(tmp_path, monkeypatch)


def test_a_lock_while_a_version_is_scored_is_left_for_the_next_attempt_not_held(
        rig: _Rig, caplog: pytest.LogCaptureFixture) -> None:
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        rig.locks = 1
        with caplog.at_level(logging.INFO, logger="selfie_lora"):
            second = rig.train(3)
        assert rig.met == 1
        # Stepped away by _judge, said as a lock: not escaped to run()'s handler of the
        # unexpected (its ERROR with a traceback; its row's words the training's own lock's).
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not errors, [r.getMessage() for r in errors]
        assert second.error == SCORING_LOCKED, second.error
        # Held back a while (the next attempts span minutes of a lock, not seconds).
        assert second.lease_expires_at is not None
        assert second.lease_expires_at > rig.clock.now()
        # Stepped away: not ended, its version pending, no record of a failed scoring.
        assert not second.status.is_terminal, second.error
        assert second.version_id is not None
        version = rig.services.repo.get_version(second.version_id)
        assert version is not None
        assert version.gate_status is GateStatus.PENDING, version.gate_reason
        record = rig.services.repo.get_likeness(second.version_id)
        assert record is None or record.status is not LikenessStatus.FAILED, record
        assert not rig.alerter.sent
        # Its row says a lock, not a database out of reach.
        assert second.error is not None
        assert DATABASE_LOCKED in second.error, second.error
        assert "could not be reached" not in second.error

        done, took = rig.next_attempt(second, caplog)
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        # The next attempt's line names the lock, not this worker's restart (old code: "continues
        # it after this worker's restart: its previous process stopped holding it").
        assert "restart" not in took, took
        assert "database kept it waiting" in took, took
        assert DATABASE_LOCKED in took, took
        version = rig.services.repo.get_version(second.version_id)
        assert version is not None
        assert version.gate_status is GateStatus.PASSED, version.gate_reason
        record = rig.services.repo.get_likeness(second.version_id)
        assert record is not None
        assert record.status is LikenessStatus.SCORED, record.error
        assert not rig.alerter.sent, rig.alerter.sent
    finally:
        rig.services.close()


def test_a_lock_that_never_ends_while_a_version_is_scored_ends_after_its_attempts(
        rig: _Rig) -> None:
    """Bounded: each lock spends one of the scoring's attempts (a stop, as a dead worker's), so
    after ``max_attempts`` the version is judged without scores (held), not tried for ever."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        rig.locks = -1
        second = rig.train(3)
        runs = 1
        holds = []
        while not second.status.is_terminal and runs < 10:
            assert second.lease_expires_at is not None
            holds.append(second.lease_expires_at - rig.clock.now())
            rig.clock.past(second)
            rig.services.training.run(second.id)
            second = rig.training(second.id)
            runs += 1
        attempts = rig.services.training.lease.max_attempts
        assert second.status is TrainingStatus.SUCCEEDED, second.error
        assert runs == attempts + 1
        assert rig.met == attempts
        assert second.version_id is not None
        version = rig.services.repo.get_version(second.version_id)
        assert version is not None
        assert version.gate_status is GateStatus.HELD
        # Spaced, the gaps of an outage (1 min, then 5), so that 3 attempts span minutes of a
        # lock; none before the judging without scores, which a wait would only delay.
        gaps = rig.services.training.lease.outage_gaps
        assert holds == [gaps[0], gaps[1], timedelta(0)], holds
        # Said as a lock, to the version's owner: no worker stopping, no operator's command.
        reason = version.gate_reason or ""
        assert (f"its scoring was stopped {attempts} times, the last time because the database "
                "was busy (a lock); you can compare it with the active version on the Versions "
                "page") in reason, reason
        assert "selfie-lora compare" not in reason, reason
    finally:
        rig.services.close()


def _undecided(rig: _Rig, t: Training) -> Undecided | None:
    """Why the Versions page says the gate has not decided on ``t``'s version, a database lock
    (``TrainingService.undecided``, from the history the page reads); the Generate page and
    ``selfie-lora activate`` say the same (``undecided_of``, from the version alone)."""
    history = rig.services.models.history(user=rig.user)
    assert history is not None
    assert t.version_id is not None
    why = rig.services.training.undecided(history=history).get(t.version_id)
    version = rig.version(t)
    assert rig.services.training.undecided_of(versions=[version]).get(version.id) == why
    return why


def _undecided_until_it_ends(rig: _Rig, t: Training) -> tuple[Training, list[Undecided | None]]:
    """``t``'s attempts run one after the other, each once its hold passed, until it ends (at
    most 20): ``t`` as it ended, and what the pages said of its version before each attempt."""
    said = []
    while not t.status.is_terminal and len(said) < 20:
        said.append(_undecided(rig, t))
        rig.clock.past(t)
        rig.services.training.run(t.id)
        t = rig.training(t.id)
    return t, said


def _kept_waiting(rig: _Rig, t: Training) -> bool:
    """Whether the Versions page says ``t``'s version waits out a database lock to be scored."""
    return _undecided(rig, t) is Undecided.SCORING_KEPT_WAITING


def test_the_database_was_busy_is_not_said_while_the_next_attempt_scores_the_version(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Said while the attempt that stepped away on a lock waits, not once the next attempt
    scores the version (rendering its probes: minutes on a GPU): the row keeps its
    ``SCORING_LOCKED`` words until the training ends, and the page said "could not be scored
    yet: the database was busy" all through that scoring (found in review)."""
    try:
        assert rig.train(0).status is TrainingStatus.SUCCEEDED
        rig.locks = 1
        second = rig.train(3)
        assert second.error == SCORING_LOCKED, second.error
        assert _kept_waiting(rig, second)
        seen: list[tuple[bool, str | None, int]] = []
        generate = rig.generator.generate

        def rendering(job: GenerationJob) -> list[bytes | None]:
            t = rig.training(second.id)
            seen.append((_kept_waiting(rig, t), t.error, t.attempt))
            return generate(job)

        monkeypatch.setattr(rig.generator, "generate", rendering)
        rig.clock.past(second)
        rig.services.training.run(second.id)
        # Its row said the lock all through (what the page went by), its next attempt scoring.
        assert seen, "the next attempt rendered no probe"
        assert all(error == SCORING_LOCKED and attempt == second.attempt + 1
                   for _, error, attempt in seen), seen
        assert not any(said for said, _, _ in seen), seen
        assert rig.training(second.id).status is TrainingStatus.SUCCEEDED
    finally:
        rig.services.close()


def test_a_scored_version_whose_verdict_write_a_lock_stopped_is_not_said_unscored(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock on the gate's verdict write after a scoring that succeeded leaves the row's
    ``SCORING_LOCKED`` words too: the version's likeness is scored (the Likeness cell shows it),
    so "could not be scored yet ... it is scored again shortly" is not said of it."""
    try:
        assert rig.train(0).status is TrainingStatus.SUCCEEDED
        apply = LikenessService.apply_verdict
        left = [1]

        def apply_verdict(service: LikenessService, tx: object, verdict: object) -> object:
            if rig.scoring and left[0]:
                left[0] -= 1
                raise DatabaseLockedError(LOCKED, lock=True)
            return apply(service, tx, verdict)  # type: ignore[arg-type]

        monkeypatch.setattr(LikenessService, "apply_verdict", apply_verdict)
        second = rig.train(3)
        assert second.error == SCORING_LOCKED, second.error
        version = rig.version(second)
        assert version.gate_status is GateStatus.PENDING
        record = rig.services.repo.get_likeness(version.id)
        assert record is not None
        assert record.status is LikenessStatus.SCORED
        assert not _kept_waiting(rig, second)
        # Said as what it is: scored, the gate not decided (the usual "still being scored"
        # words were said of it).
        assert _undecided(rig, second) is Undecided.JUDGING_KEPT_WAITING
        # Its next attempt judges it (from its scores): no longer said.
        rig.clock.past(second)
        rig.services.training.run(second.id)
        done = rig.training(second.id)
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        assert _undecided(rig, done) is None
    finally:
        rig.services.close()


def test_a_lock_before_the_gate_decided_is_not_said_a_decision_not_saved(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock met after the version was scored but before the gate decided (here the
    reference of the baseline's photos, read with ``lock_raises``) leaves the same scored record
    as a lock on the verdict's write: "the gate's decision could not be saved" was said of it,
    where no decision was made (found in review). Said as true of both: the gate could not
    decide yet."""
    reference_for = LikenessService._reference_for
    left = [1]
    applied = []

    def locked_reference(service: LikenessService, version: Version, *,
                         outage_raises: bool = False, lock_raises: bool = False) -> object:
        if rig.scoring and lock_raises and left[0]:
            left[0] -= 1
            raise DatabaseLockedError(LOCKED, lock=True)
        return reference_for(service, version, outage_raises=outage_raises,
                             lock_raises=lock_raises)

    apply = LikenessService.apply_verdict

    def apply_verdict(service: LikenessService, tx: object, verdict: object) -> object:
        applied.append(verdict)
        return apply(service, tx, verdict)  # type: ignore[arg-type]

    try:
        assert rig.train(0).status is TrainingStatus.SUCCEEDED
        monkeypatch.setattr(LikenessService, "_reference_for", locked_reference)
        monkeypatch.setattr(LikenessService, "apply_verdict", apply_verdict)
        second = rig.train(3)
        assert not left[0], "the lock was never met"
        assert second.error == SCORING_LOCKED, second.error
        assert not applied, "the gate decided"
        record = rig.services.repo.get_likeness(rig.version(second).id)
        assert record is not None
        assert record.status is LikenessStatus.SCORED
        why = _undecided(rig, second)
        assert why is Undecided.JUDGING_KEPT_WAITING
        assert UNDECIDED_WORDS[why] == ("its likeness is scored, but the gate could not decide "
                                        "yet: the database was busy; it is tried again shortly")
        # Nowhere a decision that "could not be saved": none was made.
        for words in (UNDECIDED_WORDS, UNDECIDED_NOTES, UNDECIDED_AGAINST, UNDECIDED_BOX):
            assert "saved" not in words[why], words[why]
        rig.clock.past(second)
        rig.services.training.run(second.id)
        done = rig.training(second.id)
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        assert len(applied) == 1
        assert _undecided(rig, done) is None
    finally:
        rig.services.close()


def test_a_verdict_write_locked_each_time_is_said_held_unjudged_at_the_cut_off(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock on the gate's verdict write at every attempt: its next attempt judges it from its
    scores (no probe rendered again) while its stops are under ``_judge``'s cut-off
    (``2 * max_attempts``), also once its scoring's attempts are spent (``[max, 2 * max)``);
    the last is said as what its next attempt does, holding it back unjudged, not "it is tried
    again shortly"."""
    apply = LikenessService.apply_verdict

    def apply_verdict(service: LikenessService, tx: object, verdict: object) -> object:
        if rig.scoring:
            raise DatabaseLockedError(LOCKED, lock=True)
        return apply(service, tx, verdict)  # type: ignore[arg-type]

    try:
        assert rig.train(0).status is TrainingStatus.SUCCEEDED
        monkeypatch.setattr(LikenessService, "apply_verdict", apply_verdict)
        second = rig.train(3)
        rendered = []
        generate = rig.generator.generate

        def rendering(job: GenerationJob) -> list[bytes | None]:
            rendered.append(job)
            return generate(job)

        monkeypatch.setattr(rig.generator, "generate", rendering)
        second, said = _undecided_until_it_ends(rig, second)
        attempts = rig.services.training.lease.max_attempts
        assert said == ([Undecided.JUDGING_KEPT_WAITING] * (2 * attempts - 1)
                        + [Undecided.HELD_UNJUDGED_NEXT]), said
        assert not rendered, "a scored version's probes were rendered again"
        assert second.status is TrainingStatus.SUCCEEDED, second.error
        assert rig.version(second).gate_status is GateStatus.HELD
    finally:
        rig.services.close()


def test_a_version_judged_without_scores_next_is_not_said_to_be_scored_again(
        rig: _Rig) -> None:
    """A lock that lasts: each attempt that stepped away is said to wait for the database,
    but not the last, whose next attempt judges the version without scores (its scoring's
    attempts spent): "it is scored again shortly" would not come true."""
    try:
        assert rig.train(0).status is TrainingStatus.SUCCEEDED
        rig.locks = -1
        second = rig.train(3)
        second, said = _undecided_until_it_ends(rig, second)
        attempts = rig.services.training.lease.max_attempts
        # The last said as what its next attempt does: the fallback, "its likeness still being
        # scored", was said of it, where nothing scored it and nothing would.
        assert said == ([Undecided.SCORING_KEPT_WAITING] * (attempts - 1)
                        + [Undecided.JUDGED_WITHOUT_SCORES_NEXT]), said
        assert rig.version(second).gate_status is GateStatus.HELD
    finally:
        rig.services.close()


def test_a_lock_while_a_training_runs_is_said_as_a_lock(
        rig: _Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fenced write of the training (its version's) kept waiting: the worker steps away and the
    next attempt stores it, the row and that attempt's line naming the lock."""
    add = SqlRepository.add_version
    locks = [DatabaseLockedError(LOCKED, lock=True)]

    def add_version(repo: SqlRepository, version: Version) -> None:
        if locks:
            raise locks.pop()
        add(repo, version)

    monkeypatch.setattr(SqlRepository, "add_version", add_version)
    try:
        t = rig.train(0)
        assert not locks
        assert not t.status.is_terminal, t.error
        assert t.version_id is None
        assert t.error == DATABASE_LOCKED  # old code: "the database could not be reached"
        done, took = rig.next_attempt(t, caplog)
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        assert "restart" not in took, took
        assert f"after the database kept it waiting (its row says: {DATABASE_LOCKED})" in took
    finally:
        rig.services.close()


def _pending_after_a_lock(rig: _Rig, t: Training) -> None:
    """``t`` stepped away on a lock met while its version was scored: not ended, its version
    pending, no alert."""
    assert not t.status.is_terminal, t.error
    assert t.error == SCORING_LOCKED, t.error
    version = rig.version(t)
    assert version.gate_status is GateStatus.PENDING, version.gate_reason
    assert not rig.alerter.sent


def test_a_lock_on_the_judging_s_read_of_the_photos_is_left_for_the_next_attempt(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The version scored, then the gate's read of its photos' faces (their file gone, the dataset
    read again) kept waiting: stepped away, not judged as if it had no reference (held)."""
    score = LikenessService.score

    def scored(service: LikenessService, version_id: str, **kw: object) -> object:
        record = score(service, version_id, **kw)  # type: ignore[arg-type]
        if rig.scoring and version_id != first.version_id:
            t = rig.training(second_id[0])
            rig.services.blobs.delete(reference_key(t.dataset_id, rig.faces))
            rig.locks = 1  # the judging's read of the dataset, after its scoring
        return record

    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        second_id: list[str] = []
        started = rig.services.training.upload_zip(
            user=rig.user, data=photo_zip(3, offset=3, size=1100))
        assert started.training is not None
        second_id.append(started.training.id)
        monkeypatch.setattr(LikenessService, "score", scored)
        rig.scoring = False
        rig.services.training.run(started.training.id)
        second = rig.training(started.training.id)
        assert rig.met == 1
        _pending_after_a_lock(rig, second)
        record = rig.services.repo.get_likeness(rig.version(second).id)
        assert record is not None
        assert record.status is LikenessStatus.SCORED, record.error
    finally:
        rig.services.close()


def test_a_lock_on_the_active_version_s_photos_is_left_for_the_next_attempt(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's read of the active version's own photos (``_baseline_photos``) kept waiting:
    stepped away said as a lock (not the storage), not held."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        # Its faces file gone: the gate reads its dataset again, which a lock keeps waiting.
        rig.services.blobs.delete(reference_key(first.dataset_id, rig.faces))
        read = SqlRepository.get_dataset
        met: list[str] = []

        def get_dataset(repo: SqlRepository, dataset_id: str) -> Dataset | None:
            if rig.scoring and dataset_id == first.dataset_id and not met:
                met.append(dataset_id)
                raise DatabaseLockedError(LOCKED, lock=True)
            return read(repo, dataset_id)

        monkeypatch.setattr(SqlRepository, "get_dataset", get_dataset)
        second = rig.train(3)
        assert met
        _pending_after_a_lock(rig, second)
    finally:
        rig.services.close()


def test_a_lock_in_the_judging_without_scores_does_not_loop_for_ever(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scoring's attempts spent on locks (the active version's scoring), then the judging
    without scores meets a lock reading the new version's photos: judged (held) at once, where a
    step-away again was counted, and claimed again, for ever (nothing ends a training whose
    version is stored)."""
    score = LikenessService.score
    locked = {"baseline": True}

    def scored(service: LikenessService, version_id: str, **kw: object) -> object:
        if version_id == first.version_id and locked["baseline"]:
            raise DatabaseLockedError(LOCKED, lock=True)
        return score(service, version_id, **kw)  # type: ignore[arg-type]

    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        monkeypatch.setattr(LikenessService, "score", scored)
        second = rig.train(3)
        attempts = rig.services.training.lease.max_attempts
        runs = 1
        while runs < attempts:
            rig.clock.past(second)
            rig.services.training.run(second.id)
            second = rig.training(second.id)
            runs += 1
        assert second.error == SCORING_LOCKED, second.error
        # The next attempt judges it without scores; the new version's faces file gone (a face
        # model switched), its dataset's read kept waiting by a lock that does not end.
        rig.services.blobs.delete(reference_key(second.dataset_id, rig.faces))
        rig.locks = -1
        while not second.status.is_terminal and runs < attempts + 4:
            rig.clock.past(second)
            rig.services.training.run(second.id)
            second = rig.training(second.id)
            runs += 1
        assert second.status is TrainingStatus.SUCCEEDED, (runs, second.recoveries, second.error)
        assert runs == attempts + 1
        assert rig.met >= 1
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD, version.gate_reason
    finally:
        rig.services.close()


def test_a_crash_after_a_lock_is_not_said_as_a_lock(
        rig: _Rig, caplog: pytest.LogCaptureFixture) -> None:
    """An attempt stepped away on a lock, the next one's worker died (an OOM kill) rendering a
    probe: the take-over line says that worker stopped, not the lock the row still names."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        rig.locks = 1
        second = rig.train(3)
        assert second.error == SCORING_LOCKED, second.error
        rig.generator.crash_after = 1
        rig.clock.past(second)
        with pytest.raises(SimulatedCrash):
            rig.services.training.run(second.id)
        crashed = rig.training(second.id)
        assert crashed.error == SCORING_LOCKED  # the row's words are the lock's still
        rig.generator.crash_after = None
        _, took = rig.next_attempt(crashed, caplog)
        assert "database kept it waiting" not in took, took
        assert "stopped holding it" in took, took
    finally:
        rig.services.close()


def test_a_lock_escaped_to_the_run_s_fallback_is_said_as_a_lock(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A lock met outside the fences (a read after the scoring, outside ``_judge``'s try) reaches
    run()'s handler of the unexpected: its row says a lock, and so does the next attempt's line,
    not "this worker's restart" (a crash that never was)."""
    again = TrainingService._storage_again
    calls: list[int] = []
    armed = {"lock": False}

    def storage_again(service: TrainingService, held: object) -> None:
        if rig.scoring and armed["lock"]:
            calls.append(1)
            if len(calls) == 2:  # the one in _judge, after the scoring
                raise DatabaseLockedError(LOCKED, lock=True)
        again(service, held)  # type: ignore[arg-type]

    monkeypatch.setattr(TrainingService, "_storage_again", storage_again)
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        armed["lock"] = True
        second = rig.train(3)
        assert len(calls) == 2
        # Its version stored: said as its scoring's lock (spaced as one, ``_step_away``).
        assert second.error == SCORING_LOCKED, second.error
        _, took = rig.next_attempt(second, caplog)
        assert "restart" not in took, took
        assert "database kept it waiting" in took, took
    finally:
        rig.services.close()


def _verdicts_locked(rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The gate's verdict write (``apply_verdict``: the model's and version's rows FOR UPDATE)
    of the scoring kept waiting by a lock that never ends: each time met, listed."""
    apply = LikenessService.apply_verdict
    met: list[int] = []

    def apply_verdict(service: LikenessService, tx: object, verdict: object) -> object:
        if rig.scoring:
            met.append(1)
            raise DatabaseLockedError(LOCKED, lock=True)
        return apply(service, tx, verdict)  # type: ignore[arg-type]

    monkeypatch.setattr(LikenessService, "apply_verdict", apply_verdict)
    return met


def _holds(rig: _Rig, t: Training, *, runs: int) -> tuple[Training, list[timedelta]]:
    """``t`` run again once each hold has passed, ``runs`` times at most or until it ends: its
    row then, and each hold it was left with."""
    holds = []
    for _ in range(runs):
        if t.status.is_terminal:
            break
        assert t.lease_expires_at is not None
        holds.append(t.lease_expires_at - rig.clock.now())
        rig.clock.past(t)
        rig.services.training.run(t.id)
        t = rig.training(t.id)
    return t, holds


def test_a_lock_on_the_gate_s_verdict_write_is_spaced_as_the_scoring_s(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock on the gate's verdict write waits the scoring's gaps (1 min, 5 min, none before
    the judging without scores, then 15 min each), where it was stepped away from with no hold:
    a lock of minutes spent the scoring's attempts in seconds, then rang for ever."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        met = _verdicts_locked(rig, monkeypatch)
        second = rig.train(3)
        assert met
        assert second.error == SCORING_LOCKED, second.error
        second, holds = _holds(rig, second, runs=5)
        attempts = rig.services.training.lease.max_attempts
        gaps = rig.services.training.lease.outage_gaps
        assert holds[:attempts] == [gaps[0], gaps[1], timedelta(0)], holds
        assert holds[attempts:], holds
        assert all(h == gaps[-1] for h in holds[attempts:]), holds
        version = rig.version(second)
        assert version.gate_status is GateStatus.PENDING, version.gate_reason
    finally:
        rig.services.close()


@pytest.mark.parametrize("version_row", ["takes_the_hold", "locked_too"])
def test_a_lock_on_the_gate_s_verdict_write_that_never_ends_ends_the_training(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        version_row: str) -> None:
    """Bounded: once the judging without scores has been stopped ``max_attempts`` times as well,
    the training ends (succeeded: its version is stored) on its own row, the version kept and
    never activated: held, its reason the lock's, or, its row locked too, left undecided. Before,
    it was claimed again every 15 min for ever."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        _verdicts_locked(rig, monkeypatch)
        if version_row == "locked_too":
            def hold_unjudged(service: LikenessService, tx: object, version_id: str,
                              **kw: object) -> None:
                raise DatabaseLockedError(LOCKED, lock=True)

            monkeypatch.setattr(LikenessService, "hold_unjudged", hold_unjudged)
        second = rig.train(3)
        attempts = rig.services.training.lease.max_attempts
        with caplog.at_level(logging.INFO, logger="selfie_lora"):
            second, holds = _holds(rig, second, runs=3 * attempts)
        assert second.status is TrainingStatus.SUCCEEDED, (holds, second.error)
        assert len(holds) == 2 * attempts, holds
        assert second.error is None
        version = rig.version(second)
        model = rig.services.repo.get_model(second.model_id)
        assert model is not None
        assert model.active_version_id == first.version_id  # never activated
        if version_row == "locked_too":
            assert version.gate_status is GateStatus.PENDING, version.gate_reason
        else:
            assert version.gate_status is GateStatus.HELD, version.gate_reason
            reason = version.gate_reason or ""
            assert "could not judge version" in reason, reason
            assert "the last time because the database was busy (a lock)" in reason, reason
            assert "Versions page" in reason, reason
            assert "selfie-lora" not in reason, reason
        [ended] = [r.getMessage() for r in caplog.records
                   if "not judged by the likeness gate" in r.getMessage()]
        assert "database was busy" in ended, ended
        page = rig.services.likeness.log_page(user=rig.user, limit=5, before=None)
        [event] = [e for e in page.events if e["kind"] == "training_succeeded"
                   and e["data"]["training_id"] == second.id]
        assert event["data"]["gate"]["status"] == str(version.gate_status), event
    finally:
        rig.services.close()


@pytest.mark.parametrize("ending", ["unjudged", "canceled"])
def test_a_version_its_ended_training_left_undecided_is_held_once_its_row_is_free(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    """A version whose hold was refused by a lock when its training ended (left pending: every
    front then said it was still being scored, for good) is held by a later reconcile pass once
    the lock is gone, with its owner's reason, and never activated."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        _verdicts_locked(rig, monkeypatch)
        with monkeypatch.context() as m:
            def locked(service: LikenessService, tx: object, version_id: str,
                       **kw: object) -> None:
                raise DatabaseLockedError(LOCKED, lock=True)

            m.setattr(LikenessService, "hold_canceled", locked)
            m.setattr(LikenessService, "hold_unjudged", locked)
            second = rig.train(3)
            if ending == "canceled":
                rig.services.repo.request_cancel(second.id)
            attempts = rig.services.training.lease.max_attempts
            second, holds = _holds(rig, second, runs=3 * attempts)
            assert second.status.is_terminal, (holds, second.error)
            assert rig.version(second).gate_status is GateStatus.PENDING
            rig.services.training.reconcile()  # still locked: left as it is
            assert rig.version(second).gate_status is GateStatus.PENDING
        rig.services.training.reconcile()  # the lock is gone
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD, version.gate_reason
        reason = version.gate_reason or ""
        words = "was canceled" if ending == "canceled" else "could not judge version"
        assert words in reason, reason
        assert "selfie-lora" not in reason, reason
        model = rig.services.repo.get_model(second.model_id)
        assert model is not None
        assert model.active_version_id == first.version_id  # never activated
    finally:
        rig.services.close()


def _said_held(rig: _Rig, version: Version) -> None:
    """Its owner was told ``version`` was held as of any version the gate holds: one
    ``not_scored`` alert sent (and its delivery recorded on the version) with the hold's reason,
    and one ``gate_held`` entry in the retraining log."""
    sent = [a for a in rig.alerter.sent if a["version_id"] == version.id]
    assert len(sent) == 1, sent
    assert sent[0]["kind"] == "not_scored", sent
    assert sent[0]["alert_id"] == f"not_scored:{version.id}", sent
    assert sent[0]["message"] == version.gate_reason, sent
    assert version.alert is not None
    assert version.alert["delivery"]["delivered"] is True, version.alert
    page = rig.services.likeness.log_page(user=rig.user, limit=5, before=None)
    held = [e for e in page.events if e["kind"] == "gate_held"
            and e["data"]["version_id"] == version.id]
    assert len(held) == 1, page.events
    assert held[0]["data"]["reason"] == version.gate_reason, held


def _ended_unjudged(rig: _Rig, monkeypatch: pytest.MonkeyPatch, *,
                    hold_locked: bool) -> Training:
    """A first training succeeded, then a second whose verdict's write a lock kept waiting
    until it ended unjudged (succeeded), its version held then or, ``hold_locked`` (that hold
    refused by a lock too), left undecided for a reconcile pass: the second's row."""
    first = rig.train(0)
    assert first.status is TrainingStatus.SUCCEEDED, first.error
    _verdicts_locked(rig, monkeypatch)
    attempts = rig.services.training.lease.max_attempts
    with monkeypatch.context() as m:
        if hold_locked:
            def locked(service: LikenessService, tx: object, version_id: str,
                       **kw: object) -> None:
                raise DatabaseLockedError(LOCKED, lock=True)

            m.setattr(LikenessService, "hold_unjudged", locked)
        second = rig.train(3)
        second, holds = _holds(rig, second, runs=3 * attempts)
    assert second.status is TrainingStatus.SUCCEEDED, (holds, second.error)
    return second


@pytest.mark.parametrize("held_by", ["its_training_s_end", "the_reconcile_pass"])
def test_an_unjudged_version_held_alerts_its_owner_once_and_logs_it_once(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch, held_by: str) -> None:
    """A version the gate could not judge (a lock on its verdict's write that never ends), held
    by its training's end or, that hold refused by a lock too, by a later reconcile pass: its
    owner gets the ``not_scored`` alert and the retraining log its ``gate_held`` entry, once, as
    for any version the gate holds; later passes add none. Before, neither was made: the
    version was held without a word."""
    try:
        second = _ended_unjudged(rig, monkeypatch,
                                 hold_locked=held_by == "the_reconcile_pass")
        if held_by == "the_reconcile_pass":
            assert rig.version(second).gate_status is GateStatus.PENDING
            assert not rig.alerter.sent, rig.alerter.sent
        rig.services.training.reconcile()
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD, version.gate_reason
        _said_held(rig, version)
        rig.services.training.reconcile()  # nothing more to say
        _said_held(rig, rig.version(second))
    finally:
        rig.services.close()


def test_an_unjudged_version_s_alert_outlives_a_sender_that_dies_before_sending_it(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The alert of a version a reconcile pass held is recorded with the hold, claimed, as the
    gate's own: the process dying before it left, it is due to any reconciler once the claim
    runs out (not lost with the process, nor due before: its sender may still be sending)."""
    try:
        second = _ended_unjudged(rig, monkeypatch, hold_locked=True)
        rig.alerter.crash = True
        with pytest.raises(SimulatedCrash):
            rig.services.training.reconcile()
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD, version.gate_reason
        assert not rig.alerter.sent
        assert version.alert is not None
        assert version.alert["kind"] == "not_scored", version.alert
        assert version.alert["delivery"] is None, version.alert
        now = datetime.now(UTC)
        assert version.id not in rig.services.repo.due_alerts(now, limit=10)
        after_claim = now + alerts.CLAIM + timedelta(seconds=1)
        assert version.id in rig.services.repo.due_alerts(after_claim, limit=10)
        # Sent by a later round, once: not again by the next one.
        _sent_once_after_the_claim(rig, monkeypatch, version)
    finally:
        rig.services.close()


def _sent_once_after_the_claim(rig: _Rig, monkeypatch: pytest.MonkeyPatch,
                               version: Version) -> None:
    """``version``'s alert, claimed by a process that died, not sent yet: a reconciler's round
    past the claim sends it, the next one not again; and its ``gate_held`` entry is there once."""
    rig.services.training.reconcile()  # the claim still holds
    assert not rig.alerter.sent, rig.alerter.sent
    later = datetime.now(UTC) + alerts.CLAIM + timedelta(seconds=2)
    monkeypatch.setattr(rig.services.likeness, "_clock", lambda: later)
    assert rig.services.likeness.deliver_due_alerts() == 1
    assert rig.services.likeness.deliver_due_alerts() == 0
    assert [a["version_id"] for a in rig.alerter.sent] == [version.id], rig.alerter.sent
    recorded = rig.services.repo.get_version(version.id)
    assert recorded is not None
    _said_held(rig, recorded)


def test_an_unjudged_version_s_alert_outlives_a_death_before_its_training_s_end(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies between the judging without scores' end holding the version (its alert
    recorded, claimed) and that training's end: the next attempt ends the training without a
    second hold, alert or entry, and a reconciler sends the alert once its claim runs out."""
    try:
        assert rig.train(0).status is TrainingStatus.SUCCEEDED
        _verdicts_locked(rig, monkeypatch)
        hold_apart = TrainingService._hold_apart
        died: list[object] = []

        def then_died(service: TrainingService, training_id: str, version_id: str,
                      **kw: Any) -> object:
            alert = hold_apart(service, training_id, version_id, **kw)
            if not died:
                died.append(alert)
                raise SimulatedCrash("died after the hold committed")
            return alert

        monkeypatch.setattr(TrainingService, "_hold_apart", then_died)
        second = rig.train(3)
        attempts = rig.services.training.lease.max_attempts
        for _ in range(4 * attempts):
            if second.status.is_terminal:
                break
            rig.clock.past(second)
            with contextlib.suppress(SimulatedCrash):  # its lease then runs out
                rig.services.training.run(second.id)
            second = rig.training(second.id)
        assert died, "the hold was never reached"
        assert died[0] is not None  # it claimed the alert
        assert second.status is TrainingStatus.SUCCEEDED, second.error
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD
        _sent_once_after_the_claim(rig, monkeypatch, version)
    finally:
        rig.services.close()


def _another_left_undecided(rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> Training:
    """After ``_ended_unjudged``'s (its verdicts' write still locked): a third training ended
    unjudged (succeeded), its version's hold refused by a lock too, left undecided for a
    reconcile pass; the third's row."""
    with monkeypatch.context() as m:
        def locked(service: LikenessService, tx: object, version_id: str,
                   **kw: object) -> None:
            raise DatabaseLockedError(LOCKED, lock=True)

        m.setattr(LikenessService, "hold_unjudged", locked)
        third = rig.train(6)
        attempts = rig.services.training.lease.max_attempts
        third, holds = _holds(rig, third, runs=3 * attempts)
    assert third.status is TrainingStatus.SUCCEEDED, (holds, third.error)
    return third


def test_the_reconcile_pass_sends_a_bounded_number_of_unjudged_alerts(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconcile pass holds every version left undecided but sends at most
    ``ALERTS_PER_PASS`` of their alerts (as ``deliver_due_alerts`` caps its own): an endpoint
    slow to answer, not down, cost one send of the alert timeout each, up to the batch's 50 in
    one pass. The rest are left due (at once: the budget was spent before their hold), and a
    later round sends each once."""
    try:
        second = _ended_unjudged(rig, monkeypatch, hold_locked=True)
        third = _another_left_undecided(rig, monkeypatch)
        versions = [rig.version(second), rig.version(third)]
        assert all(v.gate_status is GateStatus.PENDING for v in versions)
        monkeypatch.setattr("selfie_lora.services.likeness.ALERTS_PER_PASS", 1)
        rig.services.training.reconcile()
        versions = [rig.version(second), rig.version(third)]
        assert all(v.gate_status is GateStatus.HELD for v in versions)
        assert len(rig.alerter.sent) == 1, rig.alerter.sent
        later = datetime.now(UTC) + alerts.CLAIM + timedelta(seconds=2)
        monkeypatch.setattr(rig.services.likeness, "_clock", lambda: later)
        rig.services.likeness.deliver_due_alerts()
        rig.services.likeness.deliver_due_alerts()
        assert sorted(a["version_id"] for a in rig.alerter.sent) == sorted(
            v.id for v in versions), rig.alerter.sent
    finally:
        rig.services.close()


def test_the_reconcile_pass_s_due_and_unjudged_alerts_share_one_send_budget(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass sends at most ``ALERTS_PER_PASS`` alerts in all: its due alerts first, then
    those of the versions left undecided it holds, from what is left. Before, each part had a
    cap of its own, so a pass sent up to twice the budget (each send up to the alert timeout
    against a slow endpoint). The unsent alert is left due at once (the budget was spent before
    its hold), and is sent once."""
    try:
        second, third, later = _due_and_left_undecided(rig, monkeypatch)
        # The second's alert due, the third's version to hold: both kinds, past a budget of 1.
        monkeypatch.setattr("selfie_lora.services.likeness.ALERTS_PER_PASS", 1)
        report = rig.services.training.reconcile()
        assert report.alerts_tried == 1
        assert rig.version(third).gate_status is GateStatus.HELD
        assert [a["version_id"] for a in rig.alerter.sent] == [
            rig.version(second).id], rig.alerter.sent
        # The third's alert, held with the budget spent, is due at once, not claimed: sent once.
        assert rig.version(third).id in rig.services.repo.due_alerts(later, limit=10)
        _each_sent_once_later(rig, monkeypatch, later, [second, third])
    finally:
        rig.services.close()


def _due_and_left_undecided(rig: _Rig, monkeypatch: pytest.MonkeyPatch
                            ) -> tuple[Training, Training, datetime]:
    """A second training ended unjudged, its version held by a pass whose sender died (its alert
    due once the claim runs out), and a third whose version is left undecided: the two, and a
    time when the second's alert is due (the likeness service's clock set to it)."""
    second = _ended_unjudged(rig, monkeypatch, hold_locked=True)
    rig.alerter.crash = True  # its sender dies: its alert is due once the claim runs out
    with pytest.raises(SimulatedCrash):
        rig.services.training.reconcile()
    assert rig.version(second).gate_status is GateStatus.HELD
    third = _another_left_undecided(rig, monkeypatch)
    assert rig.version(third).gate_status is GateStatus.PENDING
    assert not rig.alerter.sent, rig.alerter.sent
    later = datetime.now(UTC) + alerts.CLAIM + timedelta(seconds=2)
    monkeypatch.setattr(rig.services.likeness, "_clock", lambda: later)
    return second, third, later


def _each_sent_once_later(rig: _Rig, monkeypatch: pytest.MonkeyPatch, later: datetime,
                          trainings: list[Training]) -> None:
    """Past the claims taken at ``later``: the alerts of ``trainings``' versions are each sent
    once by the rounds that follow."""
    much_later = later + alerts.CLAIM + timedelta(seconds=2)
    monkeypatch.setattr(rig.services.likeness, "_clock", lambda: much_later)
    rig.services.likeness.deliver_due_alerts()
    rig.services.likeness.deliver_due_alerts()
    assert sorted(a["version_id"] for a in rig.alerter.sent) == sorted(
        rig.version(t).id for t in trainings), rig.alerter.sent


def test_a_pass_whose_due_alert_failed_sends_none_of_its_holds_alerts(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint down: the pass's round of due alerts fails its send, and the pass then holds
    the version left undecided without sending its alert (the endpoint is likely down still: one
    more timeout of the pass's, where a worker's stop allows 30 s); that alert is left due at
    once, and is sent once the endpoint answers. Before, the holds sent it all the same."""
    try:
        second, third, later = _due_and_left_undecided(rig, monkeypatch)
        rig.alerter.fail = True
        calls = rig.alerter.calls
        assert rig.services.training.reconcile().alerts_tried == 1
        assert rig.alerter.calls == calls + 1  # the due one only
        assert rig.version(third).gate_status is GateStatus.HELD
        assert rig.version(third).id in rig.services.repo.due_alerts(later, limit=10)
        rig.alerter.fail = False
        _each_sent_once_later(rig, monkeypatch, later, [second, third])
    finally:
        rig.services.close()


def test_a_pass_whose_round_of_due_alerts_failed_sends_none_of_its_holds_alerts(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass's round of due alerts fails (a lock on an alert's claim: how many of its alerts
    went is not known): the pass still holds the version left undecided, but sends no alert
    more; the hold's is left due at once, and is sent once, as the one the round left."""
    try:
        second, third, later = _due_and_left_undecided(rig, monkeypatch)
        calls = rig.alerter.calls

        def locked(*args: object, **kwargs: object) -> None:
            raise DatabaseLockedError(LOCKED, lock=True)

        with monkeypatch.context() as m:
            m.setattr(rig.services.repo, "claim_alert", locked)
            with pytest.raises(DatabaseLockedError):
                rig.services.training.reconcile()
        assert rig.alerter.calls == calls
        assert rig.version(third).gate_status is GateStatus.HELD
        assert rig.version(third).id in rig.services.repo.due_alerts(later, limit=10)
        _each_sent_once_later(rig, monkeypatch, later, [second, third])
    finally:
        rig.services.close()


def test_a_hold_whose_pass_may_send_no_more_leaves_its_alert_due_at_once(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that may send no more before a hold (here the worker's stop, as the consumer's
    reconcile at a stop): the hold records its alert due at once, not claimed, so the next pass
    sends it, once. Before, the hold claimed it all the same and it waited out the 5-minute
    claim, sent by nobody meanwhile."""
    try:
        second = _ended_unjudged(rig, monkeypatch, hold_locked=True)
        assert rig.version(second).gate_status is GateStatus.PENDING
        calls = rig.alerter.calls
        stopping = threading.Event()
        stopping.set()
        rig.services.training.reconcile(stopping=stopping)
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD
        assert rig.alerter.calls == calls
        assert rig.services.repo.due_alerts(datetime.now(UTC), limit=10) == [version.id]
        assert rig.services.training.reconcile().alerts_tried == 1
        assert rig.services.training.reconcile().alerts_tried == 0
        assert [a["version_id"] for a in rig.alerter.sent] == [version.id], rig.alerter.sent
    finally:
        rig.services.close()


def test_a_user_s_cancel_with_the_version_s_rows_locked_is_not_refused(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cancel of a training nobody holds, its stored version's rows locked: ended
    canceled on its own row (the version's hold tried apart, then by the reconcile pass), where
    the lock refused the user's cancel itself."""
    try:
        first, second, already_ended = _canceled_with_the_hold_locked(rig, monkeypatch)
        assert not already_ended
        _canceled_kept(rig, rig.training(second.id), [], first=first, gate=GateStatus.PENDING)
        rig.services.training.reconcile()
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD
        assert "was canceled" in (version.gate_reason or ""), version.gate_reason
    finally:
        rig.services.close()


def test_the_reconcile_pass_does_not_wait_out_the_lock_on_a_version_left_undecided(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock that left a version undecided is still held (another connection's write
    transaction): the reconcile pass's hold waits for it a moment only, after the owed remote
    cancels, and the next pass holds the version once the lock is gone. Before, each pass waited
    out the database's whole wait (SQLite's busy timeout, 30 s; PostgreSQL's statement timeout)
    for every such version, the owed remote cancels behind it."""
    try:
        _, second, _ = _canceled_with_the_hold_locked(rig, monkeypatch)
        third = rig.train(6)  # a second version left undecided the same way
        with monkeypatch.context() as m:
            def locked(service: LikenessService, tx: object, version_id: str) -> bool:
                raise DatabaseLockedError(LOCKED, lock=True)

            m.setattr(LikenessService, "hold_canceled", locked)
            rig.services.training.cancel_with_outcome(user=rig.user, training_id=third.id)
        assert rig.version(second).gate_status is GateStatus.PENDING
        assert rig.version(third).gate_status is GateStatus.PENDING
        tried: list[int] = []
        briefly = SqlRepository.atomic_briefly

        def atomic_briefly(repo: SqlRepository) -> contextlib.AbstractContextManager[object]:
            tried.append(1)
            return briefly(repo)

        monkeypatch.setattr(SqlRepository, "atomic_briefly", atomic_briefly)
        parts: list[str] = []
        remotes = TrainingService._cancel_pending_remotes
        holds = TrainingService._hold_left_undecided

        def cancel_pending_remotes(service: TrainingService, **kw: set[str]) -> int:
            parts.append("remote cancels")
            return remotes(service, **kw)

        def hold_left_undecided(service: TrainingService, **kw: AlertSends) -> None:
            parts.append("holds")
            holds(service, **kw)

        monkeypatch.setattr(TrainingService, "_cancel_pending_remotes", cancel_pending_remotes)
        monkeypatch.setattr(TrainingService, "_hold_left_undecided", hold_left_undecided)
        path = rig.services.repo.engine.url.database
        assert path is not None
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another's write transaction: the lock
            started = time.monotonic()
            rig.services.training.reconcile()
            took = time.monotonic() - started
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert took < 10, took  # the whole wait was 30 s
        assert parts == ["remote cancels", "holds"], parts
        assert len(tried) == 1, tried  # stopped at the first still locked
        assert rig.version(second).gate_status is GateStatus.PENDING
        assert rig.version(third).gate_status is GateStatus.PENDING
        rig.services.training.reconcile()  # the lock is gone
        for t in (second, third):
            version = rig.version(t)
            assert version.gate_status is GateStatus.HELD, version.gate_reason
            assert "was canceled" in (version.gate_reason or ""), version.gate_reason
    finally:
        rig.services.close()


def _canceled_with_the_hold_locked(rig: _Rig, monkeypatch: pytest.MonkeyPatch
                                   ) -> tuple[Training, Training, bool]:
    """A first training succeeded, a second stepped away on the verdict's lock with its version
    stored, then canceled by its user while its version's hold is refused by a lock: the two,
    and whether the cancel was answered "already ended"."""
    first = rig.train(0)
    assert first.status is TrainingStatus.SUCCEEDED, first.error
    _verdicts_locked(rig, monkeypatch)
    second = rig.train(3)
    with monkeypatch.context() as m:
        def locked(service: LikenessService, tx: object, version_id: str) -> bool:
            raise DatabaseLockedError(LOCKED, lock=True)

        m.setattr(LikenessService, "hold_canceled", locked)
        outcome = rig.services.training.cancel_with_outcome(user=rig.user, training_id=second.id)
    return first, second, outcome.already_ended


def _canceled_kept(rig: _Rig, t: Training, holds: list[timedelta], *, first: Training,
                   gate: GateStatus) -> None:
    """``t`` ended canceled, its version kept (``gate``), the version before it still active."""
    assert t.status is TrainingStatus.CANCELED, (holds, t.error)
    assert t.error == CANCELED_MESSAGE, t.error
    version = rig.version(t)
    assert version.gate_status is gate, version.gate_reason
    model = rig.services.repo.get_model(t.model_id)
    assert model is not None
    assert model.active_version_id == first.version_id  # never activated


def _canceled_around_the_unjudged_hold(rig: _Rig, monkeypatch: pytest.MonkeyPatch, *,
                                       after: bool) -> Version:
    """A first training succeeded, a second ended by the judging without scores (a lock on its
    verdict's write that never ends) with its user's cancel committed just before its version's
    hold (PostgreSQL's: or while that hold waits on the version's rows, which the hold's read
    of the training after that wait sees) or, ``after``, once the hold is committed: the
    training ended canceled, the version kept and held; the version."""
    first = rig.train(0)
    assert first.status is TrainingStatus.SUCCEEDED, first.error
    _verdicts_locked(rig, monkeypatch)
    hold_apart = TrainingService._hold_apart
    second = rig.train(3)

    def canceling(service: TrainingService, training_id: str, version_id: str,
                  **kw: Any) -> object:
        if not after:
            rig.services.repo.request_cancel(training_id)
        alert = hold_apart(service, training_id, version_id, **kw)
        if after:
            rig.services.repo.request_cancel(training_id)
        return alert

    monkeypatch.setattr(TrainingService, "_hold_apart", canceling)
    attempts = rig.services.training.lease.max_attempts
    second, holds = _holds(rig, second, runs=3 * attempts)
    _canceled_kept(rig, second, holds, first=first, gate=GateStatus.HELD)
    return rig.version(second)


def test_a_cancel_asked_while_an_unjudged_version_is_held_ends_the_training_canceled(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cancel committed while the judging without scores' end waits on its version's
    hold: the training ends canceled, as the gate's own end does, not succeeded after the cancel
    was answered as asked; the version is held as a canceled training's. (Its cancel was asked
    inside the hold's transaction before: the hold now rolls that transaction back on a cancel,
    as it would a cancel another connection committed.)"""
    try:
        version = _canceled_around_the_unjudged_hold(rig, monkeypatch, after=False)
        # Its owner asked for the end: no alert nor an unjudged reason (before, both, against
        # the README).
        assert "was canceled" in (version.gate_reason or ""), version.gate_reason
        assert version.alert is None, version.alert
        rig.services.training.reconcile()
        assert not rig.alerter.sent, rig.alerter.sent
    finally:
        rig.services.close()


def test_a_cancel_asked_once_an_unjudged_version_is_held_leaves_its_alert(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cancel committed after the judging without scores' end held the version
    unjudged (its alert recorded with the hold): the training ends canceled, and the alert,
    decided before the cancel, is sent once, as the README says."""
    try:
        version = _canceled_around_the_unjudged_hold(rig, monkeypatch, after=True)
        assert "could not judge" in (version.gate_reason or ""), version.gate_reason
        rig.services.training.reconcile()
        assert [a["version_id"] for a in rig.alerter.sent] == [version.id], rig.alerter.sent
    finally:
        rig.services.close()


@pytest.mark.parametrize("after", [False, True])
def test_the_likeness_alert_line_is_logged_only_for_a_hold_that_committed(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        after: bool) -> None:
    """The operator's "likeness alert" line of an unjudged hold is written once the hold
    committed: a cancel asked before the hold rolls it back (no alert recorded nor sent), and
    the line, written inside that transaction before, told of an alert that never was. A cancel
    asked once it committed leaves its alert, and its one line."""
    try:
        with caplog.at_level(logging.INFO, logger="selfie_lora"):
            version = _canceled_around_the_unjudged_hold(rig, monkeypatch, after=after)
        said = [r.getMessage() for r in caplog.records if "likeness alert" in r.getMessage()]
        if after:
            assert version.alert is not None
            assert len(said) == 1, said
            assert f"version {version.number} of model {version.model_id} held back" in said[0]
        else:
            assert version.alert is None, version.alert
            assert said == [], said
    finally:
        rig.services.close()


def test_a_cancel_with_the_version_s_rows_locked_for_good_ends_the_training(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel asked of its worker while a lock that never ends sits on the version's rows
    (the verdict's write and the cancel's hold both refused): the training ends canceled on its
    own row, the version kept undecided, never activated. Before, each claim's cancel took the
    hold in the training's own transaction, stepped away on the lock and was claimed again every
    15 min for ever, its row saying the version was still being scored."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        _verdicts_locked(rig, monkeypatch)

        def locked(service: LikenessService, tx: object, version_id: str,
                   **kw: object) -> None:
            raise DatabaseLockedError(LOCKED, lock=True)

        monkeypatch.setattr(LikenessService, "hold_canceled", locked)
        monkeypatch.setattr(LikenessService, "hold_unjudged", locked)
        second = rig.train(3)
        rig.services.repo.request_cancel(second.id)  # the user's cancel, asked of its worker
        second, holds = _holds(rig, second, runs=20)
        assert len(holds) == 1, holds
        _canceled_kept(rig, second, holds, first=first, gate=GateStatus.PENDING)
    finally:
        rig.services.close()


def test_the_workers_note_of_a_lock_is_not_shown_with_the_trainer_s_figures(
        rig: _Rig) -> None:
    """The attempt that stepped away on a lock, noted on the training's metrics for the next
    claim's line, is the workers' own: not copied into the version's likeness record (GET
    /api/model/versions/{id}'s ``training``) nor the retraining log's ``training_succeeded``."""
    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        rig.locks = 1
        second = rig.train(3)
        assert "stepped_away_on_lock" in second.metrics  # what the next claim reads
        rig.clock.past(second)
        rig.services.training.run(second.id)
        done = rig.training(second.id)
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        assert done.version_id is not None
        record = rig.services.repo.get_likeness(done.version_id)
        assert record is not None
        shown = record.training.get("metrics")
        assert shown, record.training
        assert "stepped_away_on_lock" not in shown, shown
        page = rig.services.likeness.log_page(user=rig.user, limit=5, before=None)
        [event] = [e for e in page.events if e["kind"] == "training_succeeded"
                   and e["data"]["training_id"] == done.id]
        assert event["data"]["metrics"], event
        assert "stepped_away_on_lock" not in event["data"]["metrics"], event
    finally:
        rig.services.close()


def test_a_judging_without_scores_whose_workers_keep_dying_ends_the_training(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bound for workers that die on the gate's verdict write (an OOM kill) rather than
    a lock: the training ends, its version held and said as workers that stopped."""
    def apply_verdict(service: LikenessService, tx: object, verdict: object) -> object:
        raise SimulatedCrash("killed writing the verdict")

    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        monkeypatch.setattr(LikenessService, "apply_verdict", apply_verdict)
        with pytest.raises(SimulatedCrash):
            rig.train(3)
        [second] = [t for t in rig.services.repo.list_trainings(first.model_id)
                    if t.id != first.id]
        attempts = rig.services.training.lease.max_attempts
        runs = 1
        while not second.status.is_terminal and runs < 3 * attempts:
            rig.clock.past(second)
            with contextlib.suppress(SimulatedCrash):  # killed again, as the worker would be
                rig.services.training.run(second.id)
            second = rig.training(second.id)
            runs += 1
        assert second.status is TrainingStatus.SUCCEEDED, (runs, second.error)
        assert runs == 2 * attempts + 1, runs
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD, version.gate_reason
        reason = version.gate_reason or ""
        assert f"the worker scoring it stopped {2 * attempts} times" in reason, reason
        model = rig.services.repo.get_model(second.model_id)
        assert model is not None
        assert model.active_version_id == first.version_id
    finally:
        rig.services.close()


def test_the_reconciler_s_cancel_with_the_version_s_rows_locked_ends_the_training(
        rig: _Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its user asked to cancel, its worker is gone, and its stored version's rows are locked:
    the reconciler ends it canceled on its own row (the version's hold tried apart, then by a
    later pass), where the lock failed that part of every pass while it lasted (the training
    left processing, the trainings after it in the pass neither queued again nor canceled)."""
    import dataclasses

    try:
        first = rig.train(0)
        assert first.status is TrainingStatus.SUCCEEDED, first.error
        _verdicts_locked(rig, monkeypatch)
        second = rig.train(3)
        t = rig.training(second.id)
        assert not t.status.is_terminal, t
        assert t.version_id is not None, t
        gone = rig.clock.now() - timedelta(hours=1)  # a holder silent for an hour
        rig.services.repo.save_training(dataclasses.replace(
            t, lease_owner="gone-worker", heartbeat_at=gone, lease_expires_at=gone))
        rig.services.repo.request_cancel(t.id)  # asked while it was held: the holder ends it
        with monkeypatch.context() as m:
            def locked(service: LikenessService, tx: object, version_id: str) -> bool:
                raise DatabaseLockedError(LOCKED, lock=True)

            m.setattr(LikenessService, "hold_canceled", locked)
            report = rig.services.training.reconcile()
        assert second.id in report.canceled
        _canceled_kept(rig, rig.training(second.id), [], first=first, gate=GateStatus.PENDING)
        rig.services.training.reconcile()  # the lock gone: the pass holds it
        version = rig.version(second)
        assert version.gate_status is GateStatus.HELD
        assert "was canceled" in (version.gate_reason or ""), version.gate_reason
    finally:
        rig.services.close()
