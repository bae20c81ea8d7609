"""An upload that starts a training, racing a start of the same user: the upload must be
refused before it reads a photo, so that a refused upload stores nothing. SQLite runs the two
transactions one after the other; PostgreSQL runs them side by side, where the upload's check
once missed the start's uncommitted training and stored every photo before its own start got
409. The test holds the start's transaction open just before its training is written and lets
the upload run meanwhile. On SQLite and, when ``SELFIE_LORA_TEST_POSTGRES_URL`` is set,
PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.domain.entities import Training
from selfie_lora.errors import ConflictError
from tests.conftest import fake_services_on
from tests.support.backends import DATABASES
from tests.support.photos import photo_zip, synthetic_photo

# How long the upload is given to slip in while the start's transaction is held open.
SLIP_IN_SECONDS = 1.5


def stored_files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("database", DATABASES)
def test_an_upload_racing_a_start_is_refused_before_it_reads_a_photo(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = fake_services_on(database, tmp_path)
    blob_dir = services.settings.blob_dir
    try:
        user, _ = services.users.create(name="ann")
        services.training.upload_zip(user=user, data=photo_zip(3), start=False)
        blobs_before = stored_files(blob_dir)

        writing, upload_done = threading.Event(), threading.Event()
        add_training = SqlRepository.add_training

        def held_open(self: SqlRepository, training: Training) -> None:
            writing.set()  # the start has checked everything and holds the model's row
            upload_done.wait(SLIP_IN_SECONDS)  # SQLite: the upload waits for this transaction
            add_training(self, training)

        monkeypatch.setattr(SqlRepository, "add_training", held_open)
        outcome: dict[str, Any] = {}
        starting = threading.Thread(
            target=lambda: outcome.setdefault("start", services.training.start(user=user)))
        starting.start()
        assert writing.wait(30), "the start never reached its training's write"
        read: list[bool] = []

        def photos() -> tuple[list[UploadedFile], list[Any]]:
            read.append(True)
            return [UploadedFile(name=f"n{i}.jpg", data=synthetic_photo(50 + i))
                    for i in range(3)], []

        try:
            services.training.upload(user=user, read=photos, start=True)
            outcome["upload"] = "accepted"
        except ConflictError as exc:
            outcome["upload"] = exc
        finally:
            upload_done.set()
            starting.join(60)
        assert outcome["start"].training.status.is_active
        assert isinstance(outcome["upload"], ConflictError), outcome
        assert read == []  # refused before a photo was read
        assert stored_files(blob_dir) == blobs_before  # and nothing stored
    finally:
        services.close()
