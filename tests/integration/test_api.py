"""The HTTP API with fake backends: auth, ownership, the whole cycle, errors."""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.replicate.session import GENERATOR_FAILURES
from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.domain.recipes import DEFAULT_REPLICATE_TRAINER_VERSION
from selfie_lora.errors import (
    GenerationError,
    InvalidInputError,
    StorageError,
    StorageFullError,
)
from selfie_lora.services.generation import MAX_SEED
from selfie_lora.services.ports import ProgressSink, TrainingJob, TrainingResult
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings, one_person_analyzer, serving, wait_terminal
from tests.support.generations import held_generations
from tests.support.homes import MadeHome, made_once
from tests.support.owners import own_model
from tests.support.photos import photo_zip, synthetic_photo

T = TypeVar("T")


def upload(client: TestClient, headers: dict[str, str], data: bytes | None = None,
           *, start: bool = True) -> dict:
    r = client.post("/api/training/upload-zip", headers=headers,
                    files={"file": ("photos.zip", data or photo_zip(4), "application/zip")},
                    data={"start": "true" if start else "false"})
    assert r.status_code == 202, r.text
    return r.json()


@dataclass(frozen=True)
class Trained:
    """ann, whose model is trained: her headers and her last training's terminal answer."""

    headers: dict[str, str]
    done: dict[str, Any]


def _ann_trained(times: int) -> Callable[[TestClient, Services], Trained]:
    def make(client: TestClient, services: Services) -> Trained:
        h = auth(services, "ann")
        done = wait_terminal(client, h, upload(client, h)["training"]["id"])
        for _ in range(times - 1):
            done = wait_terminal(client, h, client.post("/api/training/start", headers=h,
                                                        json={}).json()["training"]["id"])
        return Trained(headers=h, done=done)
    return make


@pytest.fixture(scope="module")
def ann_trained_home(tmp_path_factory: pytest.TempPathFactory) -> MadeHome[Trained]:
    """ann trained once, made once per module: the training was most of the time of each test
    that only starts from a trained model (``settings`` below copies it per test)."""
    return made_once(tmp_path_factory, _ann_trained(1))


