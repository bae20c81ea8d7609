"""POST /api/webhooks/replicate: signatures checked, progress applied, nothing else trusted."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.testing.replicate_standin import sign_webhook
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import synthetic_photo

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    settings = make_settings(tmp_path, webhook_secret=SECRET)
    services = build_services(settings, trainers={"local": FakeTrainer()},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    yield services
    services.close()


@pytest.fixture
def webhook_client(svc: Services) -> Iterator[TestClient]:
    # No worker: the training stays queued, so only the webhook moves it.
    with TestClient(create_app(svc.settings, services=svc), raise_server_exceptions=False) as c:
        yield c


def queued_training_id(svc: Services) -> str:
    user, _ = svc.users.create(name="ann")
    dataset = svc.intake.ingest_files(user=user, files=[
        UploadedFile(name="a.jpg", data=synthetic_photo(1))])
    return svc.training.start(user=user, dataset_id=dataset.id).training.id


def post(client: TestClient, payload: dict[str, object], *, training_id: str | None = None,
         secret: str = SECRET, timestamp: int | None = None) -> int:
    body = json.dumps(payload).encode()
    headers = sign_webhook(secret=secret, body=body, timestamp=timestamp)
    headers["content-type"] = "application/json"
    params = {"training_id": training_id} if training_id else None
    return client.post("/api/webhooks/replicate", content=body, headers=headers,
                       params=params).status_code


def test_signed_webhook_moves_progress_and_records_remote_id(
    svc: Services, webhook_client: TestClient
) -> None:
    tid = queued_training_id(svc)
    logs = "flux_train_replicate:  50%|#####     | 500/1000 [01:00<01:00]\n"
    assert post(webhook_client, {"id": "r-1", "status": "processing", "logs": logs},
                training_id=tid) == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.remote_id, t.step, t.total_steps) == ("processing", "r-1", 500, 1000)
    # A final event does not finish the training: the worker fetches and stores the weights.
    assert post(webhook_client, {"id": "r-1", "status": "succeeded", "logs": logs}) == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert str(t.status) == "processing"
    assert t.version_id is None


def test_bad_signatures_are_401_and_change_nothing(
    svc: Services, webhook_client: TestClient
) -> None:
    tid = queued_training_id(svc)
    other = "whsec_" + base64.b64encode(b"another-secret-another-secret!!!").decode()
    payload = {"id": "r-1", "status": "processing", "logs": "5/10"}
    assert post(webhook_client, payload, training_id=tid, secret=other) == 401
    assert post(webhook_client, payload, training_id=tid,
                timestamp=int(time.time()) - 3600) == 401
    r = webhook_client.post("/api/webhooks/replicate", content=b"{}",
                            headers={"webhook-id": "x", "webhook-timestamp": "nope",
                                     "webhook-signature": "v1,garbage"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.remote_id) == ("queued", None)


def test_training_id_in_query_cannot_hijack_another_remote_training(
    svc: Services, webhook_client: TestClient
) -> None:
    tid = queued_training_id(svc)
    assert post(webhook_client, {"id": "r-1", "status": "processing"}, training_id=tid) == 200
    assert post(webhook_client, {"id": "r-2", "status": "processing", "logs": "9/10"},
                training_id=tid) == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (t.remote_id, t.step) == ("r-1", 0)


def test_malformed_but_signed_body_is_422(svc: Services, webhook_client: TestClient) -> None:
    assert post(webhook_client, {"status": "processing"}) == 422
