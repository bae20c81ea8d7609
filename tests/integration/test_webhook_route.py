"""POST /api/webhooks/replicate: signatures checked, progress applied, nothing else trusted."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.api.app import create_app
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.domain.entities import Training
from selfie_lora.errors import STORAGE_RETRY_AFTER, DatabaseLockedError
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.testing.replicate_standin import sign_webhook
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip, synthetic_photo

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


def queued_training_id(svc: Services, name: str = "ann") -> str:
    user, _ = svc.users.create(name=name)
    dataset = svc.intake.ingest_files(user=user, files=[
        UploadedFile(name="a.jpg", data=synthetic_photo(1))])
    return svc.training.start(user=user, dataset_id=dataset.id).training.id


def running_remotely(svc: Services, remote_id: str, name: str = "ann") -> str:
    """A training a worker has created on Replicate as ``remote_id`` (the row as its worker
    leaves it once the remote training exists)."""
    tid = queued_training_id(svc, name)
    t = svc.repo.get_training(tid)
    assert t is not None
    svc.repo.save_training(dataclasses.replace(t, remote_id=remote_id))
    return tid


def total_steps(svc: Services, training_id: str) -> int:
    t = svc.repo.get_training(training_id)
    assert t is not None
    return t.total_steps


def signed(payload: dict[str, object], *, secret: str = SECRET, timestamp: int | None = None,
           msg_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    headers = sign_webhook(secret=secret, body=body, timestamp=timestamp, msg_id=msg_id)
    headers["content-type"] = "application/json"
    return body, headers


def post(client: TestClient, payload: dict[str, object], *, training_id: str | None = None,
         secret: str = SECRET, timestamp: int | None = None) -> int:
    body, headers = signed(payload, secret=secret, timestamp=timestamp)
    params = {"training_id": training_id} if training_id else None
    return client.post("/api/webhooks/replicate", content=body, headers=headers,
                       params=params).status_code


def test_signed_webhook_moves_progress_of_the_training_with_that_remote_id(
    svc: Services, webhook_client: TestClient
) -> None:
    tid = running_remotely(svc, "r-1")
    logs = "flux_train_replicate:  50%|#####     | 500/1000 [01:00<01:00]\n"
    body, headers = signed({"id": "r-1", "status": "processing", "logs": logs})
    r = webhook_client.post("/api/webhooks/replicate", content=body, headers=headers)
    assert r.status_code == 200
    assert r.json()["training_id"] == tid
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.remote_id, t.step, t.total_steps) == ("processing", "r-1", 500, 1000)
    # A final event does not finish the training: the worker fetches and stores the weights.
    assert post(webhook_client, {"id": "r-1", "status": "succeeded", "logs": logs}) == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert str(t.status) == "processing"
    assert t.version_id is None


def test_only_the_trainings_own_bar_moves_its_progress(
    svc: Services, webhook_client: TestClient
) -> None:
    # A training that failed while its model loaded: the logs' only bar is the shards', whose
    # 2/3 made a 40-step training read step 2 of 3.
    tid = running_remotely(svc, "r-1")
    steps = total_steps(svc, tid)
    assert steps not in (0, 3)
    logs = ("Loading checkpoint shards:  67%|######6   | 2/3 [00:05<00:02,  2.5s/it]\n"
            "torch.OutOfMemoryError: CUDA out of memory\n")
    assert post(webhook_client, {"id": "r-1", "status": "failed", "logs": logs,
                                 "error": "CUDA out of memory"}) == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (t.step, t.total_steps) == (0, steps)
    # The training's own bar counts, whatever bars come after it; unlabelled too.
    logs = (f"  5/{steps} [00:01<00:10]\n"
            "Loading checkpoint shards: 100%|##########| 3/3 [00:05<00:00]\n")
    assert post(webhook_client, {"id": "r-1", "status": "processing", "logs": logs}) == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (t.step, t.total_steps) == (5, steps)


def test_bad_signatures_are_401_and_change_nothing(
    svc: Services, webhook_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    tid = running_remotely(svc, "r-1")
    other = "whsec_" + base64.b64encode(b"another-secret-another-secret!!!").decode()
    payload = {"id": "r-1", "status": "processing", "logs": "5/10"}
    caplog.set_level("WARNING")
    assert post(webhook_client, payload, secret=other) == 401
    assert post(webhook_client, payload, timestamp=int(time.time()) - 3600) == 401
    # Said, which it is (found in review: only the error counter showed either).
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
              and r.getMessage().startswith("Replicate webhook refused (401)")]
    assert len(warned) == 2, warned
    assert "signature mismatch" in warned[0]
    assert re.search(r"this server's clock 360[01] s ahead of it", warned[1]), warned
    r = webhook_client.post("/api/webhooks/replicate", content=b"{}",
                            headers={"webhook-id": "x", "webhook-timestamp": "nope",
                                     "webhook-signature": "v1,garbage"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.step) == ("queued", 0)


def test_a_training_id_in_the_query_is_ignored(svc: Services, webhook_client: TestClient) -> None:
    # A validly signed body (about some remote training, r-9) sent with the id of another
    # user's queued training in the unsigned query: that training must not move.
    victim = queued_training_id(svc, "victim")
    body, headers = signed({"id": "r-9", "status": "processing", "logs": "9/10 ["})
    r = webhook_client.post("/api/webhooks/replicate", content=body, headers=headers,
                            params={"training_id": victim})
    assert r.status_code == 200
    assert r.json()["training_id"] is None
    t = svc.repo.get_training(victim)
    assert t is not None
    assert (str(t.status), t.remote_id, t.step) == ("queued", None, 0)


def test_a_replayed_webhook_id_is_answered_200_and_changes_nothing(
    svc: Services, webhook_client: TestClient
) -> None:
    # The contract answers the route 2xx (Replicate retries anything else, for hours).
    tid = running_remotely(svc, "r-1")
    steps = total_steps(svc, tid)
    body, headers = signed({"id": "r-1", "status": "processing", "logs": f"3/{steps} ["},
                           msg_id="msg_once")
    assert webhook_client.post("/api/webhooks/replicate", content=body,
                               headers=headers).status_code == 200
    replay = webhook_client.post("/api/webhooks/replicate", content=body, headers=headers)
    assert replay.status_code == 200
    assert replay.json()["training_id"] == tid
    # The same id with another (validly signed) body is the same delivery: nothing applied.
    body2, headers2 = signed({"id": "r-1", "status": "processing", "logs": f"8/{steps} ["},
                             msg_id="msg_once")
    assert webhook_client.post("/api/webhooks/replicate", content=body2,
                               headers=headers2).status_code == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert t.step == 3


def test_a_webhook_whose_update_failed_is_applied_when_it_comes_again(
    svc: Services, webhook_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its id was recorded in a transaction of its own before the update: the update failed,
    # and Replicate's retry with the same webhook-id was refused, the news lost.
    tid = running_remotely(svc, "r-1")
    steps = total_steps(svc, tid)
    save = SqlRepository.save_training
    # A lock as the repository raises it (SQLite's write lock held past its busy timeout).
    failures = [DatabaseLockedError("database error: database is locked", lock=True)]

    def save_once_failing(self: SqlRepository, training: Training) -> None:
        if failures:
            raise failures.pop()
        save(self, training)

    monkeypatch.setattr(SqlRepository, "save_training", save_once_failing)
    body, headers = signed({"id": "r-1", "status": "processing", "logs": f"7/{steps} ["},
                           msg_id="msg_retried")
    first = webhook_client.post("/api/webhooks/replicate", content=body, headers=headers)
    # Busy, not a failure: 503 with Retry-After (Replicate sends it again either way).
    assert first.status_code == 503, first.text
    assert first.headers["Retry-After"] == str(STORAGE_RETRY_AFTER)
    assert not failures
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.step) == ("queued", 0)
    again = webhook_client.post("/api/webhooks/replicate", content=body, headers=headers)
    assert again.status_code == 200
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.step) == ("processing", 7)


def test_malformed_but_signed_body_is_422(svc: Services, webhook_client: TestClient) -> None:
    assert post(webhook_client, {"status": "processing"}) == 422


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"id": ' * 50_000, b"[" * 5_000 + b"]" * 5_000])
def test_a_deeply_nested_signed_body_is_422_without_a_traceback(
    svc: Services, webhook_client: TestClient, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    """Found in review: json.loads raised RecursionError on a signed body nested past the
    recursion limit, answered 500 with a logged traceback (and retried by Replicate)."""
    tid = running_remotely(svc, "r-1")
    headers = sign_webhook(secret=SECRET, body=body)
    headers["content-type"] = "application/json"
    caplog.set_level("INFO")
    r = webhook_client.post("/api/webhooks/replicate", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "bad_webhook"
    assert "nested too deeply" in r.json()["error"]["message"]
    assert not [rec for rec in caplog.records if rec.levelno >= 40 or rec.exc_info]
    t = svc.repo.get_training(tid)
    assert t is not None
    assert (str(t.status), t.step) == ("queued", 0)


@pytest.mark.parametrize("secret", [SECRET, None], ids=["with-secret", "url-alone"])
def test_a_replicate_training_gets_the_contract_s_webhook_and_a_warning_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    secret: str | None,
) -> None:
    """The contract: with SELFIE_LORA_PUBLIC_URL set, trainings are created with a webhook to
    {PUBLIC_URL}/api/webhooks/replicate. Without SELFIE_LORA_WEBHOOK_SECRET this server answers
    each delivery 401 (the worker polls), which the wiring says once; with it, nothing to say."""
    import threading

    from selfie_lora import wiring
    from selfie_lora.testing.replicate_standin import ReplicateStandIn

    # A fresh "said once" for this test (the flag is the process's).
    monkeypatch.setattr(wiring, "_unsigned_webhooks_said", threading.Event(), raising=False)
    with ReplicateStandIn() as standin:
        settings = make_settings(
            tmp_path, trainer="replicate", replicate_api_token=standin.token,
            replicate_base_url=standin.base_url, replicate_owner="acme",
            replicate_poll_interval=0.01, public_url="https://lora.example.com",
            webhook_secret=secret)
        services = build_services(settings, face_analyzer=one_person_analyzer())
        try:
            build_services(settings, face_analyzer=one_person_analyzer()).close()  # a second
            user, _ = services.users.create(name="ann")
            started = services.training.upload_zip(
                user=user, data=photo_zip(3, size=1100))
            assert started.training is not None
            services.training.run(started.training.id)
            t = services.repo.get_training(started.training.id)
            assert t is not None
            assert t.remote_id is not None
            sent = standin.trainings[t.remote_id].webhook
        finally:
            services.close()
    said = [r for r in caplog.records if "SELFIE_LORA_WEBHOOK_SECRET is not" in r.getMessage()]
    assert sent == "https://lora.example.com/api/webhooks/replicate"
    if secret is None:
        assert len(said) == 1  # once, however many times the services are built
        assert "answered 401" in said[0].getMessage()
    else:
        assert said == []


def test_the_url_alone_warns_only_where_a_replicate_trainer_is_built(
    home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """SELFIE_LORA_PUBLIC_URL without a secret is a normal setup (the alerts' links, the worker
    polls), yet every command warned about webhooks, 'users list' and 'gc' included (cron
    mailed it): only building a Replicate trainer (serve, worker, train) says it, once."""
    import logging
    import threading

    from typer.testing import CliRunner

    from selfie_lora import wiring
    from selfie_lora.cli import app
    from selfie_lora.config import get_settings

    monkeypatch.setattr(wiring, "_unsigned_webhooks_said", threading.Event(), raising=False)
    for name, value in (("TRAINER", "replicate"), ("REPLICATE_API_TOKEN", "r8_dummytoken"),
                        ("REPLICATE_OWNER", "acme"), ("PUBLIC_URL", "https://lora.example.com")):
        monkeypatch.setenv(f"SELFIE_LORA_{name}", value)
    monkeypatch.delenv("SELFIE_LORA_WEBHOOK_SECRET", raising=False)
    get_settings.cache_clear()

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "SELFIE_LORA_WEBHOOK_SECRET is not" in r.getMessage()]

    caplog.set_level("WARNING", logger="selfie_lora.wiring")
    root = logging.getLogger()
    # The CLI puts its own handler (on the runner's stderr) in place of the root's, caplog's too.
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    kept = list(root.handlers)
    try:
        # gc first: it makes the data folder, which users list refuses to make.
        for command in (["gc"], ["users", "list"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 0, result.output
            assert "WEBHOOK_SECRET" not in result.output  # its stderr's warnings included
    finally:
        root.handlers[:] = kept
    assert said() == []
    settings = get_settings()
    for _ in range(2):
        build_services(settings, generators={}, face_analyzer=one_person_analyzer()).close()
    assert len(said()) == 1  # the trainer's process says it, once
