"""A start refused because a training of the model is queued or running: what the API, the web
and the CLI say. The service names the training and its status and never gives operator
advice (it cannot know whether workers run); only the CLI says what a training that no live
process holds waits for."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora import cli
from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.domain.entities import (
    GateStatus,
    Recipe,
    Training,
    TrainingStatus,
    User,
    Version,
)
from selfie_lora.errors import ConflictError
from selfie_lora.services.common import utcnow
from selfie_lora.wiring import Services
from tests.support.photos import photo_zip

NOBODY = "nobody is running it"


@pytest.fixture
def ann(services: Services) -> User:
    """ann with a model and accepted photos, no training yet."""
    user, _secret = services.users.create(name="ann")
    services.training.upload_zip(user=user, data=photo_zip(4), start=False)
    return user


def add_training(services: Services, user: User, **fields: object) -> Training:
    model = services.repo.get_model_for_user(user.id)
    dataset = services.repo.latest_accepted_dataset(user.id)
    assert model is not None
    assert dataset is not None
    training = Training(
        id="t-busy", model_id=model.id, dataset_id=dataset.id, backend="local",
        status=TrainingStatus.QUEUED, is_retraining=False, trigger_word=model.trigger_word,
        destination=model.destination, trainer_version=model.trainer_version,
        recipe=Recipe(name="local-tiny-v1", steps=4, lora_rank=4, learning_rate=1e-2,
                      resolution=64),
        preserved={}, created_at=utcnow())
    training = dataclasses.replace(training, **fields)  # type: ignore[arg-type]
    services.repo.add_training(training)
    return training


@pytest.fixture
def api(settings: Settings, services: Services) -> Iterator[TestClient]:
    """The API with no worker of its own: the training added stays as it is."""
    with TestClient(create_app(settings, services=services, run_worker=False),
                    raise_server_exceptions=False) as client:
        yield client


BUSY = "a training of this model is already queued or running"

# Waiting for a worker: queued again after an attempt (the review's repro), handed back as
# ``domain.lease.release`` leaves it (status kept, no lease owner, its message queued), or
# stepped away from as ``domain.lease.step_away`` leaves it (a fenced write or the storage
# failed: its holder still named, its lease lapsed now, its message queued again at once; the
# daydiff2 review's repro), or lost by a process that is gone (a serve's or worker's
# reconciler queues it again). The service cannot tell which, nor whether workers run.
WAITING: dict[str, dict[str, object]] = {
    "queued-again": {"attempt": 1, "step": 0, "total_steps": 0},
    "handed-back": {"status": TrainingStatus.PROCESSING, "attempt": 1, "step": 12,
                    "total_steps": 40},
    "stepped-away": {"status": TrainingStatus.PROCESSING, "attempt": 1, "step": 12,
                     "total_steps": 40, "lease_owner": "worker-1"},
    "lost": {"status": TrainingStatus.PROCESSING, "attempt": 1, "step": 0, "total_steps": 0,
             "lease_owner": "gone"},
}
SAID = {"queued-again": "queued", "handed-back": "processing at step 12/40",
        "stepped-away": "processing at step 12/40", "lost": "processing"}


def add_waiting(services: Services, user: User, state: str) -> Training:
    fields = dict(WAITING[state])
    if "lease_owner" in fields:  # lapsed now (step_away) or long ago (a process gone)
        fields["lease_expires_at"] = utcnow() - timedelta(
            minutes=5 if state == "lost" else 0)
    return add_training(services, user, **fields)


@pytest.mark.parametrize("state", list(WAITING))
def test_a_busy_model_refuses_a_start_with_the_training_and_no_operator_advice(
        services: Services, ann: User, api: TestClient, state: str) -> None:
    """The old message told API and web users that nobody ran a training whose holder's lease
    lapsed, and to start `selfie-lora serve`, while its message waited in the queue for the
    workers that run (old code: 'nobody is running it' for stepped-away and lost). It names
    the training and its status, with the step only when the number of steps is known."""
    add_waiting(services, ann, state)
    _key, secret = services.users.create_key(user=ann, name="api")
    headers = {"Authorization": f"Bearer {secret}"}
    expected = f"{BUSY} (training t-busy, {SAID[state]})"
    r = api.post("/api/training/start", headers=headers, json={})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "training_in_progress"
    assert error["message"] == expected
    assert NOBODY not in error["message"]
    # The upload route (the web Train page's too) refuses with the same message.
    r = api.post("/api/training/upload-zip", headers=headers,
                 files={"file": ("photos.zip", photo_zip(4), "application/zip")},
                 data={"start": "true"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["message"] == expected


def test_a_live_lease_gets_the_same_message(services: Services, ann: User) -> None:
    add_training(services, ann, status=TrainingStatus.PROCESSING, attempt=1, step=3,
                 total_steps=40, lease_owner="worker-1",
                 lease_expires_at=utcnow() + timedelta(minutes=5))
    with pytest.raises(ConflictError) as refused:
        services.training.start(user=ann)
    assert refused.value.message == f"{BUSY} (training t-busy, processing at step 3/40)"


@pytest.mark.parametrize("state", list(WAITING))
def test_the_cli_says_what_a_waiting_training_waits_for(
        services: Services, settings: Settings, ann: User, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, state: str) -> None:
    """After a CLI hand-back (Ctrl-C or SIGTERM) the training waits for a worker: another
    ``train`` or ``resume`` is refused, and the command (not the service, whose message API
    users see too) says that a serve or worker on these settings trains it, as ``train
    --no-wait`` does; for one whose holder's lease lapsed, that a serve or worker continues
    it."""
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    training = add_waiting(services, ann, state)
    photos = tmp_path / "photos.zip"
    photos.write_bytes(photo_zip(4))
    said = {}
    for command, args in (("train", [str(photos)]), ("resume", [])):
        result = CliRunner().invoke(cli.app, [command, *args, "--user", "ann"])
        said[command] = " ".join(result.output.split())
        assert result.exit_code == 1, result.output
        assert "Traceback" not in said[command]
        assert NOBODY not in said[command]
    if "lease_owner" in WAITING[state]:
        waits = ("training t-busy is held by no running process: a `selfie-lora serve` or "
                 "`selfie-lora worker` running on these settings continues it (if none runs, "
                 "start one)")
    else:
        waits = f"training t-busy waits in the queue: {cli.QUEUED_WAITS_FOR}"
    assert said["train"] == f"error: {BUSY} (training t-busy, {SAID[state]}); {waits}"
    # ``resume`` after a hand-back, of the latest training: it waits, it is not canceled.
    assert said["resume"] == (
        "error: only a canceled training can be resumed; this one is "
        f"{training.status}; {waits}")


def test_the_cli_says_a_handed_back_training_with_its_version_stored_waits_to_be_scored(
        services: Services, settings: Settings, ann: User, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a `train` scored its version said the training waited for a serve or
    worker that "scores it and ends it"; the next `train` was then refused saying one "trains
    it in its turn", of a training with nothing left to train (walk-through)."""
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    model = services.repo.get_model_for_user(ann.id)
    assert model is not None
    training = add_training(services, ann, status=TrainingStatus.PROCESSING, attempt=1, step=4,
                            total_steps=4)
    services.repo.add_version(Version(
        id="v-stored", model_id=model.id, number=1, training_id=training.id,
        trainer_version=training.trainer_version, weights_key="weights/x.safetensors",
        weights_sha256="0" * 64, weights_method="local:file", remote_version=None,
        version_mismatch=False, created_at=utcnow(), gate_status=GateStatus.PENDING))
    services.repo.save_training(dataclasses.replace(training, version_id="v-stored"))
    photos = tmp_path / "photos.zip"
    photos.write_bytes(photo_zip(4))
    result = CliRunner().invoke(cli.app, ["train", str(photos), "--user", "ann"])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert said.endswith(
        "training t-busy waits in the queue: a `selfie-lora serve` or `selfie-lora worker` "
        "running on these settings scores it in its turn (if none runs, start one)"), said
    assert "trains it" not in said


def test_the_cli_adds_nothing_for_a_training_a_live_process_holds(
        services: Services, settings: Settings, ann: User, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    add_training(services, ann, status=TrainingStatus.PROCESSING, attempt=1, step=3,
                 total_steps=40, lease_owner="worker-1",
                 lease_expires_at=utcnow() + timedelta(minutes=5))
    photos = tmp_path / "photos.zip"
    photos.write_bytes(photo_zip(4))
    result = CliRunner().invoke(cli.app, ["train", str(photos), "--user", "ann"])
    assert result.exit_code == 1, result.output
    assert " ".join(result.output.split()) == (
        f"error: {BUSY} (training t-busy, processing at step 3/40)")
