"""The operator moves SELFIE_LORA_BASE_MODEL from the default ``tiny`` to a FLUX.1 folder. A
model pinned while the server ran on the tiny test model kept its tiny recipe (64 px, 40 steps,
rank 4), and its retraining ran that on the real FLUX.1: a useless LoRA, and nothing said so. A
local model now trains only on a recipe made for the configured base model: its start is refused
(409 ``base_model_mismatch``, saying which version fits and how to re-pin), as is a re-pin to a
recipe of the other base model (422)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from selfie_lora.testing.fakes import FakeTrainer
from tests.conftest import auth, make_settings, serving, wait_terminal
from tests.support.photos import photo_zip


def _trained_on_the_tiny_model(tmp_path: Path) -> dict[str, str]:
    """A user whose model trained version 1 while the server ran on ``tiny``: their headers."""
    with serving(make_settings(tmp_path), run_worker=True) as (client, svc):  # base model tiny
        h = auth(svc, "ann")
        r = client.post("/api/training/upload-zip", headers=h,
                        files={"file": ("p.zip", photo_zip(2), "application/zip")})
        assert r.status_code == 202, r.text
        wait_terminal(client, h, r.json()["training"]["id"])
        assert client.get("/api/model", headers=h).json()["trainer_version"] == "local-tiny-v2"
        assert client.post("/api/generate", headers=h, json={"prompt": "hiking"}).status_code == 200
    return h


def test_a_model_pinned_on_the_tiny_model_is_not_trained_on_flux_until_it_is_repinned(
        tmp_path: Path) -> None:
    h = _trained_on_the_tiny_model(tmp_path)

    flux = tmp_path / "FLUX.1-dev"  # the same HOME and database, now on a FLUX.1 folder
    flux.mkdir()
    trainer = FakeTrainer(steps=2)
    settings = make_settings(tmp_path, base_model=str(flux))
    with serving(settings, run_worker=True, trainer=trainer) as (client, _svc):
        refused = client.post("/api/training/start", headers=h, json={})
        # 202 on the old code, and the job trained recipe local-tiny-v2 on the FLUX.1 folder.
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "base_model_mismatch"
        assert error["message"] == (
            "your model is pinned to local-tiny-v2, a trainer version for the tiny test "
            "model, and this server trains on FLUX.1: re-pin it to local-flux-v2 (PATCH "
            '/api/model {"trainer_version": "local-flux-v2", "reason": "..."}, or "Move to '
            'another trainer version" on the model page; local-flux-v2 or local-flux-v1 fit '
            "this server), then upload your photos again so they are prepared for it")
        # An upload that would start one is refused before its photos are read.
        upload = client.post("/api/training/upload-zip", headers=h, files={
            "file": ("p.zip", photo_zip(2, offset=10, size=1400), "application/zip")})
        assert upload.status_code == 409, upload.text
        assert upload.json()["error"]["code"] == "base_model_mismatch"
        assert trainer.jobs == []

        # A re-pin to another tiny recipe is refused; to a FLUX.1 one it is taken, and says the
        # 64 px photos must be uploaded again.
        tiny = client.patch("/api/model", headers=h,
                            json={"trainer_version": "local-tiny-v1", "reason": "r"})
        assert tiny.status_code == 422, tiny.text
        assert tiny.json()["error"]["message"] == (
            "local-tiny-v1 is a trainer version for the tiny test model, and this server "
            "trains on FLUX.1: re-pin to local-flux-v2 or local-flux-v1")
        moved = client.patch("/api/model", headers=h,
                             json={"trainer_version": "local-flux-v2", "reason": "on FLUX.1"})
        assert moved.status_code == 200, moved.text
        assert moved.json()["photos_need_upload_again"] is True

        again = client.post("/api/training/upload-zip", headers=h, files={
            "file": ("p.zip", photo_zip(2, offset=10, size=1400), "application/zip")})
        assert again.status_code == 202, again.text
        done = wait_terminal(client, h, again.json()["training"]["id"])
        assert done["training"]["status"] == "succeeded"
        job = trainer.jobs[-1]
        assert (job.recipe.name, job.recipe.resolution) == ("local-flux-v2", 1024)
        assert all(max(Image.open(io.BytesIO(p.data)).size) >= 1024 for p in job.photos)


def test_a_version_trained_on_the_tiny_model_is_refused_for_generation_on_flux(
        tmp_path: Path) -> None:
    """Generation compared nothing: a version trained on the tiny model went to the FLUX.1
    pipeline, its LoRA did not fit, and the user got a 500 ``storage_error`` "please retry in a
    moment" (the CLI torch's size-mismatch text) every time. It is now refused before its
    weights are loaded (409 ``base_model_mismatch``, naming the version and what to do), and so
    is making it the active version."""
    h = _trained_on_the_tiny_model(tmp_path)

    flux = tmp_path / "FLUX.1-dev"
    flux.mkdir()
    with serving(make_settings(tmp_path, base_model=str(flux))) as (client, _svc):
        refused = client.post("/api/generate", headers=h, json={"prompt": "hiking"})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "base_model_mismatch"
        assert error["message"] == (
            "version 1 cannot make pictures on this server: it was trained with local-tiny-v2, "
            "a trainer version for the tiny test model, and this server trains on FLUX.1, so "
            "its LoRA does not fit; use a version trained here, or train again (re-pin to "
            "local-flux-v2 first)")
        activate = client.post("/api/model/versions/1/activate", headers=h)
        assert activate.status_code == 409, activate.text
        assert activate.json()["error"]["message"].startswith(
            "version 1 cannot become the active version on this server")
