"""``selfie-lora train --user B`` runs B's training alone: another user's training waiting in the
same queue is left to a ``serve`` or ``worker``, not run (nor half run and handed back) by B's
command."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfie_lora import wiring
from selfie_lora.cli import app
from selfie_lora.config import get_settings
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.services.intake import IntakeService
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services
from tests.conftest import one_person_analyzer
from tests.support.photos import synthetic_photo


@pytest.fixture
def trainer(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTrainer]:
    """The command line on a fresh home, with fake faces and a fake trainer that records the
    trainings it was given."""
    monkeypatch.setenv("SELFIE_LORA_MIN_PHOTOS", "5")
    monkeypatch.setenv("COLUMNS", "400")
    get_settings.cache_clear()
    fake = FakeTrainer()
    real, real_checks = wiring.build_services, wiring.build_photo_checks

    def build(*args: Any, **kwargs: Any) -> Services:
        return real(*args, **{"face_analyzer": one_person_analyzer(),
                              "trainers": {"local": fake},
                              "generators": {"local": FakeGenerator()}, **kwargs})

    def checks(*args: Any, **kwargs: Any) -> IntakeService:
        return real_checks(*args, face_analyzer=one_person_analyzer(), **kwargs)

    monkeypatch.setattr(wiring, "build_services", build)
    monkeypatch.setattr(wiring, "build_photo_checks", checks)
    yield fake
    get_settings.cache_clear()


def photos(folder: Path, first: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(first, first + 6):
        (folder / f"selfie-{i}.jpg").write_bytes(synthetic_photo(i, size=256))
    return folder


def test_train_runs_its_own_training_and_leaves_another_users_queued(
        trainer: FakeTrainer, tmp_path: Path) -> None:
    cli = CliRunner()
    for name in ("ann", "bob"):
        assert cli.invoke(app, ["users", "create", name]).exit_code == 0
    queued = cli.invoke(app, ["train", str(photos(tmp_path / "ann", 0)), "--user", "ann",
                              "--no-wait"])
    assert queued.exit_code == 0, queued.output
    result = cli.invoke(app, ["train", str(photos(tmp_path / "bob", 10)), "--user", "bob"])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output
    services = wiring.build_services(get_settings(), trainers={"local": FakeTrainer()},
                                     generators={})
    try:
        ann = services.users.get_by_name(name="ann")
        bob = services.users.get_by_name(name="bob")
        hers = services.training.progress(user=ann).training
        his = services.training.progress(user=bob).training
    finally:
        services.close()
    # Only bob's training reached the trainer; ann's waits, never attempted.
    assert [job.training_id for job in trainer.jobs] == [his.id]
    assert his.status is TrainingStatus.SUCCEEDED
    assert hers.status is TrainingStatus.QUEUED
    assert hers.attempt == 0
