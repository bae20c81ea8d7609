"""What photos are judged for: ``selfie-lora check --for replicate|local-flux|tiny`` (default: a
new model's training), and an upload, judged for the user's pinned model or the configured
default, says which training and resolution in its answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from selfie_lora import wiring
from selfie_lora.cli import app
from selfie_lora.domain.entities import Model
from selfie_lora.domain.recipes import CheckTarget
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.intake import IntakeService
from selfie_lora.wiring import Services
from tests.conftest import auth, one_person_analyzer
from tests.support.photos import photo_zip, synthetic_photo

# The fake analyzer's face fills half of a 256 px drawing: 128 px, plenty for the tiny model's
# 64 px crops, too few to be upscaled to Replicate's 1024 px without mush.
SIDE = 256


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        (folder / f"selfie{i}.jpg").write_bytes(synthetic_photo(i, size=SIDE))
    return folder


@pytest.fixture
def cli(home: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The command line on a fresh home, with faces found by the fake analyzer (the photos are
    drawings; the real dlib checks are tested on real photos)."""
    monkeypatch.setenv("SELFIE_LORA_MIN_PHOTOS", "1")
    real = wiring.build_services
    real_checks = wiring.build_photo_checks

    def with_fake_faces(*args: Any, **kwargs: Any) -> Services:
        return real(*args, face_analyzer=one_person_analyzer(), **kwargs)

    def checks_with_fake_faces(*args: Any, **kwargs: Any) -> IntakeService:
        return real_checks(*args, face_analyzer=one_person_analyzer(), **kwargs)

    monkeypatch.setattr(wiring, "build_services", with_fake_faces)
    monkeypatch.setattr(wiring, "build_photo_checks", checks_with_fake_faces)
    return CliRunner()


def said(result: Result) -> str:
    """What a command printed, on one line (the console wraps long lines, in boxes)."""
    return " ".join(result.output.replace("\u2502", " ").split())


def test_the_same_photos_judged_for_tiny_and_for_replicate(cli: CliRunner, photos: Path) -> None:
    tiny = cli.invoke(app, ["check", str(photos), "--for", "tiny"])
    assert tiny.exit_code == 0, tiny.output
    assert "judged for tiny training at 64 px" in said(tiny)
    assert "4 of 4 photos usable" in said(tiny)
    assert "face_resolutio" not in tiny.output

    replicate = cli.invoke(app, ["check", str(photos), "--for", "replicate"])
    assert replicate.exit_code == 1, replicate.output
    assert "judged for replicate training at 1024 px" in said(replicate)
    assert "0 of 4 photos usable" in said(replicate)
    assert "face_resolutio" in replicate.output  # the table cuts the code short

    flux = cli.invoke(app, ["check", str(photos), "--for", "local-flux"])
    # A new FLUX.1 model trains on local-flux-v2, at 1024 px like Replicate's.
    assert "judged for local-flux training at 1024 px" in said(flux), flux.output


def test_by_default_photos_are_judged_for_a_new_model(cli: CliRunner, photos: Path) -> None:
    # The configured default here: the local backend with the tiny model.
    default = cli.invoke(app, ["check", str(photos)])
    assert default.exit_code == 0, default.output
    assert "judged for tiny training at 64 px" in said(default)


def test_an_unknown_target_is_a_usage_error(cli: CliRunner, photos: Path) -> None:
    r = cli.invoke(app, ["check", str(photos), "--for", "sdxl"])
    assert r.exit_code == 2
    assert "'sdxl' is not one of 'replicate', 'local-flux', 'tiny'" in said(r)


def pin_model(services: Services, user_name: str, *, backend: str, trainer_version: str) -> None:
    """A model its user re-pinned to ``trainer_version``: pinned, though it has not trained (a
    model that has neither takes the configured version at its first training)."""
    user = services.users.get_by_name(name=user_name)
    model_id = new_id()
    services.repo.add_model(Model(
        id=model_id, user_id=user.id, backend=backend, trigger_word="zkr47v",
        destination=f"local/{user_name}", trainer_version=trainer_version, lora_scale=1.0,
        lora_scale_is_custom=False, active_version_id=None, created_at=utcnow()))
    services.repo.add_event(model_id=model_id, kind="trainer_version_changed", data={
        "from": "local-tiny-v2", "to": trainer_version, "reason": "the test's pin"})


def test_the_service_judges_for_the_target_else_the_pinned_model_else_the_default(
    services: Services,
) -> None:
    intake = services.intake
    assert intake.judged_for(None) == (CheckTarget.TINY, 64)  # the configured default
    assert intake.judged_for(None, target=CheckTarget.REPLICATE) == (CheckTarget.REPLICATE, 1024)
    user, _key = services.users.create(name="ann")
    assert intake.judged_for(user) == (CheckTarget.TINY, 64)  # no model yet
    pin_model(services, "ann", backend="local", trainer_version="local-flux-v1")
    assert intake.judged_for(user) == (CheckTarget.LOCAL_FLUX, 512)
    assert intake.judged_for(user, target=CheckTarget.TINY) == (CheckTarget.TINY, 64)

    files, notes = intake.read_zip(photo_zip(2, size=SIDE))
    report = intake.check_files(files=files, findings=notes, target=CheckTarget.REPLICATE)
    assert (report.target, report.resolution) == ("replicate", 1024)
    assert {f.code for f in report.findings} >= {"face_resolution_low"}


def test_an_upload_says_what_it_was_judged_for(client: TestClient, services: Services) -> None:
    def upload(headers: dict[str, str]) -> dict[str, Any]:
        r = client.post("/api/training/upload-zip", headers=headers, data={"start": "false"},
                        files={"file": ("me.zip", photo_zip(3, size=SIDE), "application/zip")})
        assert r.status_code == 202, r.text
        verdict: dict[str, Any] = r.json()["dataset"]["verdict"]
        return verdict

    fresh = upload(auth(services, "ann"))
    assert (fresh["target"], fresh["resolution"]) == ("tiny", 64)

    # A user whose model is pinned to FLUX.1 is judged for it, whatever the default is.
    headers = auth(services, "bob")
    pin_model(services, "bob", backend="local", trainer_version="local-flux-v1")
    pinned = upload(headers)
    assert (pinned["target"], pinned["resolution"]) == ("local-flux", 512)


def test_the_configured_trainer_version_of_the_target_is_judged_for(
    cli: CliRunner, photos: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new model is pinned to the configured version: FLUX.1 at 512 px, not the newest 1024
    # (a version of FLUX.1's recipes, so on a FLUX.1 base model).
    monkeypatch.setenv("SELFIE_LORA_BASE_MODEL", str(photos.parent / "FLUX.1-dev"))
    monkeypatch.setenv("SELFIE_LORA_TRAINER_VERSION", "local-flux-v1")
    flux = cli.invoke(app, ["check", str(photos), "--for", "local-flux"])
    assert "judged for local-flux training at 512 px" in said(flux), flux.output
    # Another target's newest recipe is unaffected.
    tiny = cli.invoke(app, ["check", str(photos), "--for", "tiny"])
    assert "judged for tiny training at 64 px" in said(tiny), tiny.output
