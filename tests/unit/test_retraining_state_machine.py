"""Random sequences of uploads, starts, scale changes, changes of the configured default trainer
version, failures, cancellations, likeness scorings and explicit activations: the contract's
retraining invariants and the likeness gate's hold after every step.

The face analyzer is a stand-in: the training photos' face is ``E0``; a probe image's face is
``E0`` ("same": identity 1), another person's ("other": identity 0) or none ("none": identity 0),
as the rule that runs the likeness jobs decides."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.dataset.checks import CheckPolicy
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.domain.entities import GateStatus, TrainingStatus
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.errors import ConflictError, InvalidInputError
from selfie_lora.services.generation import GenerationService
from selfie_lora.services.intake import IntakeService
from selfie_lora.services.models import ModelService
from selfie_lora.services.quality import QualityService
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import UserService
from selfie_lora.testing.fakes import FakeFaceAnalyzer, FakeGenerator, FakeTrainer, InMemoryQueue
from tests.support.photos import synthetic_photo

TRIGGER = re.compile(r"^[a-z0-9]+$")
VERSIONS = ("local-tiny-v1", "local-flux-v1", "local-tiny-v1")
PROBE_SIDE = 32  # FakeGenerator's images; the training photos are larger
E0 = (0.0,) * 8
OTHER = (0.5,) * 8  # ~1.41 from E0: similarity 0
IDENTITY = {"same": 1.0, "other": 0.0, "none": 0.0}
TOLERANCE = 0.02


class Retraining(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sl-sm-"))
        self.engine = make_engine(f"sqlite:///{self.dir / 'db.sqlite'}")
        upgrade(self.engine)
        self.repo = SqlRepository(self.engine)
        self.blobs = FileSystemBlobStore(self.dir / "blobs")
        self.queue = InMemoryQueue()
        self.trainer = FakeTrainer(steps=2)
        self.likeness = "same"
        self.faces = FakeFaceAnalyzer(embed=self._face, box_fraction=0.5)
        self.default_version = "local-tiny-v1"
        self.training = TrainingService(
            repo=self.repo, blobs=self.blobs, queue=self.queue, trainers={"local": self.trainer},
            defaults=self.defaults,
            work_dir=self.dir / "work", rng=random.Random(0),
        )
        self.intake = IntakeService(
            repo=self.repo, blobs=self.blobs, limits=UploadLimits(),
            policy=CheckPolicy(min_photos=1, max_photos=50), analyzer=self.faces,
            defaults=self.defaults, workers=1,
        )
        self.models = ModelService(repo=self.repo, blobs=self.blobs)
        self.quality = QualityService(
            repo=self.repo, blobs=self.blobs,
            generation=GenerationService(repo=self.repo, blobs=self.blobs,
                                         generators={"local": FakeGenerator(size=PROBE_SIDE)}),
            faces=self.faces, tolerance=TOLERANCE, probe_count=2,
        )
        self.user, _ = UserService(repo=self.repo).create(name="ann")
        self.uploads = 0
        # What the invariants are checked against.
        self.first: dict[str, str] | None = None
        self.scale_set: float | None = None
        self.expected_active: str | None = None
        self.succeeded = 0
        # The likeness model: each version's identity when it was scored, what was active when a
        # pending version was stored, and what a user's early activation replaced.
        self.identity: dict[str, float] = {}
        self.active_when_stored: dict[str, str | None] = {}
        self.replaced: dict[str, str | None] = {}
        self.scoring: set[str] = set()  # trainings whose version awaits the gate
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
        self.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def first_upload(self) -> None:
        self.upload()

    @rule()
    def upload(self) -> None:
        self.uploads += 1
        files = [UploadedFile(name=f"p{i}.jpg", data=synthetic_photo(self.uploads * 10 + i))
                 for i in range(2)]
        self.intake.ingest_files(user=self.user, files=files)

    @rule()
    def start(self) -> None:
        had_active = bool(self.queue.pending) or bool(self.scoring)
        try:
            result = self.training.start(user=self.user, dataset_id=None)
        except ConflictError:
            assert had_active, "409 although no training was queued or running"
            return
        assert not had_active, "a second training was queued while one was active"
        if self.first is None:
            self.first = {"trigger_word": result.model.trigger_word,
                          "destination": result.model.destination,
                          "trainer_version": result.model.trainer_version}
            self.first_probes = result.model.probes
            assert result.training.is_retraining is False
        else:
            assert result.training.is_retraining is True

    @rule(outcome=st.sampled_from(["succeeded", "failed", "canceled"]))
    def start_and_run(self, outcome: str) -> None:
        # The common path in one step, so short sequences already reach retraining.
        self.start()
        self.run_queued(outcome)

    @rule(likeness=st.sampled_from(["same", "other", "none"]))
    def retrain_and_judge(self, likeness: str) -> None:
        # A whole successful (re)training with its likeness job, so sequences reach the gate.
        self.start()
        self.run_queued("succeeded")
        if self.queue.quality:
            self.run_likeness_jobs(likeness)

    @precondition(lambda self: bool(self.queue.pending))
    @rule(outcome=st.sampled_from(["succeeded", "failed", "canceled"]))
    def run_queued(self, outcome: str) -> None:
        if not self.queue.pending:
            return
        tid = self.queue.pending[0]
        self.trainer.outcomes.append(outcome)
        before = self.repo.get_model_for_user(self.user.id)
        self.queue.drain(self.training.run)
        after = self.repo.get_model_for_user(self.user.id)
        assert after is not None
        training = self.repo.get_training(tid)
        assert training is not None
        if outcome == "succeeded":
            self.succeeded += 1
            assert training.version_id is not None
            version = self.repo.get_version(training.version_id)
            assert version is not None
            # The training keeps its slot until its version is scored (and judged).
            assert training.status is TrainingStatus.PROCESSING
            assert training.is_scoring
            self.scoring.add(tid)
            if before is None or before.active_version_id is None:
                # A first version has nothing to beat: active at once.
                assert version.gate_status is GateStatus.PASSED
                assert after.active_version_id == version.id
                self.expected_active = version.id
            else:
                # Stored, not active, until the gate decides.
                assert version.gate_status is GateStatus.PENDING
                assert after.active_version_id == before.active_version_id
                self.active_when_stored[version.id] = before.active_version_id
            assert version.id in self.queue.quality
        else:
            assert before is not None
            assert after.active_version_id == before.active_version_id

    @precondition(lambda self: bool(self.queue.quality))
    @rule(likeness=st.sampled_from(["same", "other", "none"]))
    def run_likeness_jobs(self, likeness: str) -> None:
        self.likeness = likeness
        while self.queue.quality:
            vid = self.queue.quality[0]
            version = self.repo.get_version(vid)
            assert version is not None
            model = self.repo.get_model_for_user(self.user.id)
            assert model is not None
            if vid not in self.identity:
                self.identity[vid] = IDENTITY[likeness]
            pending = version.gate_status is GateStatus.PENDING
            if pending:
                baseline = self.replaced.get(vid, model.active_version_id)
                if baseline == vid:
                    baseline = None
                for other in (baseline,) if baseline and baseline not in self.identity else ():
                    self.identity[other] = IDENTITY[likeness]  # scored on demand, now
                base = self.identity.get(baseline) if baseline else None
                passes = base is None or self.identity[vid] >= base - TOLERANCE
            self.quality.run(self.queue.quality.pop(0))
            decided = self.repo.get_version(vid)
            assert decided is not None
            training = self.repo.get_training(version.training_id)
            assert training is not None
            assert training.status is TrainingStatus.SUCCEEDED  # scored: the training ends
            self.scoring.discard(training.id)
            if not pending:
                assert decided.gate_status is version.gate_status  # decided once only
                continue
            expected = GateStatus.PASSED if passes else GateStatus.HELD
            assert decided.gate_status is expected, decided.gate_reason
            assert (decided.alert is not None) == (expected is GateStatus.HELD)
            if passes and model.active_version_id in (self.active_when_stored[vid], vid):
                self.expected_active = vid

    @precondition(lambda self: bool(self.queue.pending))
    @rule()
    def cancel_queued(self) -> None:
        if not self.queue.pending:
            return
        tid = self.queue.pending[0]
        self.training.cancel(user=self.user, training_id=tid)
        t = self.repo.get_training(tid)
        assert t is not None
        assert str(t.status) == "canceled"
        self.queue.drain(self.training.run)  # the worker finds it terminal and does nothing
        t = self.repo.get_training(tid)
        assert t is not None
        assert str(t.status) == "canceled"

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

    @precondition(lambda self: self.succeeded > 0)
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
        self.models.activate(user=self.user, version_id=chosen.id)
        self.expected_active = chosen.id
        activated = [e for e in self.repo.list_events(model.id) if e["kind"] == "version_activated"]
        assert activated[-1]["data"]["overrides_gate"] is (chosen.gate_status is not GateStatus.PASSED)

    # ------------------------------------------------------------------------ invariants
    @invariant()
    def invariants_hold(self) -> None:
        model = self.repo.get_model_for_user(self.user.id)
        if model is None:
            assert self.first is None
            return
        assert self.first is not None
        # 1-3: trigger word, destination and trainer version fixed at the first training.
        assert model.trigger_word == self.first["trigger_word"]
        assert TRIGGER.match(model.trigger_word)
        assert model.destination == self.first["destination"]
        assert model.trainer_version == self.first["trainer_version"]
        trainings = self.repo.list_trainings(model.id)
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
        assert {t.id for t in trainings if t.is_scoring} == self.scoring
        # 5: every success left one numbered version whose weights are stored and hashed.
        versions = self.repo.list_versions(model.id)
        # The gate: a version is active only when it is the first, it passed, or its user chose
        # it; a held or pending version never became active on its own.
        for v in versions:
            if v.id == model.active_version_id and v.gate_status is not GateStatus.PASSED:
                assert "override" in v.gate_details, v
        # Every version of the model is judged on the same probes, fixed at the first training.
        assert len(model.probes) == 2
        assert model.probes == self.first_probes
        for v in versions:
            record = self.repo.get_quality(v.id)
            assert record is not None
            if record.probes:
                assert [(p.prompt, p.seed) for p in record.probes] == [
                    (p.prompt, p.seed) for p in model.probes]
        assert len(versions) == self.succeeded
        assert sorted(v.number for v in versions) == list(range(1, self.succeeded + 1))
        for v in versions:
            assert hashlib.sha256(self.blobs.get(v.weights_key)).hexdigest() == v.weights_sha256
        assert model.active_version_id == self.expected_active
        # 6: every training is logged as first training or retraining, with what was kept.
        queued = [e for e in self.repo.list_events(model.id) if e["kind"] == "training_queued"]
        assert len(queued) == len(trainings)
        kinds = [e["data"]["kind"] for e in queued]
        assert kinds[:1] == ["first_training"]
        assert all(k == "retraining" for k in kinds[1:])
        for e in queued[1:]:
            assert e["data"]["preserved"]["trigger_word"] == model.trigger_word


Retraining.TestCase.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRetraining = Retraining.TestCase
