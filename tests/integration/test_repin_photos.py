"""The stored photos after a re-pin: they were cropped when they were uploaded, at the resolution
of the recipe the model was pinned to then. A re-pin to a recipe of more pixels (local-flux-v1's
512 px squares to local-flux-v2's 1024 px) used to train the new recipe on the old crops, each
silently upscaled; the start is now refused (409 ``photos_need_upload_again``) and the re-pin's
answer says the photos must be uploaded again. Photos prepared at more pixels than a recipe needs
train as before (the trainer only shrinks them)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from selfie_lora.adapters.db.tables import DatasetRow
from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.testing.fakes import FakeTrainer
from selfie_lora.testing.replicate_standin import ReplicateStandIn
from selfie_lora.wiring import Services, build_services, default_trainers
from tests.conftest import auth, make_settings, one_person_analyzer, serving, wait_terminal
from tests.support.photos import photo_zip

# Large enough for a face judged at 1024 px (local-flux-v2, Replicate's size).
PHOTO_SIDE = 1400


@dataclass
class Pinned:
    client: TestClient
    services: Services
    headers: dict[str, str]
    trainer: FakeTrainer
    made: dict[str, Any]  # the answer to the upload that made the model


@contextmanager
def uploaded(tmp_path: Path, trainer_version: str) -> Iterator[Pinned]:
    """A server on a FLUX.1 folder (the fake trainer never opens it) whose new models are pinned
    to ``trainer_version``, and ann's model made by an upload that starts nothing: its photos
    cropped for that version."""
    flux = tmp_path / "FLUX.1-dev"
    flux.mkdir()
    settings = make_settings(tmp_path, base_model=str(flux), trainer_version=trainer_version)
    trainer = FakeTrainer(steps=2)
    with serving(settings, run_worker=True, trainer=trainer) as (client, svc):
        h = auth(svc, "ann")
        made = upload(client, h, start=False)
        assert made["model"]["trainer_version"] == trainer_version
        yield Pinned(client=client, services=svc, headers=h, trainer=trainer, made=made)


def upload(client: TestClient, h: dict[str, str], *, start: bool, offset: int = 0
           ) -> dict[str, Any]:
    r = client.post("/api/training/upload-zip", headers=h, data={"start": str(start).lower()},
                    files={"file": ("p.zip", photo_zip(2, offset=offset, size=PHOTO_SIDE),
                                    "application/zip")})
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def repin(client: TestClient, h: dict[str, str], version: str) -> dict[str, Any]:
    r = client.patch("/api/model", headers=h,
                     json={"trainer_version": version, "reason": "the newer recipe"})
    assert r.status_code == 200, r.text
    assert r.json()["trainer_version"] == version
    return r.json()  # type: ignore[no-any-return]


def trained_sizes(trainer: FakeTrainer) -> set[tuple[int, int]]:
    return {Image.open(io.BytesIO(p.data)).size for p in trainer.jobs[-1].photos}


def test_a_repin_to_more_pixels_refuses_the_old_crops_until_they_are_uploaded_again(
        tmp_path: Path) -> None:
    with uploaded(tmp_path, "local-flux-v1") as pinned:
        client, h, trainer, made = pinned.client, pinned.headers, pinned.trainer, pinned.made
        assert made["dataset"]["verdict"]["resolution"] == 512

        moved = repin(client, h, "local-flux-v2")
        assert moved["photos_need_upload_again"] is True
        assert "prepared at 512 px" in moved["notice"]
        assert "local-flux-v2 trains at 1024 px" in moved["notice"]
        assert "upload your photos again" in moved["notice"]

        for body in ({"dataset_id": None}, {"dataset_id": made["dataset"]["id"]}):
            r = client.post("/api/training/start", headers=h, json=body)
            assert r.status_code == 409, r.text  # 202 and 512 px crops for 1024 on the old code
            error = r.json()["error"]
            assert error["code"] == "photos_need_upload_again"
            assert "prepared at 512 px" in error["message"]
            assert "local-flux-v2 at 1024 px" in error["message"]
        assert trainer.jobs == []
        assert client.get("/api/training/progress", headers=h).status_code == 404  # none queued

        # The same photos uploaded again are prepared for the new recipe and train.
        again = upload(client, h, start=True)
        assert again["dataset"]["verdict"]["resolution"] == 1024
        done = wait_terminal(client, h, again["training"]["id"])
        assert done["training"]["status"] == "succeeded"
        job = trainer.jobs[-1]
        assert job.recipe.name == "local-flux-v2"
        assert all(max(size) >= 1024 for size in trained_sizes(trainer))
        # Nothing left to upload again: a re-pin answer says so, and so does a start.
        assert repin(client, h, "local-flux-v2")["photos_need_upload_again"] is False
        assert client.post("/api/training/start", headers=h, json={}).status_code == 202


def test_photos_prepared_at_more_pixels_than_the_new_recipe_needs_still_train(
        tmp_path: Path) -> None:
    with uploaded(tmp_path, "local-flux-v2") as pinned:  # 1024 px crops
        client, h, trainer = pinned.client, pinned.headers, pinned.trainer
        moved = repin(client, h, "local-flux-v1")  # 512 px
        assert (moved["photos_need_upload_again"], moved["notice"]) == (False, None)
        r = client.post("/api/training/start", headers=h, json={})
        assert r.status_code == 202, r.text
        assert wait_terminal(client, h, r.json()["training"]["id"])["training"][
            "status"] == "succeeded"
        assert trainer.jobs[-1].recipe.name == "local-flux-v1"


def test_a_dataset_stored_before_its_resolution_was_recorded_is_judged_by_its_photos(
        tmp_path: Path) -> None:
    """A dataset of before uploads recorded the resolution has no ``resolution`` in its verdict;
    its photos were squares at it, so the first photo's side says it."""
    with uploaded(tmp_path, "local-flux-v1") as pinned:
        client, h, made = pinned.client, pinned.headers, pinned.made
        verdict = {k: v for k, v in made["dataset"]["verdict"].items()
                   if k not in ("resolution", "target")}
        with pinned.services.engine.begin() as connection:
            connection.execute(update(DatasetRow).where(DatasetRow.id == made["dataset"]["id"])
                               .values(verdict=verdict))
        moved = repin(client, h, "local-flux-v2")
        assert moved["photos_need_upload_again"] is True
        r = client.post("/api/training/start", headers=h, json={})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "photos_need_upload_again"
        assert "prepared at 512 px" in r.json()["error"]["message"]
        # Back on the recipe they were made for, they train.
        assert repin(client, h, "local-flux-v1")["photos_need_upload_again"] is False
        r = client.post("/api/training/start", headers=h, json={})
        assert r.status_code == 202, r.text


