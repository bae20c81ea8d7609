"""What a failed training tells its user (the API's ``training.error``, the log's event): never
the operator's words of the error that failed it. A ``SelfieLoraError`` other than the trainer's
failed a training with "The training could not run: " and the error's message, which names what
a user must not see: the database's constraint and table (a conflicting write), a blob's key
in the server's storage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.api.app import create_app
from selfie_lora.domain.entities import GateStatus, Version
from selfie_lora.errors import ConfigError, NotFoundError, SelfieLoraError
from selfie_lora.services.common import new_id
from selfie_lora.services.layout import checkpoint_key, photo_key
from selfie_lora.services.ports import BlobInfo, ProgressSink, TrainingJob, TrainingResult
from selfie_lora.services.training import TrainingService
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services, training_defaults
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip

# Words of the server's side: the database's, the storage's, a path of the server.
_SERVER_WORDS = ("UNIQUE", "constraint", "versions", "training_id", "conflicting write",
                 "blob", "photos/", "checkpoints/", "/srv/", "database")


def _services(tmp_path: Path, trainer: FakeTrainer) -> Services:
    return build_services(make_settings(tmp_path, quality_gate=False),
                          trainers={"local": trainer}, face_analyzer=one_person_analyzer(),
                          generators={"local": FakeGenerator()})


@dataclass(frozen=True)
class Failed:
    training: dict[str, Any]  # GET /api/training/progress's
    events: list[dict[str, Any]]  # GET /api/model/log's training_failed events

    @property
    def error(self) -> str:
        error = self.training["error"]
        assert isinstance(error, str), self.training
        return error


def _failed(tmp_path: Path, svc: Services, *,
            before_run: Callable[[str], None] | None = None,
            worker: TrainingService | None = None) -> Failed:
    """ann's training (``before_run`` given its id first), run by ``worker`` (by default this
    process's) until it fails: what the API says of it."""
    settings = make_settings(tmp_path, quality_gate=False)
    user, key = svc.users.create(name="ann")
    started = svc.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    if before_run is not None:
        before_run(started.training.id)
    (worker or svc.training).run(started.training.id, owner="A")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, services=svc, run_worker=False)) as client:
        r = client.get("/api/training/progress", params={"training_id": started.training.id},
                       headers=headers)
        assert r.status_code == 200, r.text
        training = r.json()["training"]
        log = client.get("/api/model/log", headers=headers)
        assert log.status_code == 200, log.text
    events = [e for e in log.json()["events"] if e["kind"] == "training_failed"]
    assert training["status"] == "failed", training
    return Failed(training=training, events=events)


def _says_no_server_words(text: str) -> None:
    assert [word for word in _SERVER_WORDS if word in text] == [], text


def test_a_conflicting_database_write_is_not_quoted_to_the_user(tmp_path: Path) -> None:
    """The version's insert refused by the database (here: a version that names the training
    already, which its row does not record): the user read "The training could not run:
    conflicting write: UNIQUE constraint failed: versions.training_id"."""
    trainer = FakeTrainer(steps=1)
    svc = _services(tmp_path, trainer)

    def another_version_names_it(job: TrainingJob) -> None:
        training = svc.repo.get_training(job.training_id)
        assert training is not None
        svc.repo.add_version(Version(
            id=new_id(), model_id=training.model_id, number=7, training_id=training.id,
            trainer_version="x", weights_key="weights/other", weights_sha256="0" * 64,
            weights_method="fake:file", remote_version=None, version_mismatch=False,
            created_at=training.created_at, gate_status=GateStatus.HELD))

    trainer.on_train = another_version_names_it
    try:
        got = _failed(tmp_path, svc)
        stored = svc.repo.get_training(got.training["id"])
    finally:
        svc.close()
    assert stored is not None
    # The operator's words stay on the row's reason and in the worker's WARNING.
    assert "clashed with another" in stored.history[-1]["reason"], stored.history
    _says_no_server_words(got.error)
    assert got.error.startswith("The training could not run")
    assert "Start the training again" in got.error
    (event,) = got.events
    assert event["data"]["error"] == got.error


def test_a_photo_gone_from_storage_says_so_without_its_key(tmp_path: Path) -> None:
    svc = _services(tmp_path, FakeTrainer(steps=1))

    def delete_a_photo(training_id: str) -> None:
        training = svc.repo.get_training(training_id)
        assert training is not None
        dataset = svc.repo.get_dataset(training.dataset_id)
        assert dataset is not None
        svc.blobs.delete(photo_key(dataset.photo_hashes[1]))

    try:
        got = _failed(tmp_path, svc, before_run=delete_a_photo)
    finally:
        svc.close()
    _says_no_server_words(got.error)
    assert "gone from storage" in got.error
    assert "upload the photos again" in got.error


