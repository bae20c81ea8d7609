"""Random sequences of uploads, starts, scale changes, changes of the configured default trainer
version, failures, cancellations, likeness scorings, explicit activations and workers dying at
any point (while training, while scoring): the contract's retraining invariants, the likeness
gate's hold and "every training ends exactly once" after every step.

The face analyzer is a stand-in: the training photos' face is ``E0``; a probe image's face is
``E0`` ("same": identity 1), another person's ("other": identity 0) or none ("none": identity 0),
as the rule that runs the likeness jobs decides."""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import random
import re
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import Engine

from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.dataset.checks import CheckPolicy
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.domain.entities import GateStatus, Model, TrainingStatus
from selfie_lora.domain.lease import INTERRUPTED_MESSAGE, LeasePolicy
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.errors import ConflictError, DatasetRejectedError, ErrorCode, InvalidInputError
from selfie_lora.services.generation import GenerationService
from selfie_lora.services.intake import IntakeService
from selfie_lora.services.likeness import LikenessService
from selfie_lora.services.models import ModelService
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import UserService
from selfie_lora.testing.fakes import (
    FakeFaceAnalyzer,
    FakeGenerator,
    FakeTrainer,
    InMemoryQueue,
    RecordingTelemetry,
    SimulatedCrash,
)
from tests.support.backends import copy_migrated_sqlite
from tests.support.photos import synthetic_photo

TRIGGER = re.compile(r"^[a-z0-9]+$")
VERSIONS = ("local-tiny-v1", "local-flux-v1", "local-tiny-v1")
PROBE_SIDE = 32  # FakeGenerator's images; the training photos are larger
E0 = (0.0,) * 8
OTHER = (0.5,) * 8  # ~1.41 from E0: similarity 0
IDENTITY = {"same": 1.0, "other": 0.0, "none": 0.0}
TOLERANCE = 0.02
POLICY = LeasePolicy(ttl=timedelta(seconds=30), heartbeat=timedelta(seconds=5), max_attempts=3)

# Each example's database and blobs on tmpfs where there is one: a step commits and fsyncs
# dozens of times, and on a busy disk those waits cost more than the step's own work. The code
# under test runs the same on either.
TMPFS = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

# The same seed gives the same bytes: each example uploads the same photos, drawn once.
photo = functools.cache(synthetic_photo)


@functools.cache
def shared_engine() -> Engine:
    """One database for every example, emptied at each one's start (``emptied``): a new engine
    per example compiled its thirty-odd statements again every time (SQLAlchemy's statement
    cache is the engine's), and opened and closed its file."""
    folder = Path(tempfile.mkdtemp(prefix="sl-sm-db-", dir=TMPFS))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    copy_migrated_sqlite(folder / "db.sqlite")
    engine = make_engine(f"sqlite:///{folder / 'db.sqlite'}")
    atexit.register(engine.dispose)  # before the folder goes (atexit runs the last first)
    return engine