def test_the_version_is_pinned_by_the_first_training_not_the_upload_that_made_the_model(
        tmp_path: Path) -> None:
    """Contract invariant 3: an upload that starts nothing makes the model, and its first
    training pins the version configured then, even when SELFIE_LORA_TRAINER_VERSION changed
    after the upload (the old code trained on the upload's); a retraining keeps that pin."""
    settings = make_settings(tmp_path, trainer_version="local-tiny-v1")
    with serving(settings) as (client, svc):
        h = auth(svc, "ann")
        made = upload(client, h, start=False)
        assert made["model"]["trainer_version"] == "local-tiny-v1"
    # The operator restarts the service on a new default before ann's first training.
    with serving(settings.model_copy(update={"trainer_version": "local-tiny-v2"}),
                 run_worker=True) as (client, svc):
        r = client.post("/api/training/start", headers=h, json={})
        assert r.status_code == 202, r.text
        first = r.json()["training"]
        # Old code: local-tiny-v1, with the configured local-tiny-v2 logged as ignored.
        assert (first["is_retraining"], first["trainer_version"]) == (False, "local-tiny-v2")
        assert first["recipe"]["name"] == "local-tiny-v2"
        assert "configured_default_ignored" not in first["preserved"]
        assert first["preserved"]["pinned_at_first_training"]["replaces"] == {
            "backend": "local", "trainer_version": "local-tiny-v1",
            "destination": made["model"]["destination"]}
        assert r.json()["model"]["trainer_version"] == "local-tiny-v2"
        assert wait_terminal(client, h, first["id"])["training"]["status"] == "succeeded"
        model_id = made["model"]["id"]
        pinned = [e for e in svc.repo.list_events(model_id)
                  if e["kind"] == "trainer_version_pinned"]
        assert [(e["data"]["from"]["trainer_version"], e["data"]["to"]["trainer_version"])
                for e in pinned] == [("local-tiny-v1", "local-tiny-v2")]
    # Back on the old default: the model has trained, so its pin is kept.
    with serving(settings, run_worker=True) as (client, svc):
        r = client.post("/api/training/start", headers=h, json={})
        assert r.status_code == 202, r.text
        again = r.json()["training"]
        assert (again["is_retraining"], again["trainer_version"]) == (True, "local-tiny-v2")
        assert again["preserved"]["configured_default_ignored"]["trainer_version"] == (
            "local-tiny-v1")
        assert "pinned_at_first_training" not in again["preserved"]
        assert client.get("/api/model", headers=h).json()["trainer_version"] == "local-tiny-v2"