class _ListsAGhost(FileSystemBlobStore):
    """The store, listing a checkpoint (``ghost``) that no read finds: as if a newer one took
    its place at every look."""

    ghost: str | None = None

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        yield from super().list(prefix)
        if self.ghost is not None and self.ghost.startswith(prefix):
            yield BlobInfo(key=self.ghost, size=1, modified=datetime.now(UTC))


def _worker_on(tmp_path: Path, svc: Services, blobs: FileSystemBlobStore) -> TrainingService:
    """A worker sharing ``svc``'s database and queue, on the storage ``blobs``."""
    settings = make_settings(tmp_path, quality_gate=False)
    return TrainingService(repo=svc.repo, blobs=blobs, queue=svc.queue, trainers=svc.trainers,
                           defaults=lambda: training_defaults(settings),
                           work_dir=settings.work_dir, likeness=svc.likeness,
                           lease=settings.lease_policy)


def test_a_worker_on_another_storage_tells_the_user_to_tell_the_operator(tmp_path: Path) -> None:
    """Not one file of the upload in the worker's storage (its SELFIE_LORA_STORAGE_URL is not the
    server's): the user was told to set that operator's setting, which is not theirs to set."""
    svc = _services(tmp_path, FakeTrainer(steps=1))
    worker = _worker_on(tmp_path, svc, FileSystemBlobStore(tmp_path / "another-storage"))
    try:
        got = _failed(tmp_path, svc, worker=worker)
        stored = svc.repo.get_training(got.training["id"])
    finally:
        svc.close()
    _says_no_server_words(got.error)
    assert got.error.startswith("The training could not run: a photo of this training is not "
                                "in this worker's storage"), got.error
    assert "SELFIE_LORA_STORAGE_URL" not in got.error
    assert "tell the operator" in got.error
    assert "uploading the photos again does not help" in got.error
    # The operator's words (the setting to fix, the blob's key) stay on the row's reason.
    assert stored is not None
    reason = stored.history[-1]["reason"]
    assert "SELFIE_LORA_STORAGE_URL" in reason
    assert "photos/" in reason


def test_a_checkpoint_gone_while_fetched_is_not_quoted_to_the_user(tmp_path: Path) -> None:
    """The checkpoint to continue from listed, then gone at every look: the blob's key (the
    storage's layout) was the user's sentence."""
    svc = _services(tmp_path, FakeTrainer(steps=1))
    blobs = _ListsAGhost(svc.blobs.root)  # type: ignore[attr-defined]
    worker = _worker_on(tmp_path, svc, blobs)

    def ghost_checkpoint(training_id: str) -> None:
        blobs.ghost = checkpoint_key(training_id, 5)

    try:
        got = _failed(tmp_path, svc, before_run=ghost_checkpoint, worker=worker)
    finally:
        svc.close()
    _says_no_server_words(got.error)
    assert got.error.startswith("The training could not run: a file it continues from is gone "
                                "from the server's storage"), got.error


class _MisconfiguredTrainer(FakeTrainer):
    """A backend that breaks the ``Trainer`` protocol: a ``ConfigError`` naming its files."""

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        raise ConfigError("cannot load the FLUX pipeline from /srv/models/flux-dev: OSError: "
                          "no such file")


def test_another_error_of_a_trainer_is_said_by_its_kind(tmp_path: Path) -> None:
    svc = _services(tmp_path, _MisconfiguredTrainer(steps=1))
    try:
        got = _failed(tmp_path, svc)
    finally:
        svc.close()
    _says_no_server_words(got.error)
    assert "operator" in got.error


@dataclass
class _RaisingTrainer(FakeTrainer):
    """A backend that breaks the ``Trainer`` protocol with ``error`` (not a TrainerError)."""

    error: SelfieLoraError = field(default_factory=lambda: SelfieLoraError("unset"))

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        raise self.error


@pytest.mark.parametrize(("error", "sentence"), [
    (NotFoundError("base model folder /srv/models/flux-dev not found"),
     "something it needs is gone from the server's storage."),
    (SelfieLoraError("the trainer's lock file /srv/run/trainer.lock is held"),
     "the server met an error."),
])
def test_an_error_of_no_kind_told_apart_is_said_by_its_sentence(
        tmp_path: Path, error: SelfieLoraError, sentence: str) -> None:
    svc = _services(tmp_path, _RaisingTrainer(steps=1, error=error))
    try:
        got = _failed(tmp_path, svc)
        stored = svc.repo.get_training(got.training["id"])
    finally:
        svc.close()
    _says_no_server_words(got.error)
    assert got.error == (f"The training could not run: {sentence} Start the training again; if "
                         "it happens again, tell the operator.")
    assert stored is not None
    assert stored.history[-1]["reason"] == error.message  # the operator's words
