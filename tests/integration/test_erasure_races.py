"""An account's deletion racing the work its owner had under way when it was asked for: a
generation saved after the deletion read what the account holds, an upload saved after the
deletion took the account's rows. The deletion must still take every blob of every row it
deletes, and finish. On SQLite and, when ``SELFIE_LORA_TEST_POSTGRES_URL`` is set,
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.domain.accounts import ERASURE_PENDING, ErasurePlan
from selfie_lora.domain.entities import (
    Generation,
    Model,
    Recipe,
    Training,
    TrainingStatus,
    User,
    Version,
)
from selfie_lora.errors import ForbiddenError
from selfie_lora.services.layout import PREFIXES, generation_image_key
from selfie_lora.wiring import Services
from tests.conftest import fake_services_on
from tests.support.backends import DATABASES
from tests.support.photos import photo_zip

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RECIPE = Recipe(name="local-tiny-v1", steps=10, lora_rank=4, learning_rate=1e-2, resolution=64)


def blob_keys(services: Services) -> set[str]:
    return {info.key for prefix in PREFIXES for info in services.blobs.list(prefix)}


def generated(services: Services, user: User, generation_id: str) -> None:
    """A generation of ``user``'s version v1, its picture stored, as the generation service
    saves one: the picture first, then the row."""
    model = services.repo.get_model_for_user(user.id)
    assert model is not None
    key = generation_image_key(generation_id, 0)
    services.blobs.put(key, b"a picture of her face")
    services.repo.add_generation(Generation(
        id=generation_id, user_id=user.id, model_id=model.id, version_id="v1", prompt="p",
        lora_scale=1.0, seed=1, image_keys=(key,), created_at=NOW))


def with_a_generation(services: Services) -> User:
    """ann, with photos, a model, a version of it and a generation."""
    user, _key = services.users.create(name="ann")
    services.training.upload_zip(user=user, data=photo_zip(3), start=False)
    model = services.repo.get_model_for_user(user.id)
    assert isinstance(model, Model)
    dataset = services.repo.latest_accepted_dataset(user.id)
    assert dataset is not None
    services.repo.add_training(Training(
        id="t1", model_id=model.id, dataset_id=dataset.id, backend="local",
        status=TrainingStatus.SUCCEEDED, is_retraining=False, trigger_word=model.trigger_word,
        destination=model.destination, trainer_version=model.trainer_version, recipe=RECIPE,
        preserved={}, created_at=NOW))
    services.repo.add_version(Version(
        id="v1", model_id=model.id, number=1, training_id="t1", trainer_version="local-tiny-v1",
        weights_key="weights/v1.safetensors", weights_sha256="1" * 64,
        weights_method="local:file", remote_version=None, version_mismatch=False,
        created_at=NOW))
    generated(services, user, "g1")
    return user


@pytest.mark.parametrize("database", DATABASES)
def test_a_generation_saved_while_the_deletion_was_planned_loses_its_pictures_too(
        tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation under way as the account was disabled, saved after the deletion read what
    the account holds and before it deleted the rows: its row went with the rest, and its
    pictures stayed in storage, named by nothing, until a collection's grace ran out."""
    services = fake_services_on(database, tmp_path)
    try:
        others = blob_keys(services)
        ann = with_a_generation(services)
        delete_user_data = SqlRepository.delete_user_data
        late: list[str] = []

        def generation_lands_first(self: SqlRepository, user_id: str, *,
                                   plan: ErasurePlan, **kwargs: Any) -> dict[str, int]:
            if not late:  # once: the generation finishing just now
                late.append("g-late")
                generated(services, ann, "g-late")
            return delete_user_data(self, user_id, plan=plan, **kwargs)

        monkeypatch.setattr(SqlRepository, "delete_user_data", generation_lands_first)
        summary = services.erasure.erase_by_id(user_id=ann.id)
        assert summary.rows["generations"] == 2
        assert services.repo.get_user(ann.id) is None
        assert generation_image_key("g-late", 0) not in blob_keys(services)
        assert blob_keys(services) == others  # every blob of hers gone
    finally:
        services.close()


@pytest.mark.parametrize("start", [False, True], ids=["upload", "upload-and-train"])
@pytest.mark.parametrize("database", DATABASES)
def test_an_upload_saved_after_the_deletion_took_the_rows_is_refused_and_the_deletion_ends(
        tmp_path: Path, database: str, start: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload let in before the account was disabled (its photos still being read) and
    saved after the deletion took the account's rows: its photo set (and the model it made)
    named the user, so the removal of the user's row failed on the foreign key, and the
    deletion failed (409; the background finisher parked it a day). Now the upload is refused
    (403 'being deleted'), and the deletion ends."""
    services = fake_services_on(database, tmp_path)
    try:
        ann = with_a_generation(services)
        delete_user_data = SqlRepository.delete_user_data
        outcome: dict[str, Any] = {}

        def upload_lands_after(self: SqlRepository, user_id: str, *,
                               plan: ErasurePlan, **kwargs: Any) -> dict[str, int]:
            rows = delete_user_data(self, user_id, plan=plan, **kwargs)
            try:  # ``ann`` as the upload's request read her, before she was disabled
                outcome["upload"] = services.training.upload_zip(
                    user=ann, data=photo_zip(3, offset=20), start=start)
            except Exception as exc:  # shown by the assertion below
                outcome["upload"] = exc
            return rows

        monkeypatch.setattr(SqlRepository, "delete_user_data", upload_lands_after)
        services.erasure.erase_by_id(user_id=ann.id)
        refused = outcome["upload"]
        assert isinstance(refused, ForbiddenError), refused
        assert refused.message == ERASURE_PENDING
        assert services.repo.get_user(ann.id) is None
        assert services.repo.user_holdings(ann.id).empty
    finally:
        services.close()


@pytest.mark.parametrize("database", DATABASES)
def test_a_deletion_dated_years_ahead_by_a_fast_clock_is_still_listed_pending(
        tmp_path: Path, database: str) -> None:
    """A deletion whose time a machine with its clock years ahead wrote (its claim, or its
    ``DELETE /api/me``) is pending all the same: ``pending`` (what ``gc`` lists) read every
    pending deletion as those asked for by a year from now, and left such a one out."""
    services = fake_services_on(database, tmp_path)
    try:
        ann, _key = services.users.create(name="ann")
        services.users.create(name="bob")
        ahead = datetime.now(UTC) + timedelta(days=2 * 365)
        assert services.repo.request_erasure(ann.id, at=ahead)
        assert services.erasure.pending() == [
            ("ann", ahead + services.erasure.resume_after)]  # old code: []
    finally:
        services.close()
