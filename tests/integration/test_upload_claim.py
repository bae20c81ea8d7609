"""An upload that starts a training claims its user's slot while its photos are checked: a
second upload or start meanwhile is refused with 409 ``upload_in_progress`` and Retry-After. A
live upload renews its claim; a process killed mid-upload leaves one that lapses within
``UPLOAD_CLAIM_TTL`` (a minute), after which the user uploads and starts again."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.errors import ErrorCode, UploadInProgressError
from selfie_lora.services import training as training_module
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import build_services
from tests.conftest import fake_services_on, make_settings, one_person_analyzer
from tests.support.clock import Clock
from tests.support.photos import photo_zip
from tests.support.processes import run_killed, services_script


# Old code: one claim of 10 minutes, never renewed; after the kill every upload and start
# answered 409 "wait for that upload to finish" for 10 minutes, with no Retry-After.
def test_a_process_killed_mid_upload_holds_its_user_up_a_minute_at_most_and_says_when(
        tmp_path: Path) -> None:
    script = (
        services_script(imports="from tests.support.photos import photo_zip\n") +
        "ann, key = svc.users.create(name='ann')\n"
        "first = svc.training.upload_zip(user=ann, data=photo_zip(4), start=False)\n"
        "print(key, first.dataset.id, flush=True)\n"
        "checked = svc.intake.prepare_files\n"
        "def killed(**kw):\n"
        "    checked(**kw)\n"
        "    os._exit(9)  # the photos are stored: the server dies before the training\n"
        "svc.intake.prepare_files = killed\n"
        "svc.training.upload_zip(user=ann, data=photo_zip(4, offset=5))\n"
    )
    key, earlier = run_killed(script, str(tmp_path)).stdout.split()
    killed_at = datetime.now(UTC)

    home = tmp_path / "home"
    settings = make_settings(tmp_path, intake_workers=1,
                             database_url=f"sqlite:///{home / 'selfie-lora.db'}")
    svc = build_services(settings, trainers={"local": FakeTrainer()},
                         face_analyzer=one_person_analyzer(), generators={"local": FakeGenerator()})
    headers = {"Authorization": f"Bearer {key}"}
    upload = {"file": ("p.zip", photo_zip(4, offset=5), "application/zip")}
    try:
        with TestClient(create_app(settings, services=svc, run_worker=False)) as client:
            refused = client.post("/api/training/upload-zip", headers=headers, files=upload)
            assert refused.status_code == 409, refused.text
            error = refused.json()["error"]
            assert error["code"] == "upload_in_progress"
            wait = int(refused.headers["retry-after"])
            assert 1 <= wait <= training_module.UPLOAD_CLAIM_TTL.total_seconds()
            assert error["details"] == [{"retry_after": wait}]
            assert f"in {wait} second" in error["message"]
            assert "interrupted" in error["message"]
            started = client.post("/api/training/start", headers=headers,
                                  json={"dataset_id": earlier})
            assert started.status_code == 409
            assert 1 <= int(started.headers["retry-after"]) <= wait

            # Once the dead upload's claim has lapsed, the user's next upload goes through.
            svc.training._clock = lambda: killed_at + timedelta(seconds=wait + 1)
            again = client.post("/api/training/upload-zip", headers=headers, files=upload)
            assert again.status_code == 202, again.text
    finally:
        svc.close()


def test_a_live_upload_keeps_its_claim_past_its_lifetime_and_lets_it_go_at_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training_module, "UPLOAD_CLAIM_RENEWAL", timedelta(seconds=0.02))
    services = fake_services_on("sqlite", tmp_path)
    clock = Clock()
    services.training._clock = clock
    try:
        ann, _key = services.users.create(name="ann")
        earlier = services.training.upload_zip(user=ann, data=photo_zip(4), start=False)
        repo, checking = services.repo, services.intake
        seen: dict[str, Any] = {}

        def slow_read() -> tuple[list[UploadedFile], list[Any]]:
            # The photos take longer to check than a claim lives: the renewals keep it.
            clock.advance(seconds=3 * training_module.UPLOAD_CLAIM_TTL.total_seconds())
            deadline = time.monotonic() + 10
            while repo.upload_claim_expiry(ann.id, now=clock.now, except_token=None) is None:
                assert time.monotonic() < deadline, "the claim was never renewed"
                time.sleep(0.01)
            with pytest.raises(UploadInProgressError) as refused:
                services.training.start(user=ann, dataset_id=earlier.dataset.id)
            seen["refused"] = refused.value
            files, notes = checking.read_zip(photo_zip(4, offset=5))
            return list(files), list(notes)

        result = services.training.upload(user=ann, read=slow_read)
        assert result.training is not None
        assert seen["refused"].code is ErrorCode.UPLOAD_IN_PROGRESS
        assert seen["refused"].retry_after <= training_module.UPLOAD_CLAIM_TTL.total_seconds()
        assert repo.upload_claim_expiry(ann.id, now=clock.now, except_token=None) is None
    finally:
        services.close()
