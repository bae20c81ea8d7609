"""A start refused because a training of the model is queued or running: what the API, the web
and the CLI say. A training that waits for a worker (queued, or handed back by a worker's
SIGTERM on a deploy: its lease released) is never said to have nobody running it; one left
processing by a process that is gone (its holder named, its lease lapsed) is."""

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
from selfie_lora.domain.entities import Recipe, Training, TrainingStatus, User
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


# Waiting for a worker: queued again after an attempt (the review's repro), or handed back as
# ``domain.lease.release`` leaves it (status kept, no lease owner, its message queued).
WAITING = {"queued-again": {"attempt": 1, "step": 0, "total_steps": 0},
           "handed-back": {"status": TrainingStatus.PROCESSING, "attempt": 1, "step": 12,
                           "total_steps": 40}}


@pytest.mark.parametrize("state", list(WAITING))
def test_a_training_that_waits_for_a_worker_refuses_a_start_without_operator_advice(
        services: Services, ann: User, api: TestClient, state: str) -> None:
    """The old message told API and web users that nobody ran it and to start `selfie-lora
    serve`, at 'step 0/0' for the queued one, while workers were running."""
    add_training(services, ann, **WAITING[state])
    _key, secret = services.users.create_key(user=ann, name="api")
    headers = {"Authorization": f"Bearer {secret}"}
    r = api.post("/api/training/start", headers=headers, json={})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "training_in_progress"
    assert error["message"] == "a training of this model is already queued or running"
    # The upload route (the web Train page's too) refuses with the same message.
    r = api.post("/api/training/upload-zip", headers=headers,
                 files={"file": ("photos.zip", photo_zip(4), "application/zip")},
                 data={"start": "true"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["message"] == "a training of this model is already queued or running"


@pytest.mark.parametrize(("step", "total", "at"), [(0, 0, ""), (7, 40, " at step 7/40")])
def test_a_processing_training_whose_lease_lapsed_is_said_to_have_nobody_running_it(
        services: Services, ann: User, step: int, total: int, at: str) -> None:
    """Its process is gone and no worker took it back. The step is said only when the number
    of steps is known (never 'step 0/0')."""
    lapsed = utcnow() - timedelta(minutes=5)
    add_training(services, ann, status=TrainingStatus.PROCESSING, attempt=1, step=step,
                 total_steps=total, lease_owner="gone", lease_expires_at=lapsed)
    with pytest.raises(ConflictError) as refused:
        services.training.start(user=ann)
    assert refused.value.message == (
        f"a training of this model is already queued or running (training t-busy, "
        f"processing{at}); {NOBODY}: start `selfie-lora serve` or `selfie-lora worker` to "
        "continue it")


def test_a_live_lease_or_a_queued_training_gets_no_hint(services: Services, ann: User) -> None:
    training = add_training(services, ann, status=TrainingStatus.PROCESSING, attempt=1,
                            step=3, total_steps=40, lease_owner="worker-1",
                            lease_expires_at=utcnow() + timedelta(minutes=5))
    with pytest.raises(ConflictError) as refused:
        services.training.start(user=ann)
    assert refused.value.message == "a training of this model is already queued or running"
    services.repo.save_training(dataclasses.replace(
        training, status=TrainingStatus.QUEUED, lease_owner=None, lease_expires_at=None))
    with pytest.raises(ConflictError) as refused:
        services.training.start(user=ann)
    assert refused.value.message == "a training of this model is already queued or running"


@pytest.mark.parametrize("state", list(WAITING))
def test_the_cli_says_what_a_waiting_training_waits_for(
        services: Services, settings: Settings, ann: User, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, state: str) -> None:
    """After a CLI hand-back (Ctrl-C or SIGTERM) the training waits for a worker: another
    ``train`` or ``resume`` is refused, and the command (not the service, whose message API
    users see too) says that a serve or worker on these settings trains it, as ``train
    --no-wait`` does."""
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    training = add_training(services, ann, **WAITING[state])
    photos = tmp_path / "photos.zip"
    photos.write_bytes(photo_zip(4))
    said = {}
    for command, args in (("train", [str(photos)]), ("resume", [])):
        result = CliRunner().invoke(cli.app, [command, *args, "--user", "ann"])
        said[command] = " ".join(result.output.split())
        assert result.exit_code == 1, result.output
        assert "Traceback" not in said[command]
        assert NOBODY not in said[command]
    waits = f"training t-busy waits in the queue: {cli.QUEUED_WAITS_FOR}"
    assert said["train"] == (
        f"error: a training of this model is already queued or running; {waits}")
    # ``resume`` after a hand-back, of the latest training: it waits, it is not canceled.
    assert said["resume"] == (
        "error: only a canceled training can be resumed; this one is "
        f"{training.status}; {waits}")
