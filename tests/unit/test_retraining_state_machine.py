"""Random sequences of uploads, starts, scale changes, changes of the configured default trainer
version, failures and cancellations: the contract's retraining invariants hold after every step."""

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
from selfie_lora.dataset.intake import UploadedFile, UploadLimits
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.errors import ConflictError, InvalidInputError
from selfie_lora.services.intake import IntakeService
from selfie_lora.services.models import ModelService
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import UserService
from selfie_lora.testing.fakes import FakeTrainer, InMemoryQueue
from tests.support.photos import synthetic_photo

TRIGGER = re.compile(r"^[a-z0-9]+$")
VERSIONS = ("local-tiny-v1", "local-flux-v1", "local-tiny-v1")


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
        self.default_version = "local-tiny-v1"
        self.training = TrainingService(
            repo=self.repo, blobs=self.blobs, queue=self.queue, trainers={"local": self.trainer},
            defaults=lambda: TrainingDefaults(backend="local",
                                              trainer_version=self.default_version,
                                              owner="local", replicate_recipe="replicate-person-v1"),
            work_dir=self.dir / "work", rng=random.Random(0),
        )
        self.intake = IntakeService(repo=self.repo, blobs=self.blobs, limits=UploadLimits(),
                                    min_photos=1, max_photos=50)
        self.models = ModelService(repo=self.repo, blobs=self.blobs)
        self.user, _ = UserService(repo=self.repo).create(name="ann")
        self.uploads = 0
        # What the invariants are checked against.
        self.first: dict[str, str] | None = None
        self.scale_set: float | None = None
        self.expected_active: str | None = None
        self.succeeded = 0

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
        had_active = bool(self.queue.pending)
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
            assert result.training.is_retraining is False
        else:
            assert result.training.is_retraining is True

    @rule(outcome=st.sampled_from(["succeeded", "failed", "canceled"]))
    def start_and_run(self, outcome: str) -> None:
        # The common path in one step, so short sequences already reach retraining.
        self.start()
        self.run_queued(outcome)

    @precondition(lambda self: bool(self.queue.pending))
    @rule(outcome=st.sampled_from(["succeeded", "failed", "canceled"]))
    def run_queued(self, outcome: str) -> None:
        if not self.queue.pending:
            return
        self.trainer.outcomes.append(outcome)
        before = self.repo.get_model_for_user(self.user.id)
        self.queue.drain(self.training.run)
        after = self.repo.get_model_for_user(self.user.id)
        assert after is not None
        if outcome == "succeeded":
            self.succeeded += 1
            self.expected_active = after.active_version_id
            assert after.active_version_id is not None
            assert before is None or after.active_version_id != before.active_version_id
        else:
            assert before is not None
            assert after.active_version_id == before.active_version_id

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
        self.models.activate(user=self.user, version_id=chosen.id)
        self.expected_active = chosen.id

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
        # one queued or running training at most
        assert sum(t.status.is_active for t in trainings) <= 1
        # 5: every success left one numbered version whose weights are stored and hashed.
        versions = self.repo.list_versions(model.id)
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