def test_a_first_training_on_a_default_of_more_pixels_asks_for_the_photos_again(
        tmp_path: Path) -> None:
    """The photos an upload stored were cropped for the version configured then; a first
    training that pins a default of more pixels refuses them as a re-pin does."""
    with uploaded(tmp_path, "local-flux-v1") as pinned:  # 512 px crops
        client, h, trainer = pinned.client, pinned.headers, pinned.trainer
        pinned.services.settings.trainer_version = "local-flux-v2"  # the new default: 1024 px
        r = client.post("/api/training/start", headers=h, json={})
        assert r.status_code == 409, r.text  # old code: 202 on local-flux-v1
        assert r.json()["error"]["code"] == "photos_need_upload_again"
        assert "local-flux-v2 at 1024 px" in r.json()["error"]["message"]
        again = upload(client, h, start=True)  # prepared for the version it will train
        assert again["dataset"]["verdict"]["resolution"] == 1024
        done = wait_terminal(client, h, again["training"]["id"])
        assert done["training"]["status"] == "succeeded"
        assert trainer.jobs[-1].recipe.name == "local-flux-v2"


def test_a_first_training_on_another_backend_takes_that_backend_s_destination(
        tmp_path: Path) -> None:
    """Contract invariant 2: the destination is created once, at the first training. A model an
    upload made under the local backend held ``local/selfie-lora-…``; when the operator moved
    to Replicate before its first training, that training used to create (or fail to create) a
    Replicate model under the owner ``local``. It now takes the Replicate owner's destination,
    derived from the model id as a new model's is, and pins and logs it."""
    with uploaded(tmp_path, "local-flux-v2") as pinned:  # 1024 px crops, as Replicate trains
        h, made = pinned.headers, pinned.made["model"]
    assert made["destination"].startswith("local/")
    suffix = made["destination"].split("/", 1)[1]
    with ReplicateStandIn() as standin:
        # The same home (its database is kept), now on Replicate.
        moved = make_settings(tmp_path, trainer="replicate", replicate_owner="acme",
                              replicate_api_token=standin.token,
                              replicate_base_url=standin.base_url)
        with on_replicate(moved) as (client, svc):
            r = client.post("/api/training/start", headers=h, json={})
            assert r.status_code == 202, r.text
            first = r.json()["training"]
            # Old code: local/selfie-lora-…, on the Replicate backend.
            assert first["destination"] == f"acme/{suffix}"
            assert first["preserved"]["pinned_at_first_training"]["destination"] == (
                f"acme/{suffix}")
            assert first["preserved"]["pinned_at_first_training"]["replaces"]["destination"] == (
                made["destination"])
            done = wait_terminal(client, h, first["id"], timeout=180)
            assert done["training"]["status"] == "succeeded", done["training"]["error"]
            assert done["model"]["destination"] == f"acme/{suffix}"
            assert client.get("/api/model", headers=h).json()["destination"] == f"acme/{suffix}"
            assert [c["owner"] for c in standin.model_creations] == ["acme"]
            pinned_events = [e for e in svc.repo.list_events(made["id"])
                             if e["kind"] == "trainer_version_pinned"]
            assert [e["data"]["to"]["destination"] for e in pinned_events] == [f"acme/{suffix}"]


@contextmanager
def on_replicate(settings: Settings) -> Iterator[tuple[TestClient, Services]]:
    """The app with the Replicate trainer the settings name (``serving`` runs a fake local
    trainer only)."""
    svc = build_services(settings, trainers={"replicate": default_trainers(settings)["replicate"]},
                         face_analyzer=one_person_analyzer())
    try:
        with TestClient(create_app(settings, services=svc, run_worker=True),
                        raise_server_exceptions=False) as client:
            yield client, svc
    finally:
        svc.close()