def emptied(engine: Engine) -> Engine:
    """``engine``'s database as the migrations left it, whatever the example before it (or its
    failure) wrote: every row deleted but alembic_version's, the only one the migrations write.
    The foreign keys are checked at the commit, when every table is empty (models and versions
    name each other)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
        tables = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name != 'alembic_version'").scalars().all()
        for table in tables:
            conn.exec_driver_sql(f'DELETE FROM "{table}"')
    return engine


class Retraining(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sl-sm-", dir=TMPFS))
        self.repo = SqlRepository(emptied(shared_engine()))
        self.blobs = FileSystemBlobStore(self.dir / "blobs")
        self.queue = InMemoryQueue()
        self.trainer = FakeTrainer(steps=2)
        self.generator = FakeGenerator(size=PROBE_SIDE)
        self.likeness = "same"
        self.faces = FakeFaceAnalyzer(embed=self._face, box_fraction=0.5)
        self.default_version = "local-tiny-v1"
        # The lease clock: a worker's death is noticed once the clock passes its lease.
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.telemetry = RecordingTelemetry()
        self.scorer = LikenessService(
            repo=self.repo, blobs=self.blobs,
            generation=GenerationService(repo=self.repo, blobs=self.blobs,
                                         generators={"local": self.generator}),
            faces=self.faces, tolerance=TOLERANCE, probe_count=2,
        )
        self.intake = IntakeService(
            repo=self.repo, blobs=self.blobs, limits=UploadLimits(),
            policy=CheckPolicy(min_photos=1, max_photos=50), analyzer=self.faces,
            defaults=self.defaults, workers=1,
        )
        self.training = TrainingService(
            repo=self.repo, blobs=self.blobs, queue=self.queue, trainers={"local": self.trainer},
            defaults=self.defaults, work_dir=self.dir / "work", rng=random.Random(0),
            likeness=self.scorer, intake=self.intake, lease=POLICY, clock=lambda: self.now,
            owner="worker-a", telemetry=self.telemetry,
        )
        self.models = ModelService(repo=self.repo, blobs=self.blobs)
        self.user, _ = UserService(repo=self.repo).create(name="ann")
        self.uploads = 0
        # What the invariants are checked against.
        self.first: dict[str, str] | None = None
        self.scale_set: float | None = None
        self.expected_active: str | None = None
        self.published: set[str] = set()  # trainings that stored a version
        self.ended: dict[str, str] = {}  # training id -> how it ended, recorded once
        # The likeness model: each version's identity when it was scored, what was active when a
        # pending version was stored, and what a user's early activation replaced.
        self.identity: dict[str, float] = {}
        self.active_when_stored: dict[str, str | None] = {}
        self.activations = 0  # the user's choices of a version so far
        self.activations_when_stored: dict[str, int] = {}
        self.replaced: dict[str, str | None] = {}
        self.orphans: set[str] = set()  # trainings whose worker died holding them
        self.takeovers: dict[str, int] = {}  # training id -> times a worker took it over
        self.first_probes: tuple[object, ...] = ()

    def _face(self, image: object) -> tuple[float, ...] | None:
        shape = getattr(image, "shape", (0, 0))
        if int(shape[0]) > PROBE_SIDE:  # a training photo
            return E0
        return {"same": E0, "other": OTHER, "none": None}[self.likeness]

    def defaults(self) -> TrainingDefaults:
        return TrainingDefaults(backend="local", trainer_version=self.default_version,
                                owner="local", replicate_recipe="replicate-person-v1",
                                probe_count=2)

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _active_training(self) -> str | None:
        model = self.repo.get_model_for_user(self.user.id)
        if model is None:
            return None
        active = [t.id for t in self.repo.list_trainings(model.id) if t.status.is_active]
        return active[0] if active else None

    @initialize()
    def first_upload(self) -> None:
        self.upload()

    def _first_training_takes_flux(self) -> bool:
        """The next training is the model's first and takes the configured default (invariant
        3), a FLUX.1 recipe at 512 px: the synthetic photos' 62 px faces are judged for it."""
        model = self.repo.get_model_for_user(self.user.id)
        untrained = model is None or not self.repo.list_trainings(model.id)
        return untrained and self.default_version == "local-flux-v1"

    @rule()
    def upload(self) -> None:
        self.uploads += 1
        files = [UploadedFile(name=f"p{i}.jpg", data=photo(self.uploads * 10 + i))
                 for i in range(2)]
        try:
            self.intake.ingest_files(user=self.user, files=files)
        except DatasetRejectedError:
            # Judged for the training that will happen: only that one refuses these faces.
            assert self._first_training_takes_flux(), "photos refused for the pinned recipe"
            event("upload refused for the first training's configured recipe")

    @rule()
    def upload_without_start(self) -> None:
        """``POST /api/training/upload-zip`` with ``start=false``: the first one makes the
        model, which every later training keeps."""
        self.uploads += 1
        files = [UploadedFile(name=f"p{i}.jpg", data=photo(self.uploads * 10 + i))
                 for i in range(2)]
        try:
            result = self.training.upload(user=self.user, read=lambda: (files, ()), start=False)
        except DatasetRejectedError:
            assert self._first_training_takes_flux(), "photos refused for the pinned recipe"
            return
        assert result.training is None
        assert result.model is not None
        self._remember_first(result.model)

    def _remember_first(self, model: Model) -> None:
        if self.first is None:
            self.first = {"trigger_word": model.trigger_word,
                          "destination": model.destination,
                          "trainer_version": model.trainer_version}
            self.first_probes = model.probes

    @rule()
    def start(self) -> None:
        had_active = self._active_training() is not None
        model = self.repo.get_model_for_user(self.user.id)
        trained_before = model is not None and bool(self.repo.list_trainings(model.id))
        has_version = model is not None and bool(self.repo.list_versions(model.id))
        takes_flux = self._first_training_takes_flux()
        try:
            result = self.training.start(user=self.user, dataset_id=None)
        except ConflictError as exc:
            again = exc.code == ErrorCode.PHOTOS_NEED_UPLOAD_AGAIN
        else:
            again = None
        if again is not None:
            if again:
                # The first training pins the configured FLUX.1 recipe; the photos were
                # prepared at 64 px for the tiny one the upload judged them for.
                assert takes_flux, "photos asked for again although the recipe is the same"
                assert not had_active
                event("first training asks for the photos again at the pinned recipe")
                return
            assert had_active, "409 although no training was queued or running"
            return
        assert not had_active, "a second training was queued while one was active"
        self._remember_first(result.model)
        if not trained_before:
            # Contract invariant 3: the first training pins the configured version, whatever
            # the upload that made the model was pinned to (this machine never re-pins).
            assert self.first is not None
            assert result.model.trainer_version == self.default_version
            self.first["trainer_version"] = result.model.trainer_version
        # A model an upload made is not trained yet: its first training is no retraining; nor
        # is one after a first training that failed or was canceled (no version to retrain).
        assert result.training.is_retraining is has_version
        if not trained_before:
            event("first training of a model " + ("an upload made" if model else "it made"))

    @rule(outcome=st.sampled_from(["succeeded", "failed", "canceled", "crash"]),
          likeness=st.sampled_from(["same", "other", "none"]))
    def start_and_run(self, outcome: str, likeness: str) -> None:
        # The common path in one step, so short sequences already reach retraining.
        self.start()
        self.run_queued(outcome, likeness)

    @precondition(lambda self: bool(self.queue.pending))
    @rule(outcome=st.sampled_from(["succeeded", "failed", "canceled", "crash"]),
          likeness=st.sampled_from(["same", "other", "none"]))
    def run_queued(self, outcome: str, likeness: str) -> None:
        """A worker takes the queued training; it succeeds (and is scored and judged), fails,
        is canceled on the backend, or the worker dies in the middle of the training."""
        tid = self._active_training()
        if not self.queue.pending or tid is None or tid in self.orphans:
            return
        self.trainer.outcomes.append(outcome)
        self._run(tid, likeness)

    @precondition(lambda self: bool(self.queue.pending))
    @rule(likeness=st.sampled_from(["same", "other", "none"]))
    def worker_dies_while_scoring(self, likeness: str) -> None:
        """The trainer succeeds, the version is stored, and the worker dies at the first probe."""
        tid = self._active_training()
        if not self.queue.pending or tid is None or tid in self.orphans:
            return
        self.trainer.outcomes.append("succeeded")
        self.generator.crash_after = 1
        self._run(tid, likeness)

    @precondition(lambda self: bool(self.orphans))
    @rule(likeness=st.sampled_from(["same", "other", "none"]), same_name=st.booleans(),
          outcome=st.sampled_from(["succeeded", "crash"]))
    def restart_worker(self, likeness: str, same_name: bool, outcome: str) -> None:
        """A worker starts: under the dead one's name it takes its trainings over at once;
        another worker does once their leases have run out. It may die again."""
        tid = next(iter(self.orphans))
        before = self.repo.get_training(tid)
        assert before is not None
        if same_name:
            report = self.training.reconcile(dead_owners=("worker-a",))
        else:
            self.now += POLICY.ttl + timedelta(seconds=1)
            report = self.training.reconcile()
        assert tid in report.enqueued or tid in report.canceled
        self.orphans.discard(tid)
        if tid in report.canceled:
            self._check_end(tid, active_at_judge=None)
            return
        self.takeovers[tid] = self.takeovers.get(tid, 0) + 1
        if before.version_id is None:
            self.trainer.outcomes.append(outcome)
        elif outcome == "crash":
            self.generator.crash_after = 1
        self._run(tid, likeness)
        # What was set up for the run but not used (an exhausted training reaches neither).
        self.trainer.outcomes.clear()
        self.generator.crash_after = None

    @rule(while_scoring=st.booleans(), likeness=st.sampled_from(["same", "other", "none"]),
          same_name=st.booleans())
    def crash_loop(self, while_scoring: bool, likeness: str, same_name: bool) -> None:
        """A training whose worker dies every time, as a poison job would: after the allowed
        take-overs it fails (or, with its version stored, is judged without scores)."""
        self.start()
        tid = self._active_training()
        if tid is None or tid in self.orphans or not self.queue.pending:
            return
        if while_scoring:
            self.worker_dies_while_scoring(likeness)
        else:
            self.run_queued("crash", likeness)
        for _ in range(POLICY.max_attempts):
            if tid not in self.orphans:
                break
            self.restart_worker(likeness, same_name, "crash")
        assert tid not in self.orphans, "a worker that keeps dying is retried for ever"

    def _run(self, tid: str, likeness: str) -> None:
        self.likeness = likeness
        before_model = self.repo.get_model_for_user(self.user.id)
        assert before_model is not None
        before = self.repo.get_training(tid)
        assert before is not None
        jobs = len(self.trainer.jobs)
        try:
            self.queue.drain(self.training.run)
        except SimulatedCrash:
            self.orphans.add(tid)
            self.queue.pending.clear()  # the message was taken by the worker that died
        after = self.repo.get_training(tid)
        assert after is not None
        if before.version_id is not None:
            assert len(self.trainer.jobs) == jobs, "a stored version was trained again"
        if after.version_id is not None and tid not in self.published:
            self.published.add(tid)
            self.active_when_stored[after.version_id] = before_model.active_version_id
            self.activations_when_stored[after.version_id] = self.activations
        if tid in self.orphans:
            assert not after.status.is_terminal
            assert after.lease_owner == "worker-a"  # held by the dead worker
            assert self.repo.get_model_for_user(self.user.id) == before_model  # nothing moved
            return
        # Nothing but the user moves the active version, and not during a run.
        self._check_end(tid, active_at_judge=before_model.active_version_id)

    def _check_end(self, tid: str, *, active_at_judge: str | None) -> None:
        """``tid`` ended: record how, once, and check the gate's decision on its version."""
        t = self.repo.get_training(tid)
        assert t is not None
        assert t.status.is_terminal, t
        assert t.lease_owner is None  # an ended training holds nothing
        assert tid not in self.ended, "a training ended twice"
        self.ended[tid] = str(t.status)
        # The operator's figures count every end once, with its outcome, and every take-over.
        assert sorted(status for _b, status, _s, _c in self.telemetry.ended) == \
            sorted(self.ended.values())
        assert len(self.telemetry.recoveries) == sum(self.takeovers.values())
        # Every take-over from a dead worker is counted; the last one allowed fails a training
        # that has no version yet, and has a stored version judged without scores.
        assert t.recoveries == self.takeovers.get(tid, 0)
        exhausted = t.recoveries >= POLICY.max_attempts
        if exhausted:
            event("a training ended after its workers died too often"
                  + (" while scoring" if t.version_id else " while training"))
        if exhausted and t.version_id is None:
            assert t.status is TrainingStatus.FAILED
            assert t.error == INTERRUPTED_MESSAGE.format(count=t.recoveries)
        if t.status is TrainingStatus.FAILED:
            assert t.error
        if t.version_id is None:
            return
        version = self.repo.get_version(t.version_id)
        assert version is not None
        model = self.repo.get_model_for_user(self.user.id)
        assert model is not None
        if t.status is TrainingStatus.CANCELED:
            assert version.gate_status is GateStatus.HELD or "override" in version.gate_details
            return
        assert t.status is TrainingStatus.SUCCEEDED
        vid = version.id
        # Judged against what was active then, or, when the user activated it while it was
        # scored, against what that activation replaced.
        baseline = self.replaced.get(vid, active_at_judge)
        if baseline == vid:
            baseline = None
        if exhausted:
            # Never scored: it passes only with nothing to beat.
            passes = baseline is None
            record = self.repo.get_likeness(vid)
            assert record is not None
            assert record.error is not None
            assert "stopped" in record.error
        else:
            self.identity.setdefault(vid, IDENTITY[self.likeness])
            if baseline is not None and baseline not in self.identity:
                self.identity[baseline] = IDENTITY[self.likeness]  # scored on demand, now
            base = self.identity.get(baseline) if baseline else None
            # Only no baseline at all lets a version pass unjudged: one without a score holds it.
            passes = baseline is None or (base is not None
                                          and self.identity[vid] >= base - TOLERANCE)
        expected = GateStatus.PASSED if passes else GateStatus.HELD
        assert version.gate_status is expected, version.gate_reason
        assert (version.alert is not None) == (expected is GateStatus.HELD)
        # A pass activates it unless the user chose a version since it was stored (even the
        # one that was active then).
        untouched = (active_at_judge == self.active_when_stored[vid]
                     and self.activations == self.activations_when_stored[vid])
        if passes and (active_at_judge == vid or untouched):
            self.expected_active = vid

    @precondition(lambda self: bool(self.queue.pending))
    @rule()
    def cancel_queued(self) -> None:
        tid = self._active_training()
        if not self.queue.pending or tid is None or tid in self.orphans:
            return
        self.training.cancel(user=self.user, training_id=tid)
        t = self.repo.get_training(tid)
        assert t is not None
        assert str(t.status) == "canceled"
        self._check_end(tid, active_at_judge=None)
        self.queue.drain(self.training.run)  # the worker finds it terminal and does nothing
        t = self.repo.get_training(tid)
        assert t is not None
        assert str(t.status) == "canceled"

    @precondition(lambda self: bool(self.orphans))
    @rule()
    def cancel_orphan(self) -> None:
        """Its user cancels a training whose worker died: it ends canceled by the next
        reconciliation once the lease is out, and never activates anything."""
        tid = next(iter(self.orphans))
        before = self.repo.get_training(tid)
        assert before is not None
        self.training.cancel(user=self.user, training_id=tid)
        t = self.repo.get_training(tid)
        assert t is not None
        if not t.status.is_terminal:
            assert t.cancel_requested
            self.now += POLICY.ttl + timedelta(seconds=1)
            assert tid in self.training.reconcile().canceled
        self.orphans.discard(tid)
        self._check_end(tid, active_at_judge=None)

    @precondition(lambda self: self.first is not None)
    @rule(scale=st.floats(min_value=-1, max_value=3, allow_nan=False))
    def set_scale(self, scale: float) -> None:
        if self.repo.get_model_for_user(self.user.id) is None:
            return
        self.models.set_lora_scale(user=self.user, lora_scale=scale)
        self.scale_set = scale

    @precondition(lambda self: self.first is not None)
    @rule(bad=st.sampled_from([float("nan"), 3.5, -2.0, float("inf")]))
    def set_bad_scale(self, bad: float) -> None:
        if self.repo.get_model_for_user(self.user.id) is None:
            return
        try:
            self.models.set_lora_scale(user=self.user, lora_scale=bad)
        except InvalidInputError:
            return
        raise AssertionError("a bad scale was accepted")

    @precondition(lambda self: self.first is not None)
    @rule(version=st.sampled_from(VERSIONS))
    def change_configured_default(self, version: str) -> None:
        self.default_version = version

    @precondition(lambda self: bool(self.published))
    @rule(data=st.data())
    def activate_some_version(self, data: st.DataObject) -> None:
        versions = self.models.versions(user=self.user)
        if not versions:
            return
        chosen = data.draw(st.sampled_from(list(versions)))
        model = self.repo.get_model_for_user(self.user.id)
        assert model is not None
        if chosen.gate_status is not GateStatus.PASSED and chosen.id != model.active_version_id:
            self.replaced[chosen.id] = model.active_version_id
        logged = [e for e in self.repo.list_events(model.id) if e["kind"] == "version_activated"]
        self.models.activate(user=self.user, version_id=chosen.id)
        if chosen.id != model.active_version_id:
            # Only a change is a choice the gate keeps (the service counts the activations it
            # logged): the version already active chosen again changes and logs nothing, so a
            # version stored before it and passing later still takes over as it would have.
            self.activations += 1
        self.expected_active = chosen.id
        activated = [e for e in self.repo.list_events(model.id) if e["kind"] == "version_activated"]
        if chosen.id == model.active_version_id:
            # The version already active: nothing changes and nothing is logged (an
            # activation sent again after a lost answer logs it once).
            assert len(activated) == len(logged)
            return
        assert len(activated) == len(logged) + 1
        assert activated[-1]["data"]["overrides_gate"] is (chosen.gate_status is not GateStatus.PASSED)
    # ------------------------------------------------------------------------ invariants
    @invariant()
    def invariants_hold(self) -> None:
        model = self.repo.get_model_for_user(self.user.id)
        if model is None:
            assert self.first is None
            return
        assert self.first is not None
        # 1-3: trigger word, destination and trainer version fixed at the first training
        # (trigger word and destination by the upload or start that made the model).
        assert model.trigger_word == self.first["trigger_word"]
        assert TRIGGER.match(model.trigger_word)
        assert model.destination == self.first["destination"]
        trainings = self.repo.list_trainings(model.id)
        if trainings:  # pinned by the first training, not by the upload that made the model
            assert model.trainer_version == self.first["trainer_version"]
        for t in trainings:
            assert (t.trigger_word, t.destination, t.trainer_version) == (
                model.trigger_word, model.destination, model.trainer_version)
        for job in self.trainer.jobs:
            assert job.trigger_word == model.trigger_word
            assert job.destination == model.destination
            assert job.trainer_version == model.trainer_version
            assert all(model.trigger_word in p.caption for p in job.photos)
        # 4: a scale the user set survives everything; the default applies only before.
        if self.scale_set is None:
            assert (model.lora_scale, model.lora_scale_is_custom) == (1.0, False)
        else:
            assert (model.lora_scale, model.lora_scale_is_custom) == (self.scale_set, True)
        # one queued, running or scoring training at most
        assert sum(t.status.is_active for t in trainings) <= 1
        # Every training ends exactly once (``_check_end`` refuses a second end); what has not
        # ended is queued, running, or held by a worker that died.
        for t in trainings:
            if t.status.is_terminal:
                assert self.ended.get(t.id) == str(t.status), t
                assert t.lease_owner is None
            else:
                assert t.id not in self.ended
            # An orphan's lease is the dead worker's until it is taken over.
            assert (t.id in self.orphans) == (t.lease_owner is not None), t
        # 5: every training that stored a version stored exactly one, numbered in order, whose
        # weights are stored and hashed; a failed training never stores one.
        versions = self.repo.list_versions(model.id)
        assert sorted(v.training_id for v in versions) == sorted(self.published)
        for t in trainings:
            assert (t.version_id is not None) == (t.id in self.published)
            if t.status is TrainingStatus.FAILED:
                assert t.version_id is None
            if t.status is TrainingStatus.SUCCEEDED:
                assert t.version_id is not None
        # The gate: a version is active only when it is the first, it passed, or its user chose
        # it; a held or pending version never became active on its own.
        for v in versions:
            if v.id == model.active_version_id and v.gate_status is not GateStatus.PASSED:
                assert "override" in v.gate_details, v
        # Every version of the model is judged on the same probes, fixed at the first training.
        assert len(model.probes) == 2
        assert model.probes == self.first_probes
        for v in versions:
            record = self.repo.get_likeness(v.id)
            if record is not None and record.probes:
                assert [(p.prompt, p.seed) for p in record.probes] == [
                    (p.prompt, p.seed) for p in model.probes]
        assert sorted(v.number for v in versions) == list(range(1, len(self.published) + 1))
        for v in versions:
            assert hashlib.sha256(self.blobs.get(v.weights_key)).hexdigest() == v.weights_sha256
        # The active version moves only by the gate's pass or the user's choice; never by a
        # failed or canceled training, nor by a worker's death.
        assert model.active_version_id == self.expected_active
        # 6: every training is logged as first training or retraining, with what was kept.
        queued = [e for e in self.repo.list_events(model.id) if e["kind"] == "training_queued"]
        assert len(queued) == len(trainings)
        kinds = [e["data"]["kind"] for e in queued]
        # (A model an upload made has no training yet.) A retraining once an earlier training
        # made a version: one after a first training that failed or was canceled is still the
        # first (one training at a time, so an earlier one ended before the next was queued).
        made = [e["data"]["training_id"] in self.published for e in queued]
        assert kinds == ["retraining" if any(made[:i]) else "first_training"
                         for i in range(len(queued))]
        for e in queued[1:]:
            assert e["data"]["preserved"]["trigger_word"] == model.trigger_word


# 60 sequences in ``make test``; the "fast" profile (``make test-fast``) asks for fewer.
Retraining.TestCase.settings = settings(
    max_examples=min(60, settings.default.max_examples), stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRetraining = Retraining.TestCase