@pytest.fixture(scope="module")
def ann_retrained_home(tmp_path_factory: pytest.TempPathFactory) -> MadeHome[Trained]:
    """ann trained, then trained again (versions 1 and 2), made once per module."""
    return made_once(tmp_path_factory, _ann_trained(2))


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """conftest's, on a copy of ann's trained HOME for a test that takes ``ann_trained`` or
    ``ann_retrained`` (a copy each: what one test generates or deletes the next does not see)."""
    for name in ("ann_trained", "ann_retrained"):
        if name in request.fixturenames:
            made: MadeHome[Trained] = request.getfixturevalue(f"{name}_home")
            made.copy_to(tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def ann_trained(ann_trained_home: MadeHome[Trained], client: TestClient) -> Trained:
    """ann with one trained version, on this test's copy of ``ann_trained_home``."""
    return ann_trained_home.made


@pytest.fixture
def ann_retrained(ann_retrained_home: MadeHome[Trained], client: TestClient) -> Trained:
    """ann with versions 1 and 2 (2 active), on this test's copy of ``ann_retrained_home``."""
    return ann_retrained_home.made


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200


def test_the_probes_answer_head_as_get_without_a_body(client: TestClient) -> None:
    """Load balancers and uptime checkers probe with HEAD: /healthz and /readyz answered 405."""
    for path in ("/healthz", "/readyz"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, (path, head.text)
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
    assert client.post("/healthz").headers["allow"] == "GET, HEAD"


def test_no_key_or_wrong_key_is_401_with_error_shape(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        r = client.get("/api/model", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert set(r.json()["error"]) == {"code", "message", "details"}


def test_model_is_404_before_first_upload(client: TestClient, services: Services) -> None:
    r = client.get("/api/model", headers=auth(services, "ann"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_whole_cycle(client: TestClient, services: Services, fake_generator: FakeGenerator) -> None:
    h = auth(services, "ann")
    body = upload(client, h)
    assert body["dataset"]["images_total"] == 4
    assert body["dataset"]["images_accepted"] == 4
    training = body["training"]
    assert training["status"] == "queued"
    assert training["is_retraining"] is False
    assert body["model"]["lora_scale"] == 1.0
    assert body["model"]["lora_scale_is_custom"] is False
    done = wait_terminal(client, h, training["id"])
    assert done["training"]["status"] == "succeeded"
    assert done["training"]["progress"] == 1.0
    assert done["model"]["active_version"]["number"] == 1
    version = done["model"]["active_version"]
    weights = client.get(version["weights_url"], headers=h)
    assert weights.status_code == 200
    import hashlib

    assert hashlib.sha256(weights.content).hexdigest() == version["weights_sha256"]

    r = client.post("/api/generate", headers=h, json={"prompt": "on a beach", "seed": 3})
    assert r.status_code == 200, r.text
    gen = r.json()["generation"]
    assert done["model"]["trigger_word"] in gen["prompt"]
    assert gen["lora_scale"] == 1.0
    assert gen["version_id"] == version["id"]
    image = client.get(gen["images"][0], headers=h)
    assert image.status_code == 200
    assert image.content.startswith(b"\x89PNG")
    assert fake_generator.jobs[-1].weights_path is not None


def test_a_generation_without_a_seed_records_the_seed_that_made_it(
    client: TestClient, services: Services, fake_generator: FakeGenerator,
    ann_trained: Trained
) -> None:
    """The seed was left to the generator and recorded as none: the picture could not be made
    again. The service draws it, sends it and records it."""
    h = ann_trained.headers
    r = client.post("/api/generate", headers=h, json={"prompt": "on a beach"})
    assert r.status_code == 200, r.text
    gen = r.json()["generation"]
    assert isinstance(gen["seed"], int)
    assert 0 <= gen["seed"] <= MAX_SEED
    assert fake_generator.jobs[-1].seed == gen["seed"]
    (stored,) = services.generation.history(user=services.users.get_by_name(name="ann"))
    assert stored.seed == gen["seed"]
    again = client.post("/api/generate", headers=h,
                        json={"prompt": "on a beach", "seed": gen["seed"]}).json()["generation"]
    assert again["seed"] == gen["seed"]
    assert (client.get(again["images"][0], headers=h).content
            == client.get(gen["images"][0], headers=h).content)


def test_a_picture_the_safety_checker_withholds_leaves_the_others_and_is_named(
    client: TestClient, services: Services, fake_generator: FakeGenerator,
    ann_trained: Trained
) -> None:
    """A batch of 4 with one picture withheld by Replicate's safety checker failed whole: the 3
    good pictures (paid for) were lost. They are kept, in the batch's order, and the answer and
    the stored generation name the withheld picture and its seed."""
    h = ann_trained.headers
    fake_generator.withhold = frozenset({1})
    r = client.post("/api/generate", headers=h,
                    json={"prompt": "on a beach", "num_outputs": 4, "seed": 40})
    assert r.status_code == 200, r.text
    gen = r.json()["generation"]
    assert gen["withheld"] == [{"picture": 2, "seed": 41}]
    assert len(gen["images"]) == 3
    for url in gen["images"]:
        assert client.get(url, headers=h).content.startswith(b"\x89PNG")
    user = services.users.get_by_name(name="ann")
    (stored,) = services.generation.history(user=user)
    assert stored.id == gen["id"]
    assert stored.withheld == (1,)
    # Image 1 is picture 3 (seed 42), stored under its place in the batch.
    assert stored.pictures() == (0, 2, 3)
    assert stored.image_keys[1].endswith("/2.png")
    # Every picture withheld: nothing to keep, the generation fails and nothing is stored.
    fake_generator.withhold = frozenset({0})
    r = client.post("/api/generate", headers=h, json={"prompt": "on a beach", "seed": 40})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "generation_failed"
    assert len(services.generation.history(user=user)) == 1


@dataclass
class MismatchTrainer(FakeTrainer):
    """Replicate publishing a training's LoRA as another model's version (replicate-python
    #419): the adapter flags it ``version_mismatch``."""

    backend: str = "replicate"

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        return dataclasses.replace(super().train(job, sink=sink), version_mismatch=True,
                                   remote_version="someone/elses-model:" + "b" * 64)


def test_a_version_published_to_another_model_is_not_generated_with(tmp_path: Path) -> None:
    """It generated on the other model's Replicate version: pictures of someone else."""
    settings = make_settings(tmp_path, trainer="replicate", replicate_owner="acme",
                             quality_gate=False)
    generator = FakeGenerator(backend="replicate")
    svc = build_services(settings, trainers={"replicate": MismatchTrainer()},
                         face_analyzer=one_person_analyzer(), generators={"replicate": generator})
    try:
        with TestClient(create_app(settings, services=svc, run_worker=True)) as client:
            h = auth(svc, "ann")
            # Replicate trains at 1024 px: photos whose faces are large enough.
            started = upload(client, h, photo_zip(4, size=1024))
            done = wait_terminal(client, h, started["training"]["id"])
            assert done["model"]["active_version"]["version_mismatch"] is True
            r = client.post("/api/generate", headers=h, json={"prompt": "x", "seed": 1})
            # Nor offered by the Generate page's version choice.
            offered = svc.generation.versions(user=svc.users.get_by_name(name="ann"))
    finally:
        svc.close()
    assert offered == []
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "version_mismatch"
    assert "another model" in error["message"]
    assert "Retrain" in error["message"]
    assert [job.remote_version for job in generator.jobs] == []
    assert svc.repo.list_generations(svc.users.get_by_name(name="ann").id, limit=10) == []


@dataclass
class LaterMismatchTrainer(FakeTrainer):
    """Replicate publishing a retraining's LoRA as another model's version, once the first
    training went well (``mismatch`` set between them)."""

    backend: str = "replicate"
    mismatch: bool = False

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        result = super().train(job, sink=sink)
        if not self.mismatch:
            return result
        return dataclasses.replace(result, version_mismatch=True,
                                   remote_version="someone/elses-model:" + "c" * 64)


@contextmanager
def _retrained_into_another_model(
        tmp_path: Path, **settings: Any,
) -> Iterator[tuple[TestClient, dict[str, str], Services, dict[str, Any]]]:
    """A served Replicate model (owner acme) whose first training succeeded and whose
    retraining Replicate published to another model: the client, ann's headers, the services
    and the retraining's terminal answer."""
    trainer = LaterMismatchTrainer()
    made = make_settings(tmp_path, trainer="replicate", replicate_owner="acme", **settings)
    svc = build_services(made, trainers={"replicate": trainer},
                         face_analyzer=one_person_analyzer(),
                         generators={"replicate": FakeGenerator(backend="replicate")})
    try:
        with TestClient(create_app(made, services=svc, run_worker=True)) as client:
            h = auth(svc, "ann")
            first = upload(client, h, photo_zip(4, size=1024))
            assert wait_terminal(client, h, first["training"]["id"])["training"]["status"] == (
                "succeeded")
            trainer.mismatch = True
            again = upload(client, h, photo_zip(4, size=1024))
            yield client, h, svc, wait_terminal(client, h, again["training"]["id"])
    finally:
        svc.close()


def test_a_version_published_to_another_model_is_not_activated_over_one_that_works(
        tmp_path: Path) -> None:
    """Activated, every generation with no version named failed (422 version_mismatch) where
    version 1 made pictures: refused as a version whose weights are gone is, nothing changed."""
    with _retrained_into_another_model(tmp_path) as (client, h, _svc, done):
        # Its probes cannot be made: the gate held it, version 1 stays active.
        assert done["model"]["active_version"]["number"] == 1
        events = len(client.get("/api/model/log", headers=h).json()["events"])
        r = client.post("/api/model/versions/2/activate", headers=h)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "version_mismatch"
        assert "another model" in error["message"]
        model = client.get("/api/model", headers=h).json()
        assert model["active_version"]["number"] == 1  # nothing changed
        assert len(client.get("/api/model/log", headers=h).json()["events"]) == events
        generated = client.post("/api/generate", headers=h, json={"prompt": "x", "seed": 1})
        assert generated.status_code == 200, generated.text
        # Version 1 can be activated again (already active: the same answer).
        assert client.post("/api/model/versions/1/activate", headers=h).status_code == 200


@pytest.mark.parametrize("gate", [True, False], ids=["gate on", "gate off"])
def test_a_version_published_to_another_model_never_replaces_the_active_one(
        tmp_path: Path, gate: bool) -> None:
    """Gate off, it passed and replaced version 1, which made pictures, with one that makes
    none; gate on, it was held with the hint to activate it yourself, which is refused."""
    with _retrained_into_another_model(tmp_path, quality_gate=gate) as (client, h, svc, done):
        versions = client.get("/api/model/versions", headers=h).json()["versions"]
        stored = svc.repo.get_version(versions[0]["id"])
    assert done["training"]["status"] == "succeeded"
    assert done["model"]["active_version"]["number"] == 1
    held = versions[0]
    assert (held["number"], held["gate"]["status"]) == (2, "held")
    assert "another model" in held["gate"]["reason"]
    assert "activate it yourself" not in held["gate"]["reason"]
    # The operator's alert says why (review): it was kind not_scored and read "(likeness not
    # scored against version 1's not scored, tolerance 0.02)", version 1 being scored.
    assert stored is not None
    assert stored.alert is not None
    assert stored.alert["kind"] == "version_mismatch"
    assert stored.alert["alert_id"] == f"version_mismatch:{stored.id}"
    assert stored.alert["text"].startswith(
        "selfie-lora held back ann's version 2 (not for its likeness: Replicate published it "
        "to another model). Replicate published version 2 to another model than yours")
    assert "tolerance" not in stored.alert["text"]
    assert "not scored" not in stored.alert["text"]


@dataclass
class SameRemoteVersionTrainer(FakeTrainer):
    """A backend that names the same remote version for every training: the destination's
    latest taken for an output that named none, while Replicate had added none for the run."""

    backend: str = "replicate"

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        return dataclasses.replace(super().train(job, sink=sink),
                                   remote_version=f"{job.destination}:" + "c" * 64)


def test_a_retrain_is_never_stored_on_an_earlier_version_s_remote_version(
        tmp_path: Path) -> None:
    """Review repro: version 2 was stored with version 1's Replicate version, so it was scored
    and generated with version 1's weights."""
    settings = make_settings(tmp_path, trainer="replicate", replicate_owner="acme",
                             quality_gate=False)
    svc = build_services(settings, trainers={"replicate": SameRemoteVersionTrainer()},
                         face_analyzer=one_person_analyzer(),
                         generators={"replicate": FakeGenerator(backend="replicate")})
    try:
        with TestClient(create_app(settings, services=svc, run_worker=True)) as client:
            h = auth(svc, "ann")
            first = wait_terminal(client, h, upload(client, h, photo_zip(4, size=1024))
                                  ["training"]["id"])
            assert first["training"]["status"] == "succeeded"
            again = client.post("/api/training/start", headers=h, json={}).json()["training"]
            done = wait_terminal(client, h, again["id"])
            versions = client.get("/api/model/versions", headers=h).json()["versions"]
    finally:
        svc.close()
    assert done["training"]["status"] == "failed", done
    assert "version 1's" in done["training"]["error"]
    assert "Start the training again" in done["training"]["error"]
    assert [v["number"] for v in versions] == [1]
    assert done["model"]["active_version"]["number"] == 1


def test_other_users_objects_are_404(client: TestClient, services: Services,
                                     fake_generator: FakeGenerator) -> None:
    ann = auth(services, "ann")
    body = upload(client, ann)
    done = wait_terminal(client, ann, body["training"]["id"])
    version = done["model"]["active_version"]
    gen = client.post("/api/generate", headers=ann, json={"prompt": "x"}).json()["generation"]
    # Bob has a trained model of his own: past "you have no model yet", only a lookup scoped to
    # his model can answer 404 (and his version 1 is there for the number form to find).
    bob_owner = own_model(client, services, "bob")
    bob = bob_owner.headers
    assert bob_owner.version is not None
    ann_trigger = body["model"]["trigger_word"]
    jobs_before = len(fake_generator.jobs)
    for method, url, kwargs in [
        ("get", "/api/training/progress", {"params": {"training_id": body["training"]["id"]}}),
        ("get", version["weights_url"], {}),
        ("post", f"/api/model/versions/{version['id']}/activate", {}),
        ("get", gen["images"][0], {}),
        ("post", "/api/training/start", {"json": {"dataset_id": body["dataset"]["id"]}}),
        # Ann's LoRA, asked for by Bob: pictures of Ann's face on request.
        ("post", "/api/generate", {"json": {"prompt": "x", "version_id": version["id"]}}),
    ]:
        r = getattr(client, method)(url, headers=bob, **kwargs)
        assert r.status_code == 404, (url, kwargs, r.status_code, r.text)
        assert ann["Authorization"] not in r.text
        assert ann_trigger not in r.text
    assert len(fake_generator.jobs) == jobs_before  # nothing was generated
    # A version number is Bob's own version of that number, never Ann's.
    r = client.post("/api/generate", headers=bob, json={"prompt": "x", "version_id": "1"})
    assert r.status_code == 200, r.text
    assert r.json()["generation"]["version_id"] == bob_owner.version["id"]
    assert all(ann_trigger not in job.prompt for job in fake_generator.jobs[jobs_before:])
    bob_user = services.users.get_by_name(name="bob")
    assert {g.version_id for g in services.generation.history(user=bob_user)} == {
        bob_owner.version["id"]}


def test_an_upload_that_starts_nothing_makes_the_model_the_first_training_keeps(
    client: TestClient, services: Services
) -> None:
    h = auth(services, "ann")
    body = upload(client, h, start=False)
    assert body["training"] is None
    model = body["model"]
    assert model["trigger_word"]
    assert model["active_version"] is None
    assert client.get("/api/model", headers=h).json()["trigger_word"] == model["trigger_word"]
    later = upload(client, h, photo_zip(4, offset=10), start=False)
    again = later["model"]
    assert (again["id"], again["trigger_word"]) == (model["id"], model["trigger_word"])
    first = client.post("/api/training/start", headers=h, json={})
    assert first.status_code == 202, first.text
    training = first.json()["training"]
    fixed = ("trigger_word", "destination", "trainer_version")
    assert {k: training[k] for k in fixed} == {k: model[k] for k in fixed}
    assert training["is_retraining"] is False
    assert training["dataset_id"] == later["dataset"]["id"]
    wait_terminal(client, h, training["id"])
    second = client.post("/api/training/start", headers=h, json={}).json()["training"]
    assert second["is_retraining"] is True
    assert {k: second[k] for k in fixed} == {k: model[k] for k in fixed}
    wait_terminal(client, h, second["id"])


def test_bad_zip_is_422_and_stores_nothing(client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("x.zip", b"not a zip", "application/zip")})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "bad_archive"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.jpg", b"\xff\xd8 not really a jpeg")
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("x.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "dataset_rejected"
    assert any(d["code"] == "not_an_image" for d in r.json()["error"]["details"])
    assert client.get("/api/model", headers=h).status_code == 404
    assert not (services.settings.blob_dir / "photos").exists()


def test_start_without_dataset_is_422(client: TestClient, services: Services) -> None:
    r = client.post("/api/training/start", headers=auth(services, "ann"), json={})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "no_dataset"


def test_start_uses_latest_dataset_and_second_start_is_409(
    client: TestClient, services: Services, fake_trainer: FakeTrainer
) -> None:
    fake_trainer.gate = threading.Event()
    h = auth(services, "ann")
    upload(client, h, start=False)
    first = client.post("/api/training/start", headers=h, json={"dataset_id": None})
    assert first.status_code == 202
    second = client.post("/api/training/start", headers=h, json={})
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "training_in_progress"
    third = client.post("/api/training/upload-zip", headers=h,
                        files={"file": ("p.zip", photo_zip(3, offset=10), "application/zip")})
    assert third.status_code == 409
    fake_trainer.gate.set()
    done = wait_terminal(client, h, first.json()["training"]["id"])
    assert done["training"]["status"] == "succeeded"


def test_failed_training_keeps_active_version_and_says_why(
    client: TestClient, services: Services, fake_trainer: FakeTrainer
) -> None:
    h = auth(services, "ann")
    v1 = wait_terminal(client, h, upload(client, h)["training"]["id"])["model"]["active_version"]
    fake_trainer.outcomes.append("failed")
    body = client.post("/api/training/start", headers=h, json={}).json()
    done = wait_terminal(client, h, body["training"]["id"])
    assert done["training"]["status"] == "failed"
    assert "Try again" in done["training"]["error"]
    assert done["model"]["active_version"]["id"] == v1["id"]
    fake_trainer.outcomes.append("canceled")
    body = client.post("/api/training/start", headers=h, json={}).json()
    done = wait_terminal(client, h, body["training"]["id"])
    assert done["training"]["status"] == "canceled"
    assert done["training"]["error"]
    assert done["model"]["active_version"]["id"] == v1["id"]


def test_cancel_a_running_training(
    client: TestClient, services: Services, fake_trainer: FakeTrainer
) -> None:
    fake_trainer.gate = threading.Event()
    h = auth(services, "ann")
    tid = upload(client, h)["training"]["id"]
    # Who runs it shows in its progress: the worker, its attempt, its heartbeat.
    deadline = time.monotonic() + 30
    while (t := client.get("/api/training/progress", headers=h).json()["training"])[
            "lease_owner"] is None:
        assert time.monotonic() < deadline, t
        time.sleep(0.02)
    assert t["attempt"] == 1
    assert t["recoveries"] == 0
    assert t["lease_owner"].endswith("/w0")
    assert t["heartbeat_at"] is not None
    assert t["lease_expires_at"] > t["heartbeat_at"]
    r = client.post("/api/training/cancel", headers=h, json={"training_id": tid})
    assert r.status_code == 200
    assert r.json()["training"]["cancel_requested"] is True
    done = wait_terminal(client, h, tid)
    assert done["training"]["lease_owner"] is None  # an ended training is held by nobody
    assert done["training"]["status"] == "canceled"
    assert done["model"]["active_version"] is None


def test_patch_scale_validation_and_rollback(client: TestClient,
                                             ann_retrained: Trained) -> None:
    h, v2 = ann_retrained.headers, ann_retrained.done
    assert v2["model"]["active_version"]["number"] == 2
    for bad in ({"lora_scale": "x"}, {"lora_scale": 99}, {}):
        r = client.patch("/api/model", headers=h, json=bad)
        assert r.status_code == 422, bad
    r = client.patch("/api/model", headers=h, json={"lora_scale": 0.7})
    assert r.json()["lora_scale"] == 0.7
    assert r.json()["lora_scale_is_custom"] is True
    versions = client.get("/api/model/versions", headers=h).json()["versions"]
    assert [v["number"] for v in versions] == [2, 1]
    # Each version records every value of the recipe its training used, as that training did.
    latest = client.get("/api/training/progress", headers=h).json()["training"]
    assert latest["id"] == versions[0]["training_id"]
    # The README writes the route `?training_id=`: empty, it is the default (it answered 404).
    empty = client.get("/api/training/progress?training_id=", headers=h)
    assert empty.status_code == 200, empty.text
    assert empty.json()["training"]["id"] == latest["id"]
    assert versions[0]["recipe"] == {**versions[0]["recipe"], **latest["recipe"]}
    assert {"timestep_sampling", "lora_targets", "face_loss_weight"} <= set(versions[0]["recipe"])
    r = client.post(f"/api/model/versions/{versions[1]['id']}/activate", headers=h)
    assert r.status_code == 200
    assert r.json()["active_version"]["number"] == 1
    assert r.json()["lora_scale"] == 0.7
    gen = client.post("/api/generate", headers=h, json={"prompt": "x"}).json()["generation"]
    assert gen["version_id"] == versions[1]["id"]
    assert gen["lora_scale"] == 0.7


def test_activating_the_active_version_changes_and_logs_nothing(
        client: TestClient, services: Services, ann_trained: Trained) -> None:
    """Each activation of the version already active wrote another version_activated event: a
    client retrying after a lost answer filled the model's log. As a re-pin to the same version,
    it now changes and logs nothing, and answers as before."""
    h = ann_trained.headers
    v1 = client.get("/api/model", headers=h).json()["active_version"]
    before = client.get("/api/model/log", headers=h).json()["events"]
    answers = [client.post(f"/api/model/versions/{ref}/activate", headers=h)
               for ref in (v1["id"], "v1", "1", "1%20")]
    assert [r.status_code for r in answers] == [200] * 4, answers[-1].text
    assert all(r.json() == answers[0].json() for r in answers)
    assert answers[0].json()["active_version"]["id"] == v1["id"]
    assert client.get("/api/model/log", headers=h).json()["events"] == before


def fail_on(monkeypatch: pytest.MonkeyPatch, method: str, *, kind: str | None = None) -> None:
    """The repository's ``method`` (for an event: of ``kind``) fails, as the database failing
    that write or the process dying there would: nothing after it runs. (A ``SimulatedCrash``
    cannot cross the test client.)"""
    real = getattr(SqlRepository, method)

    def failing(self: SqlRepository, *args: Any, **kwargs: Any) -> Any:
        if kind is None or kwargs.get("kind") == kind:
            raise StorageError(f"the database failed {method}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SqlRepository, method, failing)


def changes_logged(client: TestClient, h: dict[str, str]) -> list[dict[str, Any]]:
    return [e for e in client.get("/api/model/log", headers=h).json()["events"]
            if e["kind"] in ("lora_scale_set", "trainer_version_changed")]


def test_a_null_lora_scale_gives_the_model_back_the_default_scale(
        client: TestClient, services: Services) -> None:
    """Once set, a scale stayed custom for ever: {"lora_scale": null} answered 422 empty_patch
    "nothing to change: send lora_scale or trainer_version" (the user had sent lora_scale), and
    nothing turned custom off. Null is now the default scale, logged, and custom no more."""
    h = auth(services, "ann")
    upload(client, h, start=False)
    assert client.patch("/api/model", headers=h, json={"lora_scale": 0.8}).status_code == 200
    for _ in range(2):  # sent again, it changes and logs nothing
        r = client.patch("/api/model", headers=h, json={"lora_scale": None})
        assert r.status_code == 200, r.text
        assert (r.json()["lora_scale"], r.json()["lora_scale_is_custom"]) == (1.0, False)
    reset = [e for e in client.get("/api/model/log", headers=h).json()["events"]
             if e["kind"] == "lora_scale_reset"]
    assert [(e["data"]["from"], e["data"]["to"]) for e in reset] == [(0.8, 1.0)]
    empty = client.patch("/api/model", headers=h, json={})
    assert empty.status_code == 422
    assert empty.json()["error"]["message"] == (
        "nothing to change: send lora_scale (a number, or null for the default) or "
        "trainer_version")


# Old code: the scale was committed, then its event in a transaction of its own: a crash (or a
# failed write) between them left a changed scale that the audit log never showed.
def test_a_scale_change_and_its_event_are_committed_together(
        client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    h = auth(services, "ann")
    upload(client, h, start=False)  # makes the model
    with monkeypatch.context() as failing:
        fail_on(failing, "add_event", kind="lora_scale_set")
        r = client.patch("/api/model", headers=h, json={"lora_scale": 0.7})
        assert r.status_code >= 500
    model = client.get("/api/model", headers=h).json()
    assert (model["lora_scale"], model["lora_scale_is_custom"]) == (1.0, False)
    assert changes_logged(client, h) == []
    assert client.patch("/api/model", headers=h, json={"lora_scale": 0.7}).status_code == 200
    assert [e["data"] for e in changes_logged(client, h)] == [{"from": 1.0, "to": 0.7}]


# Old code: the re-pin was committed with its event, then the scale in another transaction: a
# crash between them applied half the PATCH, and sending it again logged a re-pin "from X to X".
def test_a_patch_of_the_trainer_version_and_the_scale_is_applied_whole_or_not_at_all(
        client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    h = auth(services, "ann")
    upload(client, h, start=False)
    pinned = client.get("/api/model", headers=h).json()["trainer_version"]
    patch = {"trainer_version": "local-tiny-v1", "reason": "back to v1", "lora_scale": 0.6}
    with monkeypatch.context() as failing:
        fail_on(failing, "set_model_lora_scale")
        assert client.patch("/api/model", headers=h, json=patch).status_code >= 500
    model = client.get("/api/model", headers=h).json()
    assert (model["trainer_version"], model["lora_scale"]) == (pinned, 1.0)
    assert changes_logged(client, h) == []
    for _sent in range(2):  # the second time: its answer was lost, the client sends it again
        r = client.patch("/api/model", headers=h, json=patch)
        assert r.status_code == 200, r.text
        assert (r.json()["trainer_version"], r.json()["lora_scale"]) == ("local-tiny-v1", 0.6)
    assert [(e["kind"], e["data"]["from"], e["data"]["to"]) for e in changes_logged(client, h)
            ] == [("trainer_version_changed", pinned, "local-tiny-v1"),
                  ("lora_scale_set", 1.0, 0.6), ("lora_scale_set", 0.6, 0.6)]


def test_an_explicit_repin_to_the_version_shown_before_the_first_training_is_kept(
        tmp_path: Path) -> None:
    """The model showed local-tiny-v2 (configured at its upload); the operator then moved the
    default to local-tiny-v1, and its user explicitly re-pinned it to local-tiny-v2: 200, but
    nothing was recorded (the version was the one stored), so the first training took the
    configured local-tiny-v1 and the user's choice was lost without a word."""
    with serving(make_settings(tmp_path, trainer_version="local-tiny-v2")) as (client, svc):
        h = auth(svc, "ann")
        assert upload(client, h, start=False)["model"]["trainer_version"] == "local-tiny-v2"
    with serving(make_settings(tmp_path, trainer_version="local-tiny-v1")) as (client, svc):
        for _sent in range(2):  # sent again (its answer lost): recorded once
            r = client.patch("/api/model", headers=h, json={
                "trainer_version": "local-tiny-v2", "reason": "I want v2, keep it"})
            assert r.status_code == 200, r.text
            assert (r.json()["trainer_version"], r.json()["pin_fixed"]) == (
                "local-tiny-v2", True)
        assert [(e["kind"], e["data"]["to"], e["data"]["reason"])
                for e in changes_logged(client, h)] == [
            ("trainer_version_changed", "local-tiny-v2", "I want v2, keep it")]
        r = client.post("/api/training/start", headers=h, json={"dataset_id": None})
        assert r.status_code == 202, r.text
        assert r.json()["training"]["trainer_version"] == "local-tiny-v2"
        assert r.json()["model"]["trainer_version"] == "local-tiny-v2"


def test_the_models_pin_before_its_first_training_is_the_one_that_training_takes(
        tmp_path: Path) -> None:
    """Made under local-tiny-v2 (an upload that started nothing), served with local-tiny-v1:
    the model page showed local-tiny-v1, which the first training took, but GET /api/model
    (and the start's answer before it) said local-tiny-v2, the upload's row. The API now shows
    the page's pin, with ``pin_fixed`` false until the first training fixes it."""
    with serving(make_settings(tmp_path, trainer_version="local-tiny-v2")) as (client, svc):
        user, key = svc.users.create(name="ann")
        h = {"Authorization": f"Bearer {key}"}
        made = upload(client, h, start=False)["model"]
        assert (made["trainer_version"], made["pin_fixed"]) == ("local-tiny-v2", False)
    with serving(make_settings(tmp_path, trainer_version="local-tiny-v1")) as (client, svc):
        model = client.get("/api/model", headers=h).json()
        page = svc.training.next_pin(user=user)  # what the model page shows
        assert page is not None
        assert not page.fixed
        assert page.model.trainer_version == "local-tiny-v1"
        assert (model["backend"], model["destination"], model["trainer_version"],
                model["pin_fixed"]) == (page.model.backend, page.model.destination,
                                        "local-tiny-v1", False)
        r = client.post("/api/training/start", headers=h, json={"dataset_id": None})
        assert r.status_code == 202, r.text
        assert r.json()["training"]["trainer_version"] == "local-tiny-v1"
        assert (r.json()["model"]["trainer_version"], r.json()["model"]["pin_fixed"]) == (
            "local-tiny-v1", True)
    # Trained: the pin is fixed, whatever the configuration says now.
    with serving(make_settings(tmp_path, trainer_version="local-tiny-v2")) as (client, svc):
        model = client.get("/api/model", headers=h).json()
        assert (model["trainer_version"], model["pin_fixed"]) == ("local-tiny-v1", True)
    schema = client.app.openapi()["components"]["schemas"]  # type: ignore[attr-defined]
    assert "pin_fixed" in schema["ModelAnswer"]["required"]


def test_a_repin_before_the_first_training_follows_the_configured_backend(
        tmp_path: Path) -> None:
    """Made under the local backend (an upload that started nothing), served with Replicate:
    the model page showed the Replicate default version, but a PATCH to it answered 422 "not a
    local trainer version" (checked against the upload's row), and a PATCH back to the upload's
    local-tiny-v2 was recorded as the user's pin, so the first training went to the local
    backend on a server configured for Replicate. The re-pin is now relative to the pin the
    first training would take: the version shown is kept with its backend and destination,
    and the other backend's version is refused, nothing recorded."""
    with serving(make_settings(tmp_path, trainer_version="local-tiny-v2")) as (client, svc):
        h = auth(svc, "ann")
        assert upload(client, h, start=False)["model"]["backend"] == "local"
    replicate = make_settings(tmp_path, trainer="replicate", replicate_owner="acme",
                              replicate_api_token="r8_dummy")
    with serving(replicate) as (client, svc):
        r = client.patch("/api/model", headers=h, json={
            "trainer_version": "local-tiny-v2", "reason": "the one GET /api/model said"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_trainer_version"
        assert changes_logged(client, h) == []
        # Untouched: still the configured backend's pin, which the first training would take.
        model = client.get("/api/model", headers=h).json()
        assert (model["backend"], model["pin_fixed"]) == ("replicate", False)
        r = client.patch("/api/model", headers=h, json={
            "trainer_version": DEFAULT_REPLICATE_TRAINER_VERSION, "reason": "the one shown"})
        assert r.status_code == 200, r.text
        assert (r.json()["backend"], r.json()["trainer_version"]) == (
            "replicate", DEFAULT_REPLICATE_TRAINER_VERSION)
        assert r.json()["destination"].startswith("acme/")
        assert [(e["data"]["to"], e["data"]["reason"]) for e in changes_logged(client, h)] == [
            (DEFAULT_REPLICATE_TRAINER_VERSION, "the one shown")]
        # Replicate trains at 1024 px: photos whose faces are large enough.
        started = upload(client, h, photo_zip(4, size=1024))
        assert started["training"]["backend"] == "replicate"
        assert started["training"]["trainer_version"] == DEFAULT_REPLICATE_TRAINER_VERSION
        assert started["model"]["destination"] == r.json()["destination"]


def test_a_repinned_models_destination_follows_the_moved_owner_on_every_front(
        tmp_path: Path) -> None:
    """Re-pinned (PATCH trainer_version) under the Replicate owner acme and never trained, then
    served with SELFIE_LORA_REPLICATE_OWNER=acme-studio: the model page and the first training
    took acme-studio/selfie-lora-..., but GET /api/model and a write's answer still said
    acme/selfie-lora-..., the row stored at the upload (the re-pin counted as a fixed pin)."""
    acme = make_settings(tmp_path, trainer="replicate", replicate_owner="acme",
                         replicate_api_token="r8_dummy")
    with serving(acme) as (client, svc):
        user, key = svc.users.create(name="ann")
        h = {"Authorization": f"Bearer {key}"}
        upload(client, h, photo_zip(4, size=1024), start=False)
        r = client.patch("/api/model", headers=h, json={
            "trainer_version": DEFAULT_REPLICATE_TRAINER_VERSION, "reason": "mine"})
        assert r.status_code == 200, r.text
        assert (r.json()["destination"].split("/")[0], r.json()["pin_fixed"]) == ("acme", True)
    moved = make_settings(tmp_path, trainer="replicate", replicate_owner="acme-studio",
                          replicate_api_token="r8_dummy")
    with serving(moved) as (client, svc):
        page = svc.training.next_pin(user=user)  # what the model page shows
        assert page is not None
        destination = page.model.destination
        assert destination.startswith("acme-studio/selfie-lora-")
        model = client.get("/api/model", headers=h).json()
        assert (model["destination"], model["trainer_version"], model["pin_fixed"]) == (
            destination, DEFAULT_REPLICATE_TRAINER_VERSION, True)
        r = client.patch("/api/model", headers=h, json={"lora_scale": 0.7})  # a write's answer
        assert r.status_code == 200, r.text
        assert (r.json()["destination"], r.json()["pin_fixed"]) == (destination, True)
        r = client.post("/api/training/start", headers=h, json={"dataset_id": None})
        assert r.status_code == 202, r.text
        assert r.json()["model"]["destination"] == destination
        assert r.json()["training"]["trainer_version"] == DEFAULT_REPLICATE_TRAINER_VERSION


def test_a_repin_without_a_reason_answers_reason_required_with_the_services_words(
        client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    upload(client, h, start=False)
    pinned = client.get("/api/model", headers=h).json()["trainer_version"]
    for body in ({"trainer_version": "local-tiny-v1"},
                 {"trainer_version": "local-tiny-v1", "reason": ""},
                 {"trainer_version": "local-tiny-v1", "reason": "   "}):
        r = client.patch("/api/model", headers=h, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "reason_required", (body, r.text)
        assert r.json()["error"]["message"] == "say why the trainer version changes (reason)"
    assert client.get("/api/model", headers=h).json()["trainer_version"] == pinned


def test_a_weights_download_resumes_with_a_range_and_answers_head(
        client: TestClient, services: Services, ann_trained: Trained) -> None:
    """curl -C - failed ('HTTP server doesn't seem to support byte ranges'): a Range got 200
    and the whole file, and HEAD got 405. One byte range is now a 206 of those bytes, HEAD the
    headers alone, and the ETag the file's SHA-256 (If-Range of another file: the whole one)."""
    h, done = ann_trained.headers, ann_trained.done
    url = done["model"]["active_version"]["weights_url"]
    whole = client.get(url, headers=h)
    size, sha = len(whole.content), whole.headers["X-Weights-SHA256"]
    assert (whole.headers["Accept-Ranges"], whole.headers["ETag"]) == ("bytes", f'"{sha}"')
    for asked, first, last in (("bytes=100-", 100, size - 1), ("bytes=5-9", 5, 9),
                               ("bytes=-7", size - 7, size - 1), ("bytes=0-99999999", 0, size - 1)):
        part = client.get(url, headers={**h, "Range": asked})
        assert part.status_code == 206, (asked, part.text)
        assert part.content == whole.content[first:last + 1]
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert part.headers["Content-Length"] == str(last - first + 1)
    beyond = client.get(url, headers={**h, "Range": f"bytes={size}-"})
    assert (beyond.status_code, beyond.headers["Content-Range"]) == (416, f"bytes */{size}")
    other = client.get(url, headers={**h, "Range": "bytes=100-", "If-Range": '"other"'})
    assert (other.status_code, other.content) == (200, whole.content)
    head = client.head(url, headers=h)
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert (head.headers["Content-Length"], head.headers["ETag"]) == (str(size), f'"{sha}"')


def test_a_weights_range_with_a_very_long_number_is_read_as_past_the_end_not_a_500(
        client: TestClient, services: Services, ann_trained: Trained) -> None:
    """A Range whose number had over 4300 digits was a 500 internal_error: int() refuses such
    a string (found in review; a request's headers may be 16 KiB). A number longer than the
    file's size is past its end: a start there is 416, a last byte the file's end, a suffix
    the whole file, as the same header with 30 nines was already answered."""
    h = ann_trained.headers
    url = ann_trained.done["model"]["active_version"]["weights_url"]
    whole = client.get(url, headers=h).content
    size = len(whole)
    for nines in ("9" * 30, "9" * 5000, "0" * 5000 + "9" * 30):
        beyond = client.get(url, headers={**h, "Range": f"bytes={nines}-"})
        assert (beyond.status_code, beyond.headers.get("Content-Range")) == (
            416, f"bytes */{size}"), beyond.text[:200]  # old code (5000 nines): 500
        for asked in (f"bytes=-{nines}", f"bytes=0-{nines}"):
            part = client.get(url, headers={**h, "Range": asked})
            assert (part.status_code, part.headers.get("Content-Range")) == (
                206, f"bytes 0-{size - 1}/{size}"), part.text[:200]
            assert part.content == whole


def test_a_weights_download_the_client_holds_is_a_304(client: TestClient,
                                                       services: Services,
                                                       ann_trained: Trained) -> None:
    """The download sent an ETag but ignored If-None-Match: a client holding the file (a
    browser, a sync script) fetched the whole LoRA again (found in review). Now an
    If-None-Match naming it (weakly, in a list, or *) is a 304 with the ETag and no body,
    before any Range (RFC 9110 13.2.2); another tag: the file, or the range asked."""
    h, done = ann_trained.headers, ann_trained.done
    url = done["model"]["active_version"]["weights_url"]
    whole = client.get(url, headers=h)
    etag = whole.headers["ETag"]
    for held in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        for extra in ({}, {"Range": "bytes=5-9"}, {"Range": "bytes=5-9", "If-Range": etag}):
            r = client.get(url, headers={**h, "If-None-Match": held, **extra})
            assert r.status_code == 304, (held, extra)  # old code: 200 (or 206), the bytes
            assert r.content == b""
            assert (r.headers["ETag"], r.headers["Cache-Control"]) == (etag, "private")
        assert client.head(url, headers={**h, "If-None-Match": held}).status_code == 304
    other = client.get(url, headers={**h, "If-None-Match": '"other"'})
    assert (other.status_code, other.content) == (200, whole.content)
    part = client.get(url, headers={**h, "If-None-Match": '"other"', "Range": "bytes=5-9",
                                    "If-Range": etag})
    assert (part.status_code, part.content) == (206, whole.content[5:10])


def test_a_generation_picture_whose_file_is_gone_is_a_404_not_a_500(
        client: TestClient, services: Services, ann_trained: Trained) -> None:
    """The picture's file is gone from the storage (a restore without the blobs): its URL
    answered 500 storage_error "please retry in a moment", and every retry the same."""
    h = ann_trained.headers
    gen = client.post("/api/generate", headers=h, json={"prompt": "x", "num_outputs": 2}
                      ).json()["generation"]
    (stored,) = services.generation.history(user=services.users.get_by_name(name="ann"))
    services.blobs.delete(stored.image_keys[1])
    r = client.get(gen["images"][1], headers=h)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == {
        "code": "not_found", "details": [],
        "message": "picture 1 of this generation is no longer stored; generate it again to "
                   "have it"}
    assert client.get(gen["images"][0], headers=h).status_code == 200


def test_a_picture_read_while_its_generation_is_deleted_is_a_404_without_an_error_logged(
        client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A read of a picture racing a Delete of its generation (the gallery's image loading while
    its Delete button is pressed in another tab): the read found the row, the Delete then took
    the row and the file, and the read logged an ERROR "picture 0 is missing from the storage"
    for the operator to hunt. Now the read finds the row gone and answers the same 404 as a
    read after the Delete, with nothing logged at ERROR."""
    h = auth(services, "ann")
    wait_terminal(client, h, upload(client, h)["training"]["id"])
    gen = client.post("/api/generate", headers=h, json={"prompt": "x"}).json()["generation"]
    ann = services.users.get_by_name(name="ann")
    blobs = services.generation._blobs
    read = blobs.get

    def deleted_meanwhile(key: str) -> bytes:
        services.generation.delete(user=ann, generation_id=gen["id"])  # the other tab's Delete
        return read(key)

    monkeypatch.setattr(blobs, "get", deleted_meanwhile)
    with caplog.at_level(logging.INFO):
        r = client.get(gen["images"][0], headers=h)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == {"code": "not_found", "message": "no such image", "details": []}
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []
    monkeypatch.undo()
    after = client.get(gen["images"][0], headers=h)  # the answer of a read after the Delete
    assert (after.status_code, after.json()) == (r.status_code, r.json())


def test_a_version_named_by_a_json_number_generates_with_that_version(
        client: TestClient, services: Services, ann_retrained: Trained) -> None:
    """The README names a version "by its number as `2` or `v2`": {"version_id": 1} answered
    422 invalid_request "Input should be a valid string". A JSON true is still no number."""
    h = ann_retrained.headers
    v2, v1 = client.get("/api/model/versions", headers=h).json()["versions"]
    for named, version in ((1, v1), (2, v2), ("1", v1), ("v2", v2)):
        r = client.post("/api/generate", headers=h, json={"prompt": "x", "version_id": named})
        assert r.status_code == 200, r.text
        assert r.json()["generation"]["version_id"] == version["id"]
    for wrong, status in ((True, 422), (0, 422), (1.0, 422), (3, 404)):
        r = client.post("/api/generate", headers=h, json={"prompt": "x", "version_id": wrong})
        assert r.status_code == status, (wrong, r.text)


def test_a_version_whose_weights_are_missing_is_refused_not_a_500(
        client: TestClient, services: Services, fake_generator: FakeGenerator,
        ann_retrained: Trained) -> None:
    # The weights file of a version is gone from the storage (lost, restored from an older
    # backup). Generating with it was a 500 storage_error on every request, and activating
    # such a version was accepted and made every generation one.
    h = ann_retrained.headers
    v2, v1 = client.get("/api/model/versions", headers=h).json()["versions"]
    assert client.get("/api/model", headers=h).json()["active_version"]["number"] == 2
    services.blobs.delete(services.repo.get_version(v2["id"]).weights_key)
    jobs = len(fake_generator.jobs)
    r = client.post("/api/generate", headers=h, json={"prompt": "x"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "weights_missing"
    assert r.json()["error"]["message"] == (
        "version 2's weights are missing from the storage, so it cannot make pictures; "
        "activate another version (or train again)")
    assert len(fake_generator.jobs) == jobs
    assert services.generation.history(user=services.users.get_by_name(name="ann")) == []
    # Another version still generates; the one without its weights cannot be made active.
    assert client.post(f"/api/model/versions/{v1['id']}/activate", headers=h).status_code == 200
    assert client.post("/api/generate", headers=h, json={"prompt": "x"}).status_code == 200
    model_id = services.repo.get_version(v1["id"]).model_id
    events = len(services.repo.list_events(model_id))
    r = client.post(f"/api/model/versions/{v2['id']}/activate", headers=h)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "weights_missing"
    assert "version 2's weights are missing" in r.json()["error"]["message"]
    assert client.get("/api/model", headers=h).json()["active_version"]["number"] == 1
    assert len(services.repo.list_events(model_id)) == events  # nothing recorded
    assert "override" not in services.repo.get_version(v2["id"]).gate_details


# What an S3 store and the local generator said of a failure: the server's paths, the endpoint.
LEAKY_WORDS = ("/srv/selfie/blobs/weights/0f.safetensors",
               "http://minio.internal:9000/selfie-prod/weights/0f.safetensors")


@pytest.mark.parametrize(("error", "status", "code", "sentence"), [
    (StorageError(f"cannot load LoRA weights {LEAKY_WORDS[0]}: Error performing GET "
                  f"{LEAKY_WORDS[1]} - HTTP error"), 500, "storage_error",
     "the files or records could not be read or written just now; please retry in a moment"),
    # Old code: that same 500 storage_error, whose "retry in a moment" does not help.
    (StorageFullError(f"the blob cache cannot hold {LEAKY_WORDS[1]} at {LEAKY_WORDS[0]}: the "
                      "disk holding it is full (0 KB free): No space left on device"),
     507, "storage_full", "the server's disk is full, so this could not be saved; nothing is "
     "wrong with your request: please tell the operator, and try again once they have freed "
     "space"),
    # Old code: the same "the server's disk is full ... once they have freed space" for a quota
    # used up (EDQUOT), where the disk may have room and freeing space need not help.
    (StorageFullError(f"the blob cache cannot hold {LEAKY_WORDS[1]} at {LEAKY_WORDS[0]}: the "
                      "quota of this account on the disk holding it is used up (the disk itself "
                      "has 2.0 GB free): Disk quota exceeded", quota=True),
     507, "storage_full", "a disk quota of the server is used up, so this could not be saved; "
     "nothing is wrong with your request: please tell the operator, and try again once they "
     "have raised the quota or deleted files it counts"),
    (GenerationError(f"local generation failed: RuntimeError: {LEAKY_WORDS[0]}",
                     details=[LEAKY_WORDS[1]]), 502, "generation_failed",
     "the pictures could not be made; please retry, or change the prompt"),
    (RuntimeError(f"a bug near {LEAKY_WORDS[0]} {LEAKY_WORDS[1]}"), 500, "internal_error",
     "something went wrong on our side; please retry"),
])
def test_a_server_side_error_tells_the_client_a_sentence_and_the_log_the_detail(
        client: TestClient, services: Services, fake_generator: FakeGenerator,
        caplog: pytest.LogCaptureFixture, error: Exception, status: int, code: str,
        sentence: str, ann_trained: Trained) -> None:
    """A 5xx answered the error's own words: the server's paths and the S3 endpoint's request
    URL (found in review). The client gets the code, a fixed sentence and a reference; the log
    has the words at error level under that reference."""
    h = ann_trained.headers
    fake_generator.fail_with = error
    with caplog.at_level(logging.ERROR):
        r = client.post("/api/generate", headers=h, json={"prompt": "x"})
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code
    assert body["message"] == sentence
    [detail] = body["details"]
    reference = detail["reference"]
    for words in LEAKY_WORDS:
        assert words not in r.text
    logged = [rec for rec in caplog.records
              if rec.levelno == logging.ERROR and reference in rec.getMessage()]
    assert len(logged) == 1
    assert all(words in logged[0].getMessage() + caplog.text for words in LEAKY_WORDS)
    assert "POST /api/generate" in logged[0].getMessage()


@pytest.mark.parametrize("error", [
    GENERATOR_FAILURES.off_host(
        f"could not download the image: {LEAKY_WORDS[1]} is not https://replicate.delivery",
        "Could not download the image: Replicate's output points outside Replicate's file "
        "hosts, and this service downloads from nowhere else."),
    GENERATOR_FAILURES.too_large(
        f"{LEAKY_WORDS[1]} is over 50000000 bytes",
        "Replicate's output is larger than this service accepts."),
    GenerationError("Generating the images failed on Replicate: NSFW content detected. Try "
                    "again, or change the prompt.",
                    user_message="Generating the images failed on Replicate: NSFW content "
                                 "detected. Try again, or change the prompt.",
                    details=[LEAKY_WORDS[1]]),
])
def test_a_generation_failure_written_for_the_user_is_answered_as_it_is(
        client: TestClient, services: Services, fake_generator: FakeGenerator,
        error: GenerationError, ann_trained: Trained) -> None:
    """Every 5xx answered "please retry, or change the prompt": for an output off Replicate's
    hosts or over the size cap no retry ever helps, and the model's own reason was lost."""
    h = ann_trained.headers
    fake_generator.fail_with = error
    r = client.post("/api/generate", headers=h, json={"prompt": "x"})
    assert r.status_code == 502, r.text
    body = r.json()["error"]
    assert body["code"] == "generation_failed"
    assert body["message"] == error.user_message
    assert "reference" in body["details"][0]
    for words in LEAKY_WORDS:
        assert words not in r.text
    # Replicate out of reach: retrying is the advice, the fixed sentence stays.
    fake_generator.fail_with = GENERATOR_FAILURES.unavailable(
        f"could not start generating: {LEAKY_WORDS[1]}", "Replicate cannot be reached.")
    r = client.post("/api/generate", headers=h, json={"prompt": "x"})
    assert r.json()["error"]["message"] == ("the pictures could not be made; please retry, or "
                                            "change the prompt")


def within(seconds: float, call: Callable[[], T]) -> T | None:
    """``call``'s result if it comes within ``seconds`` (it runs on in a thread otherwise)."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    return results[0] if results else None


def test_a_user_s_generations_are_limited_and_never_hold_other_routes_threads(
        client: TestClient, services: Services, fake_generator: FakeGenerator,
    ann_trained: Trained
) -> None:
    """Each queued generation held one of the threads every sync route shares (anyio's 40)
    while it waited for the one pipeline, with no limit per user: Ann's 45 made Carol's GET
    /api/model/versions take 11 s (found in review). A user now has at most
    SELFIE_LORA_MAX_GENERATIONS_PER_USER (2) in flight, a third is a 429 at once, and
    generations run on the generation service's own threads. The shared pool is cut to 2
    threads here: generations holding it would leave none for Carol."""
    import anyio.to_thread

    ann = ann_trained.headers
    carol = auth(services, "carol")
    assert client.get("/api/model", headers=ann).json()["active_version"] is not None

    def shrink_pool() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2

    assert client.portal is not None
    client.portal.call(shrink_pool)
    answers: list[int] = []

    def generate() -> None:
        answers.append(client.post("/api/generate", headers=ann,
                                   json={"prompt": "x"}).status_code)

    with held_generations(fake_generator, generate):
        third = within(5, lambda: client.post("/api/generate", headers=ann,
                                              json={"prompt": "x"}))
        assert third is not None, "the third generation waited, not refused"
        assert third.status_code == 429, third.text
        error = third.json()["error"]
        assert error["code"] == "too_many_generations"
        assert error["message"].startswith("you already have 2 generations in progress")
        assert int(third.headers["Retry-After"]) >= 1
        assert error["details"] == [{"retry_after": int(third.headers["Retry-After"])}]
        # Carol's sync route gets a thread of the shared pool while Ann's two wait.
        started = time.monotonic()
        versions = within(5, lambda: client.get("/api/model/versions", headers=carol))
        assert versions is not None, "Carol's GET waited behind Ann's generations"
        assert versions.status_code == 200
        assert time.monotonic() - started < 2
        assert fake_generator.waiting == 2
    assert answers == [200, 200]
    # The slots are given back: Ann generates again.
    assert client.post("/api/generate", headers=ann, json={"prompt": "x"}).status_code == 200


def test_an_upload_read_short_of_memory_is_a_503_not_the_user_s_archive(
        client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # zlib's MemoryError while inflating a member was answered 422 bad_archive, "the upload is
    # not a readable zip archive": the user told to fix a file that is fine.
    h = auth(services, "ann")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.writestr(f"photo{i}.jpg", synthetic_photo(i))

    class OutOfMemory:  # CPython's zlib on Z_MEM_ERROR
        eof = False
        unconsumed_tail = b""

        def decompress(self, *_args: object) -> bytes:
            raise MemoryError("Out of memory while decompressing data")

    with monkeypatch.context() as patched:
        patched.setattr(zlib, "decompressobj", lambda *_a: OutOfMemory())
        r = client.post("/api/training/upload-zip", headers=h,
                        files={"file": ("photos.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "server_short_of_memory"
    assert r.json()["error"]["message"] == (
        "the server was short of memory reading the upload; nothing is wrong with it: upload it "
        "again in a few minutes")
    assert client.get("/api/model", headers=h).status_code == 404  # nothing stored
    # The same bytes, the memory back: read and started, nothing remembered of the failure.
    assert upload(client, h, buf.getvalue())["training"]["status"] in ("queued", "running",
                                                                       "succeeded")


def test_generate_before_a_version_is_422(client: TestClient, services: Services,
                                          fake_trainer: FakeTrainer) -> None:
    fake_trainer.gate = threading.Event()
    h = auth(services, "ann")
    upload(client, h)
    r = client.post("/api/generate", headers=h, json={"prompt": "x"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "no_version"
    assert r.json()["error"]["message"].endswith("wait for it to finish")
    fake_trainer.gate.set()


def test_no_version_says_to_train_when_no_training_is_queued_or_running(
        client: TestClient, services: Services, settings: Settings,
        fake_trainer: FakeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    # carol uploaded with start=false: waiting would never help; then erin's training failed.
    import selfie_lora.wiring as wiring
    from selfie_lora import cli

    train_it = ("your model has no trained version yet: train it (the Train page, POST "
                "/api/training/start or selfie-lora train)")
    carol = auth(services, "carol")
    upload(client, carol, start=False)
    r = client.post("/api/generate", headers=carol, json={"prompt": "x"})
    assert r.status_code == 422
    assert r.json()["error"] == {"code": "no_version", "message": train_it, "details": []}
    erin = auth(services, "erin")
    fake_trainer.outcomes.append("failed")
    done = wait_terminal(client, erin, upload(client, erin)["training"]["id"])
    assert done["training"]["status"] == "failed"
    r = client.post("/api/generate", headers=erin, json={"prompt": "x"})
    assert r.json()["error"]["message"] == train_it
    # The CLI prints the service's words.
    real = wiring.build_services
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    monkeypatch.setattr(wiring, "build_services",
                        lambda s, **kw: real(s, **{"trainers": {"local": fake_trainer}, **kw}))
    result = CliRunner().invoke(cli.app, ["generate", "x", "--user", "carol"])
    assert result.exit_code == 1, result.output
    assert train_it in result.output.replace("\n", "")
    assert "wait" not in result.output


def test_no_version_says_to_activate_one_while_versions_exist_whatever_the_trainings_do(
        settings: Settings, services: Services) -> None:
    """Each version held back (the likeness gate) and a retraining queued or running: the old
    message said 'no trained version yet: its training is running; wait for it to finish',
    while activating a version (the Versions page) lets the user generate at once."""
    from selfie_lora.domain.entities import TrainingStatus
    from selfie_lora.services.generation import GenerationRequest

    with TestClient(create_app(settings, services=services, run_worker=True),
                    raise_server_exceptions=False) as c:
        owner = own_model(c, services, "ann")
    # The app and its worker stopped: the trainings added below stay as they are.
    user = services.users.get_by_name(name="ann")
    model = services.repo.get_model_for_user(user.id)
    assert model is not None
    services.repo.set_model_active_version(model.id, None)
    activate = ("your model has no active version: activate one (the Versions page or POST "
                "/api/model/versions/{id}/activate)")

    def said() -> str:
        with pytest.raises(InvalidInputError) as refused:
            services.generation.generate(user=user, request=GenerationRequest(prompt="x"))
        assert refused.value.code == "no_version"
        return refused.value.message

    assert said() == f"{activate} or train again"
    done = services.repo.get_training(owner.training["id"])
    assert done is not None
    retraining = dataclasses.replace(done, id="retraining", status=TrainingStatus.QUEUED,
                                     version_id=None, is_retraining=True)
    services.repo.add_training(retraining)
    assert said() == f"{activate}; a training is queued too"
    services.repo.save_training(dataclasses.replace(retraining,
                                                    status=TrainingStatus.PROCESSING))
    assert said() == f"{activate}; a training is running too"


def test_numbers_are_numbers_not_booleans_nor_strings(client: TestClient, services: Services,
                                                     fake_generator: FakeGenerator) -> None:
    """Pydantic's lax mode took true for 1 (a scale of 1.0, one image) and "0.8" for 0.8; an
    integer where a float is asked for is still a number."""
    h = auth(services, "ann")
    wait_terminal(client, h, upload(client, h)["training"]["id"])
    generated = len(fake_generator.jobs)
    for bad in ({"lora_scale": True}, {"num_outputs": True}, {"seed": True}, {"seed": 2.5},
                {"seed": 2.0}, {"num_outputs": "2"}, {"lora_scale": "0.8"}):
        r = client.post("/api/generate", headers=h, json={"prompt": "x", **bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_request", bad
    for bad in ({"lora_scale": True}, {"lora_scale": False}, {"lora_scale": "0.8"}):
        r = client.patch("/api/model", headers=h, json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_request", bad
    assert len(fake_generator.jobs) == generated  # nothing was generated
    r = client.patch("/api/model", headers=h, json={"lora_scale": 1})
    assert r.status_code == 200, r.text
    assert r.json()["lora_scale"] == 1.0
    r = client.post("/api/generate", headers=h,
                    json={"prompt": "x", "lora_scale": 1, "num_outputs": 2, "seed": 7})
    assert r.status_code == 200, r.text
    assert (r.json()["generation"]["lora_scale"], r.json()["generation"]["seed"]) == (1.0, 7)


def test_unknown_route_and_bad_json_use_error_shape(client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    r = client.get("/api/nope", headers=h)
    assert r.status_code == 404
    assert "error" in r.json()
    r = client.post("/api/generate", headers=h, content=b"{", )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"


def _race_starts(client: TestClient, h: dict[str, str], n: int = 2) -> list[int]:
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def go() -> None:
        barrier.wait()
        codes.append(client.post("/api/training/start", headers=h, json={}).status_code)

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(codes)


def test_concurrent_starts_give_one_training_and_one_409(
    client: TestClient, services: Services, fake_trainer: FakeTrainer
) -> None:
    fake_trainer.gate = threading.Event()
    h = auth(services, "ann")
    # Photos and no model, as a database from before uploads made the model holds: both
    # requests race to create it.
    ann = services.users.get_by_name(name="ann")
    services.intake.ingest_files(user=ann, files=[
        UploadedFile(name=f"p{i}.jpg", data=synthetic_photo(i)) for i in range(4)])
    assert services.repo.get_model_for_user(ann.id) is None
    assert _race_starts(client, h) == [202, 409]
    model = services.repo.get_model_for_user(services.users.get_by_name(name="ann").id)
    assert model is not None
    assert len(services.repo.list_trainings(model.id)) == 1
    fake_trainer.gate.set()
    wait_terminal(client, h, services.repo.list_trainings(model.id)[0].id)
    # Retraining: the model exists; the database slot decides.
    fake_trainer.gate = threading.Event()
    assert _race_starts(client, h, n=3) == [202, 409, 409]
    assert len(services.repo.list_trainings(model.id)) == 2
    fake_trainer.gate.set()


def test_multi_file_upload_trains_like_a_zip(client: TestClient, services: Services) -> None:

    h = auth(services, "ann")
    files = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(3)]
    r = client.post("/api/training/upload", headers=h, files=files)
    assert r.status_code == 202, r.text
    assert r.json()["dataset"]["images_accepted"] == 3
    done = wait_terminal(client, h, r.json()["training"]["id"])
    assert done["training"]["status"] == "succeeded"
    same_name = [("files", ("a.jpg", synthetic_photo(1), "image/jpeg")),
                 ("files", ("A.JPG", synthetic_photo(2), "image/jpeg"))]
    r = client.post("/api/training/upload", headers=h, files=same_name, data={"start": "false"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "duplicate_member"


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of (field, filename or None for none at all, bytes), written by hand:
    httpx leaves out a filename that is empty."""
    boundary = "selfie-lora-test-boundary"
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                 "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_photo_part_with_an_empty_filename_is_named_by_its_place(
    client: TestClient, services: Services,
) -> None:
    """filename="" (curl, a browser's file input): read, and named photo1, photo2..."""
    h = auth(services, "ann")
    big = synthetic_photo(0, size=2200)
    assert len(big) > 1024 * 1024  # over the form parser's limit for a text field
    body, headers = _multipart([("files", "", big), ("files", "", synthetic_photo(1)),
                                ("files", "p.jpg", synthetic_photo(2)), ("start", None, b"false")])
    r = client.post("/api/training/upload", headers={**h, **headers}, content=body)
    assert r.status_code == 202, r.text
    assert r.json()["dataset"]["images_accepted"] == 3
    user = services.users.get_by_name(name="ann")
    stored = services.intake.photos(user=user, dataset_id=r.json()["dataset"]["id"])
    assert sorted(photo.name for photo in stored) == ["p.jpg", "photo1", "photo2"]


def test_names_sent_beside_the_files_are_kept_as_they_are(
    client: TestClient, services: Services,
) -> None:
    """A filename carries a '"' as %22 but a '%' as it is, so a file named '100%22off.jpg' was
    stored as '100"off.jpg' through the API, which had no way to say the name (the web page
    sends a ``names`` field): the API takes the same field, by the same rule."""
    h = auth(services, "ann")
    user = services.users.get_by_name(name="ann")

    def stored(sent: list[str], names: list[str]) -> list[str]:
        files = [("files", (name.replace('"', "%22"), synthetic_photo(i), "image/jpeg"))
                 for i, name in enumerate(sent)]
        r = client.post("/api/training/upload", headers=h, files=files,
                        data={"start": "false", "names": names})
        assert r.status_code == 202, r.text
        photos = services.intake.photos(user=user, dataset_id=r.json()["dataset"]["id"])
        return sorted(photo.name for photo in photos)

    sent = ["100%22off.jpg", 'say "cheese".jpg', "p2.jpg"]
    assert stored(sent, sent) == sorted(sent)
    # Without names, or with names that are not what the filenames say, the filenames are read
    # back (%22 as '"').
    assert stored(sent, []) == sorted(['100"off.jpg', 'say "cheese".jpg', "p2.jpg"])
    assert stored(sent, ["a.jpg", "b.jpg", "c.jpg"]) == sorted(
        ['100"off.jpg', 'say "cheese".jpg', "p2.jpg"])


@pytest.mark.parametrize(("route", "field"), [("upload", "files"), ("upload-zip", "file")])
@pytest.mark.parametrize("size", [150_000, 2_400_000])
def test_a_part_without_a_filename_is_refused_in_words(client: TestClient, services: Services,
                                                       route: str, field: str, size: int) -> None:
    """A part with no filename at all is a text field to the form parser: a 150 KB photo got
    422 "Expected UploadFile, received: <class 'str'>", a 2.4 MB one 400 "Part exceeded maximum
    size of 1024KB"."""
    h = auth(services, "ann")
    body, headers = _multipart([(field, None, b"\xff\xd8\xff" + bytes(size))])
    r = client.post(f"/api/training/{route}", headers={**h, **headers}, content=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert "without a filename" in error["message"]
    assert ("-F file=@selfies.zip" if field == "file" else "-F files=@photo.jpg") in error["message"]


def test_canceling_a_queued_training_ends_it_at_once_and_logs_it(services: Services) -> None:

    user, _ = services.users.create(name="ann")
    dataset = services.intake.ingest_files(
        user=user, files=[UploadedFile(name="a.jpg", data=synthetic_photo(1))])
    queued = services.training.start(user=user, dataset_id=dataset.id).training
    done = services.training.cancel(user=user, training_id=queued.id)  # no worker runs here
    assert str(done.status) == "canceled"
    assert done.error
    assert "active version is unchanged" in done.error
    kinds = [e["kind"] for e in services.repo.list_events(done.model_id)]
    assert kinds.count("training_canceled") == 1
    services.training.run(queued.id)  # a late worker finds it ended and adds nothing
    again = services.repo.get_training(queued.id)
    assert again is not None
    assert str(again.status) == "canceled"
    assert [e["kind"] for e in services.repo.list_events(done.model_id)].count(
        "training_canceled") == 1


def test_a_cancel_after_the_end_is_answered_as_the_train_page_says_it(
        client: TestClient, services: Services) -> None:
    """The Train page decided by itself whether a Cancel came after the training ended ("The
    training had already ended (succeeded): nothing to cancel."); the API's cancel answered such
    a cancel 200 with the training as it was and said nothing of it. Both now say the service's
    outcome."""
    h = auth(services, "ann")
    tid = upload(client, h)["training"]["id"]
    assert wait_terminal(client, h, tid)["training"]["status"] == "succeeded"
    r = client.post("/api/training/cancel", headers=h, json={"training_id": tid})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["training"]["status"] == "succeeded"
    assert answer["already_ended"] is True
    assert answer["message"] == "The training had already ended (succeeded): nothing to cancel."


def test_a_cancel_says_whether_it_canceled_or_came_after_the_end(services: Services) -> None:
    user, _ = services.users.create(name="ann")
    dataset = services.intake.ingest_files(
        user=user, files=[UploadedFile(name="a.jpg", data=synthetic_photo(1))])
    queued = services.training.start(user=user, dataset_id=dataset.id).training
    first = services.training.cancel_with_outcome(user=user, training_id=queued.id)
    assert (first.already_ended, first.message) == (False, "Training canceled.")
    again = services.training.cancel_with_outcome(user=user, training_id=queued.id)
    assert (again.already_ended, again.message) == (
        True, "The training had already ended (canceled): nothing to cancel.")


def test_reconcile_names_the_training_it_queues_again_in_its_log_lines(
        services: Services, caplog: pytest.LogCaptureFixture) -> None:
    """A queued training whose message was taken by a worker that then died is queued again;
    the line saying so carries its ``training_id``, as every line about a training does (the
    JSON logs of the scale path are searched by it)."""
    from selfie_lora.logs import TrainingIdFilter

    user, _ = services.users.create(name="ann")
    dataset = services.intake.ingest_files(
        user=user, files=[UploadedFile(name="a.jpg", data=synthetic_photo(1))])
    queued = services.training.start(user=user, dataset_id=dataset.id).training
    assert services.queue.next_training() == queued.id  # taken; its worker dies before it runs
    caplog.handler.addFilter(TrainingIdFilter())
    with caplog.at_level(logging.INFO, logger="selfie_lora.services.training"):
        report = services.training.reconcile()
    assert report.enqueued == (queued.id,)
    lines = [r for r in caplog.records if "has nobody running it" in r.getMessage()]
    assert len(lines) == 1
    assert getattr(lines[0], "training_id", None) == queued.id
    assert services.queue.queued_training_ids() == {queued.id}


def test_a_heartbeat_that_finds_its_lease_lost_names_the_training(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The heartbeat runs in a thread of its own, which starts with an empty logging context:
    its lines must still carry the training's id."""
    from selfie_lora.logs import TrainingIdFilter

    settings = make_settings(tmp_path, heartbeat_seconds=0.02, lease_seconds=60)
    with serving(settings) as (_client, svc):  # no worker: nobody else touches the training
        user, _ = svc.users.create(name="ann")
        dataset = svc.intake.ingest_files(
            user=user, files=[UploadedFile(name="a.jpg", data=synthetic_photo(1))])
        queued = svc.training.start(user=user, dataset_id=dataset.id).training
        held = svc.training._claim(queued.id, owner="worker-a", stopping=threading.Event())
        assert held is not None
        held.attempt += 1  # as if another worker had taken it: the next renewal is refused
        caplog.handler.addFilter(TrainingIdFilter())
        with caplog.at_level(logging.WARNING, logger="selfie_lora.services.training"), \
                held.heartbeat():
            assert held.lost.wait(5)
    lines = [r for r in caplog.records if "lease lost" in r.getMessage()]
    assert len(lines) == 1
    assert getattr(lines[0], "training_id", None) == queued.id


def test_version_id_is_set_on_success_and_a_stored_version_shows_as_stored_version_id(
        client: TestClient, services: Services, fake_generator: FakeGenerator) -> None:
    """The contract: a training's ``version_id`` is set on success. Its version is stored before
    (scored then), and kept on a training canceled while scored: ``stored_version_id``."""
    h = auth(services, "ann")
    fake_generator.gate = threading.Event()  # the likeness probes wait: the training stays scoring
    try:
        training_id = upload(client, h)["training"]["id"]
        deadline = time.monotonic() + 30
        while (t := client.get("/api/training/progress", headers=h).json()["training"])[
                "phase"] != "scoring":
            assert time.monotonic() < deadline, t
            time.sleep(0.05)
        assert t["status"] == "processing"
        assert t["version_id"] is None
        assert t["stored_version_id"] is not None
        stored = t["stored_version_id"]
        r = client.post("/api/training/cancel", headers=h, json={"training_id": training_id})
        assert r.status_code == 200, r.text
    finally:
        fake_generator.gate.set()
    canceled = wait_terminal(client, h, training_id)["training"]
    assert canceled["status"] == "canceled"
    assert (canceled["version_id"], canceled["stored_version_id"]) == (None, stored)
    fake_generator.gate = None

    done = wait_terminal(client, h, upload(client, h)["training"]["id"])["training"]
    assert done["status"] == "succeeded"
    assert done["version_id"] == done["stored_version_id"] is not None


def test_a_database_down_while_the_key_is_checked_is_answered_as_a_route_s_storage_error(
        settings: Settings, services: Services, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The key is checked by the guard, outside FastAPI's handlers: with the database down every
    request with a key was answered 500 ``internal_error`` and its StorageError went on up to
    uvicorn, which logged its ~180-line traceback each time (found in review: a PostgreSQL
    outage). It is answered as a route's own StorageError is, with one log line."""
    h = auth(services, "ann")  # a key this process has not seen valid: it is looked up
    fail_on(monkeypatch, "get_user_by_key_hash")
    # Raising: an error that escapes the app's handlers fails the request here.
    with TestClient(create_app(settings, services=services)) as client, \
            caplog.at_level(logging.ERROR):
        r = client.get("/api/training/progress", headers=h)
    assert r.status_code == 500, r.text
    body = r.json()["error"]
    assert body["code"] == "storage_error"
    assert body["message"] == ("the files or records could not be read or written just now; "
                               "please retry in a moment")
    [detail] = body["details"]
    logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(logged) == 1
    assert detail["reference"] in logged[0].getMessage()
    assert "GET /api/training/progress: storage_error" in logged[0].getMessage()


def test_the_apis_pictures_are_not_sniffed_nor_shared_by_caches(
        client: TestClient, services: Services) -> None:
    """A generated picture (and a probe image, a sample, a chart, a grid) came with no
    X-Content-Type-Options and, but for samples, no Cache-Control, where the web pages' copies
    send both: a browser could sniff it as another type, a shared cache could keep one user's
    picture (sec review hardening 4). Now each binary answer of the API is nosniff and
    private."""
    owner = own_model(client, services, "ann")
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": "on a beach"})
    assert r.status_code == 200, r.text
    image = client.get(r.json()["generation"]["images"][0], headers=owner.headers)
    assert image.status_code == 200
    assert image.headers.get("x-content-type-options") == "nosniff"  # old code: None
    assert image.headers.get("cache-control") == "private"


def test_a_replicate_model_on_a_server_without_replicate_access_is_a_502_that_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No REPLICATE_API_TOKEN (so no Replicate generator) on the server a Replicate-trained model
    generates on: 500 config_error "this service is not set up for that yet", where the local backend's
    misconfiguration (a device or base model that does not load) answers 502 generation_failed
    "contact the operator". Now the same: 502, the same family, saying what to do; the log tells
    the operator the setting."""
    settings = make_settings(tmp_path, trainer="replicate", replicate_owner="acme",
                             quality_gate=False)
    svc = build_services(settings, trainers={"replicate": FakeTrainer(backend="replicate")},
                         face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})  # none for replicate
    try:
        with TestClient(create_app(settings, services=svc, run_worker=True)) as client:
            h = auth(svc, "ann")
            first = upload(client, h, photo_zip(4, size=1024))
            done = wait_terminal(client, h, first["training"]["id"])
            assert done["training"]["status"] == "succeeded", done["training"]
            with caplog.at_level(logging.ERROR):
                r = client.post("/api/generate", headers=h, json={"prompt": "x", "seed": 1})
    finally:
        svc.close()
    assert r.status_code == 502, r.text  # old code: 500 config_error
    error = r.json()["error"]
    assert error["code"] == "generation_failed"
    assert "contact the operator" in error["message"]
    assert "Replicate" in error["message"]
    assert "REPLICATE_API_TOKEN" in caplog.text  # the operator's line names the setting
