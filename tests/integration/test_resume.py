"""Resuming trainings through the service: a training whose worker died continues from the
checkpoint in the blob store on another worker (the real tiny FLUX, inline) and ends with the full
step count, one version and the LoRA of a run never stopped; a canceled training keeps its
checkpoint and resumes, as a new training, through the service, ``POST /api/training/resume`` and
``selfie-lora resume``.

The steps at which trainings stop are drawn from a seed; try others with
``SELFIE_LORA_CHECKPOINT_SEED=<n>`` (a failure prints the seed it ran with).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora.api.app import create_app
from selfie_lora.cli import app as cli_app
from selfie_lora.config import Settings
from selfie_lora.domain.entities import Training, TrainingStatus, User
from selfie_lora.errors import ConflictError, StorageError, TrainingCanceledError
from selfie_lora.services.layout import checkpoint_prefix
from selfie_lora.services.ports import ProgressSink, TrainingJob, TrainingResult
from selfie_lora.testing.fakes import FakeGenerator, SimulatedCrash, fake_safetensors
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings, one_person_analyzer
from tests.support.owners import own_model
from tests.support.photos import synthetic_photo
from tests.support.processes import run_killed, services_script

SEED = int(os.environ.get("SELFIE_LORA_CHECKPOINT_SEED", "20261204"))


def _photos() -> list[tuple[str, bytes]]:
    return [(f"p{i}.jpg", synthetic_photo(i)) for i in range(3)]


def _checkpoints(services: Services, training_id: str) -> list[str]:
    return sorted(info.key for info in services.blobs.list(checkpoint_prefix(training_id)))


def _versions_of(services: Services, training: Training) -> list[Any]:
    return [v for v in services.repo.list_versions(training.model_id)
            if v.training_id == training.id]


class _Hooked:
    """A sink that calls ``hook(step)`` after each progress report it forwards."""

    def __init__(self, sink: ProgressSink, hook: Callable[[int], None]) -> None:
        self._sink = sink
        self._hook = hook

    def started(self, *, remote_id: str | None) -> None:
        self._sink.started(remote_id=remote_id)

    def progress(self, *, status: TrainingStatus, step: int, total: int,
                 loss: float | None = None) -> None:
        self._sink.progress(status=status, step=step, total=total, loss=loss)
        self._hook(step)

    def cancel_requested(self) -> bool:
        return self._sink.cancel_requested()

    def interrupted(self) -> bool:
        return self._sink.interrupted()


@dataclass
class Stopping:
    """Wraps a trainer: its first training calls ``hook`` at every reported step (the hook
    kills the worker, or cancels); later trainings run untouched. Records every job."""

    inner: Any
    hook: Callable[[TrainingJob, int], None]
    backend: str = "local"
    jobs: list[TrainingJob] = field(default_factory=list)

    def cancel_remote(self, remote_id: str) -> None:
        del remote_id

    def find_remote(
        self, *, training_id: str, destination: str, marker: str | None = None
    ) -> str | None:
        del training_id, destination, marker
        return None

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        self.jobs.append(job)
        if len(self.jobs) == 1:
            sink = _Hooked(sink, lambda step: self.hook(job, step))
        result: TrainingResult = self.inner.train(job, sink=sink)
        return result


# --------------------------------------------------------------------------- the real tiny FLUX


@pytest.fixture
def tiny(shared_model_cache: Path) -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from selfie_lora.adapters.flux.trainer import LocalTrainer

    return LocalTrainer(base_model="tiny", cache_dir=shared_model_cache, isolation="inline",
                        device="cpu", num_threads=1, progress_interval_s=0.0)


def _services(tmp_path: Path, trainer: Any) -> Services:
    return build_services(make_settings(tmp_path), trainers={"local": trainer},
                          face_analyzer=one_person_analyzer(),
                          generators={"local": FakeGenerator()})


def _same_lora(services: Services, training: Training, inner: Any, job: TrainingJob,
               tmp_path: Path) -> None:
    """The training's version holds the LoRA an uninterrupted run of its job makes."""
    import torch
    from safetensors.torch import load_file

    from tests.integration.test_local_backend import FakeSink

    reference = inner.train(dataclasses.replace(job, work_dir=tmp_path / "reference",
                                                resume_from=None, checkpoints=None),
                            sink=FakeSink())
    (version,) = _versions_of(services, training)
    stored = tmp_path / "stored.safetensors"
    stored.write_bytes(services.blobs.get(version.weights_key))
    a, b = load_file(str(stored)), load_file(str(reference.weights_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), (key, f"seed {SEED}")


def _queued(services: Services, *, seed: int) -> tuple[User, Training, int]:
    """A user's first training, queued, and a step past its first checkpoint to stop it at."""
    user, _ = services.users.create(name="ann")
    queued = services.training.upload_files(user=user, files=_photos()).training
    assert queued is not None
    every, total = queued.recipe.checkpoint_every, queued.recipe.steps
    assert 0 < every < total
    return user, queued, random.Random(seed).randrange(every + 1, total)


@pytest.mark.slow
def test_a_training_whose_worker_died_resumes_from_its_checkpoint(
        tmp_path: Path, tiny: Any) -> None:
    died_at: list[int] = []

    def die(job: TrainingJob, step: int) -> None:
        if step >= crash_at:
            died_at.append(step)
            raise SimulatedCrash(f"the worker died at step {step}")

    trainer = Stopping(inner=tiny, hook=die)
    services = _services(tmp_path, trainer)
    try:
        _user, queued, crash_at = _queued(services, seed=SEED)
        every, total = queued.recipe.checkpoint_every, queued.recipe.steps

        with pytest.raises(SimulatedCrash):
            services.training.run(queued.id, owner="worker-a")
        checkpoint_step = crash_at // every * every
        assert _checkpoints(services, queued.id) == [
            f"{checkpoint_prefix(queued.id)}/step-{checkpoint_step:08d}.ckpt"], f"seed {SEED}"
        crashed = services.repo.get_training(queued.id)
        assert crashed is not None
        assert crashed.step == crash_at

        # The worker is gone (its lease ends; the upload's queue message is still there to
        # reach another worker): another one takes the training over and resumes it.
        services.training.reconcile(dead_owners=("worker-a",))
        services.training.run(queued.id, owner="worker-b")

        done = services.repo.get_training(queued.id)
        assert done is not None
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        assert done.recoveries == 1
        assert done.step == done.total_steps == total
        assert done.metrics["resumed_from_step"] == checkpoint_step
        assert trainer.jobs[1].resume_from is not None
        # The loss curve went on from where the first attempt left it, one point a step.
        assert [step for step, _ in done.loss_curve] == list(range(1, total + 1))
        assert len(_versions_of(services, done)) == 1
        kinds = [e["kind"] for e in services.repo.list_events(done.model_id)]
        assert kinds.count("version_stored") == 1
        assert _checkpoints(services, queued.id) == []  # a finished training keeps none
        _same_lora(services, done, tiny, trainer.jobs[1], tmp_path)
    finally:
        services.close()


@pytest.mark.slow
def test_a_canceled_training_resumes_from_its_checkpoint(tmp_path: Path, tiny: Any) -> None:
    def cancel(job: TrainingJob, step: int) -> None:
        if step == cancel_at:
            services.training.cancel(user=user, training_id=job.training_id)

    trainer = Stopping(inner=tiny, hook=cancel)
    services = _services(tmp_path, trainer)
    try:
        user, first, cancel_at = _queued(services, seed=SEED + 1)
        every, total = first.recipe.checkpoint_every, first.recipe.steps
        if cancel_at % every == 0:  # between two checkpoints, where a cancel used to lose steps
            cancel_at += 1
        services.training.run(first.id)
        canceled = services.repo.get_training(first.id)
        assert canceled is not None
        assert canceled.status is TrainingStatus.CANCELED
        # Canceled at cancel_at, between two checkpoints (every `every` steps): the steps since
        # the last one were checkpointed before it stopped, so the resume loses none.
        checkpoint_step = cancel_at
        assert len(_checkpoints(services, first.id)) == 1  # kept for a resume

        resumed = services.training.resume(user=user, training_id=first.id).training
        assert resumed.id != first.id
        assert resumed.status is TrainingStatus.QUEUED
        assert resumed.step == checkpoint_step, f"seed {SEED}"
        assert resumed.loss_curve == tuple(p for p in canceled.loss_curve
                                           if p[0] <= checkpoint_step)
        for name in ("trigger_word", "trainer_version", "destination", "recipe", "dataset_id"):
            assert getattr(resumed, name) == getattr(canceled, name), name
        queued_event = [e for e in services.repo.list_events(first.model_id)
                        if e["kind"] == "training_queued"][-1]
        assert queued_event["data"]["resumed_from"] == first.id
        assert _checkpoints(services, first.id) == []  # resumed once: moved to the new one
        with pytest.raises(ConflictError):
            services.training.resume(user=user, training_id=first.id)

        services.training.run(resumed.id)
        done = services.repo.get_training(resumed.id)
        assert done is not None
        assert done.status is TrainingStatus.SUCCEEDED, done.error
        assert done.step == total
        assert done.metrics["resumed_from_step"] == checkpoint_step
        assert [step for step, _ in done.loss_curve] == list(range(1, total + 1))
        (version,) = _versions_of(services, done)
        assert version.number == 1
        origin = services.repo.get_training(first.id)
        assert origin is not None
        assert origin.status is TrainingStatus.CANCELED
        assert origin.version_id is None
        _same_lora(services, done, tiny, trainer.jobs[1], tmp_path)
        with pytest.raises(ConflictError) as refused:
            services.training.resume(user=user, training_id=done.id)  # succeeded
        assert refused.value.code == "not_resumable"
    finally:
        services.close()


# --------------------------------------------------------------------------- route and CLI


@dataclass
class CheckpointingFake:
    """A fast trainer that checkpoints every other step (the checkpoint file holds its step),
    continues from ``job.resume_from``, and lets ``hook`` act at each step."""

    steps: int = 6
    hook: Callable[[TrainingJob, int], None] | None = None
    backend: str = "local"
    started_from: list[int] = field(default_factory=list)
    load_s: float = 0.0  # how long it "loads the model" before its first step

    def cancel_remote(self, remote_id: str) -> None:
        del remote_id

    def find_remote(
        self, *, training_id: str, destination: str, marker: str | None = None
    ) -> str | None:
        del training_id, destination, marker
        return None

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        start = int(job.resume_from.read_text()) if job.resume_from is not None else 0
        self.started_from.append(start)
        sink.started(remote_id=None)
        time.sleep(self.load_s)
        for step in range(start + 1, self.steps + 1):
            if step % 2 == 0 and job.checkpoints is not None:
                path = job.work_dir / f"{step}.ckpt"
                path.write_text(str(step))
                job.checkpoints.save(path, step=step)
            sink.progress(status=TrainingStatus.PROCESSING, step=step, total=self.steps,
                          loss=1.0 / step)
            if self.hook is not None:
                self.hook(job, step)
            if sink.cancel_requested():
                raise TrainingCanceledError("canceled", user_message="The training was canceled.")
        path = job.work_dir / "lora.safetensors"
        path.write_bytes(fake_safetensors({"training_id": job.training_id}))
        return TrainingResult(weights_path=path, weights_method="fake:file",
                              metrics={"steps": self.steps})


def _run_hooked(services: Services, trainer: CheckpointingFake, user: User,
                hook: Callable[[TrainingJob, int], None]) -> Training:
    """A new training of ``user`` run once by a worker with ``hook`` at each step: its row."""
    trainer.hook = hook
    queued = services.training.upload_files(user=user, files=_photos()).training
    assert queued is not None
    services.training.run(queued.id)
    trainer.hook = None
    after = services.repo.get_training(queued.id)
    assert after is not None
    return after


def _canceled_at_step_3(services: Services, trainer: CheckpointingFake, user: User) -> Training:
    def cancel(job: TrainingJob, step: int) -> None:
        if step == 3:
            services.training.cancel(user=user, training_id=job.training_id)

    canceled = _run_hooked(services, trainer, user, cancel)
    assert canceled.status is TrainingStatus.CANCELED
    return canceled


@pytest.fixture
def fake_served(tmp_path: Path) -> Iterator[tuple[TestClient, Services, CheckpointingFake]]:
    settings = make_settings(tmp_path)
    trainer = CheckpointingFake()
    services = build_services(settings, trainers={"local": trainer},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    try:
        with TestClient(create_app(settings, services=services, run_worker=False),
                        raise_server_exceptions=False) as client:
            yield client, services, trainer
    finally:
        services.close()


def test_the_resume_route_continues_a_canceled_training(
        fake_served: tuple[TestClient, Services, CheckpointingFake]) -> None:
    client, services, trainer = fake_served
    headers = auth(services, "ann")
    user = services.users.get_by_name(name="ann")
    canceled = _canceled_at_step_3(services, trainer, user)

    r = client.post("/api/training/resume", headers=headers,
                    json={"training_id": canceled.id})
    assert r.status_code == 202, r.text
    body = r.json()["training"]
    assert body["status"] == "queued"
    assert body["step"] == 2
    assert body["trigger_word"] == canceled.trigger_word
    again = client.post("/api/training/resume", headers=headers,
                        json={"training_id": canceled.id})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_resumable"
    missing = client.post("/api/training/resume", headers=headers,
                          json={"training_id": "00000000-0000-0000-0000-000000000000"})
    assert missing.status_code == 404

    services.training.run(body["id"])
    assert trainer.started_from == [0, 2]
    done = client.get("/api/training/progress", headers=headers,
                      params={"training_id": body["id"]}).json()["training"]
    assert done["status"] == "succeeded"
    assert done["step"] == done["total_steps"] == trainer.steps


# TrainingCheckpoints.copy, whose one caller is a resume (a request: nothing is claimed, so there
# is no attempt to count nor a training to leave waiting), raises StorageFullError on a full
# scratch disk (or over a quota): answered 507 storage_full saying which, nothing made, and the
# canceled training resumable as it was once there is room. Old code ("folder"): the resume made
# its scratch folder before the copy, so a full disk or a quota (of inodes, typically) refusing
# that mkdir was a raw OSError, answered 500 internal_error "please retry".
@pytest.mark.parametrize("where", ["file", "folder"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_resume_whose_scratch_disk_is_full_is_507_and_resumes_once_there_is_room(
        fake_served: tuple[TestClient, Services, CheckpointingFake],
        monkeypatch: pytest.MonkeyPatch, code: int, where: str) -> None:
    from selfie_lora.api.server_errors import server_error_sentence
    from selfie_lora.errors import ErrorCode
    from selfie_lora.services import checkpoints as checkpoint_service

    client, services, trainer = fake_served
    headers = auth(services, "ann")
    user = services.users.get_by_name(name="ann")
    canceled = _canceled_at_step_3(services, trainer, user)
    stored = _checkpoints(services, canceled.id)
    before = {t.id for t in services.repo.list_trainings(canceled.model_id)}

    def refused(path: Path) -> Any:
        raise OSError(code, os.strerror(code), str(path))

    real_mkdir = Path.mkdir

    def mkdir(path: Path, *args: Any, **kwargs: Any) -> None:
        if path.name.startswith("resume-"):
            refused(path)
        real_mkdir(path, *args, **kwargs)

    with monkeypatch.context() as disk:
        if where == "file":
            disk.setattr(checkpoint_service, "private_replacement", refused)
        else:
            disk.setattr(Path, "mkdir", mkdir)
        r = client.post("/api/training/resume", headers=headers,
                        json={"training_id": canceled.id})
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "storage_full"
    assert error["message"] == server_error_sentence(ErrorCode.STORAGE_FULL,
                                                     quota=code == errno.EDQUOT)
    assert {t.id for t in services.repo.list_trainings(canceled.model_id)} == before
    assert _checkpoints(services, canceled.id) == stored
    assert sorted(info.key for info in services.blobs.list("checkpoints")) == stored
    assert not [p for p in services.settings.work_dir.glob("resume-*")]

    again = client.post("/api/training/resume", headers=headers,
                        json={"training_id": canceled.id})
    assert again.status_code == 202, again.text
    assert again.json()["training"]["step"] == 2


def test_a_training_resumed_already_names_the_training_it_was_resumed_as(
        fake_served: tuple[TestClient, Services, CheckpointingFake]) -> None:
    """Resuming a training resumed already said it "was canceled before its first [checkpoint];
    start a new training", sending the user away from the training that carries its steps
    (found in review)."""
    client, services, trainer = fake_served
    headers = auth(services, "ann")
    user = services.users.get_by_name(name="ann")
    canceled = _canceled_at_step_3(services, trainer, user)
    first = services.training.resume(user=user, training_id=canceled.id).training
    services.training.cancel(user=user, training_id=first.id)  # canceled while queued

    r = client.post("/api/training/resume", headers=headers, json={"training_id": canceled.id})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "not_resumable"
    assert r.json()["error"]["message"] == (
        f"this training was resumed already as training {first.id}; resume that one")

    # That one resumes; asked of the first again, the answer follows the chain to the last.
    second = services.training.resume(user=user, training_id=first.id).training
    assert second.step == 2
    with pytest.raises(ConflictError) as refused:
        services.training.resume(user=user, training_id=canceled.id)
    assert refused.value.message == (
        f"this training was resumed already as training {second.id} (now queued)")


# Old code: a resume committed its new training, then dropped the canceled one's checkpoints: a
# process killed between the two left them, and the canceled training stayed resumable (the
# Train page offered it, the collector kept its checkpoints for ever), so once the first resumed
# training had ended it was resumed a second time, from the same step.
def test_a_resume_killed_before_it_dropped_the_old_checkpoints_is_not_resumed_twice(
        tmp_path: Path) -> None:
    script = (
        services_script(trainer="CheckpointingFake()", settings="", imports=(
            "from tests.integration.test_resume import CheckpointingFake, _canceled_at_step_3\n")) +
        "ann, _key = svc.users.create(name='ann')\n"
        "canceled = _canceled_at_step_3(svc, svc.training._trainers['local'], ann)\n"
        "print(canceled.id, flush=True)\n"
        "def killed(training_id):\n"
        "    os._exit(9)  # the new training is committed: the process dies right after\n"
        "svc.training._checkpoints.drop = killed\n"
        "svc.training.resume(user=ann, training_id=canceled.id)\n"
    )
    canceled_id = run_killed(script, str(tmp_path)).stdout.split()[0]

    home = tmp_path / "home"
    trainer = CheckpointingFake()
    services = build_services(make_settings(tmp_path,
                                            database_url=f"sqlite:///{home / 'selfie-lora.db'}"),
                              trainers={"local": trainer}, face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    try:
        user = services.users.get_by_name(name="ann")
        resumed = services.training.progress(user=user).training
        assert resumed.id != canceled_id
        services.training.run(resumed.id)
        assert trainer.started_from == [2]
        done = services.repo.get_training(resumed.id)
        assert done is not None
        assert done.status is TrainingStatus.SUCCEEDED
        canceled = services.repo.get_training(canceled_id)
        assert canceled is not None

        # Nothing resumes it again, the Train page offers no resume, and the collector keeps
        # its checkpoints no longer (the refusal deletes them too).
        with pytest.raises(ConflictError) as refused:
            services.training.resume(user=user, training_id=canceled_id)
        assert refused.value.code == "not_resumable"
        assert refused.value.message == (
            f"this training was resumed already as training {resumed.id} (now succeeded)")
        assert trainer.started_from == [2]
        assert services.training.resume_point(canceled) is None
        assert not next(t.resumable for t in services.repo.gc_references().trainings
                        if t.id == canceled_id)
        assert _checkpoints(services, canceled_id) == []
    finally:
        services.close()


def test_a_training_canceled_before_its_first_checkpoint_cannot_be_resumed(
        fake_served: tuple[TestClient, Services, CheckpointingFake]) -> None:
    client, services, trainer = fake_served
    headers = auth(services, "bob")
    user = services.users.get_by_name(name="bob")
    queued = services.training.upload_files(user=user, files=_photos()).training
    assert queued is not None
    services.training.cancel(user=user, training_id=queued.id)  # nobody ran it
    r = client.post("/api/training/resume", headers=headers, json={"training_id": queued.id})
    assert r.status_code == 409
    assert "no checkpoint" in r.json()["error"]["message"]
    # Nothing was queued meanwhile: the user can start a new training.
    assert services.training.start(user=user).training.status is TrainingStatus.QUEUED
    del trainer


def test_a_canceled_training_of_a_model_moved_to_another_trainer_is_not_resumed(
        fake_served: tuple[TestClient, Services, CheckpointingFake]) -> None:
    _client, services, trainer = fake_served
    user, _ = services.users.create(name="cat")
    canceled = _canceled_at_step_3(services, trainer, user)

    def resumable() -> bool:
        return next(t.resumable for t in services.repo.gc_references().trainings
                    if t.id == canceled.id)

    assert resumable()  # the collector keeps its checkpoints
    services.models.change_trainer_version(user=user, trainer_version="local-tiny-v1",
                                           reason="the v1 recipe")
    # What resume refuses below, the collector sees too: its checkpoints are no longer kept for
    # a resume (old code: resumable, kept for ever).
    assert not resumable()
    with pytest.raises(ConflictError) as refused:
        services.training.resume(user=user, training_id=canceled.id)
    assert refused.value.code == "not_resumable"
    assert "checkpoint does not fit" in refused.value.message
    # Refused before anything changed: the checkpoint stays, nothing is queued.
    assert services.training.resume_point(canceled) == 2
    assert services.training.progress(user=user).training.id == canceled.id


def test_selfie_lora_resume_queues_the_canceled_training(home: Path) -> None:
    trainer = CheckpointingFake()
    services = build_services(Settings(home=home, min_photos=1), trainers={"local": trainer},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    try:
        user, _ = services.users.create(name="ann")
        canceled = _canceled_at_step_3(services, trainer, user)
    finally:
        services.close()

    result = CliRunner().invoke(cli_app, ["resume", "--user", "ann", "--no-wait"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert f"resumes {canceled.id} at step 2/" in said
    assert ("queued: a `selfie-lora serve` or `selfie-lora worker` running on these settings "
            "trains it in its turn") in said

    services = build_services(Settings(home=home, min_photos=1), trainers={"local": trainer},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    try:
        latest = services.training.progress(user=user).training
        assert latest.id != canceled.id
        assert latest.status is TrainingStatus.QUEUED
        services.training.run(latest.id)
        done = services.repo.get_training(latest.id)
        assert done is not None
        assert done.status is TrainingStatus.SUCCEEDED
        assert trainer.started_from == [0, 2]
    finally:
        services.close()

    refused = CliRunner().invoke(cli_app, ["resume", "--user", "ann", canceled.id, "--no-wait"])
    assert refused.exit_code == 1
    assert f"resumed already as training {latest.id} (now succeeded)" in " ".join(
        refused.output.split())


def _signing_in(settings: Settings, trainer: CheckpointingFake) -> Services:
    """Services on ``trainer`` whose users sign in on the pages (a fast password hash)."""
    from tests.integration.test_web import FAST_HASHER

    return build_services(settings, trainers={"local": trainer},
                          face_analyzer=one_person_analyzer(),
                          generators={"local": FakeGenerator()}, password_hasher=FAST_HASHER)


def test_the_training_page_offers_to_resume_a_canceled_training(tmp_path: Path) -> None:
    from tests.integration.test_web import PASSWORD, csrf, sign_in

    settings = make_settings(tmp_path)
    trainer = CheckpointingFake()
    services = _signing_in(settings, trainer)
    try:
        user, _ = services.users.create(name="ann", password=PASSWORD)
        canceled = _canceled_at_step_3(services, trainer, user)
        with TestClient(create_app(settings, services=services, run_worker=False),
                        raise_server_exceptions=False) as client:
            sign_in(client, "ann")
            page = client.get("/train/status").text
            assert "Resume from step 2" in page
            r = client.post("/train/resume", data={"csrf_token": csrf(client),
                                                   "training_id": canceled.id},
                            follow_redirects=False)
            assert r.status_code == 303, r.text
            resumed = services.training.progress(user=user).training
            assert resumed.id != canceled.id
            assert resumed.status is TrainingStatus.QUEUED
            assert resumed.step == 2
            assert "Resume from step" not in client.get("/train/status").text  # it runs now
    finally:
        services.close()


def test_a_canceled_training_s_end_says_so_once_and_offers_resume_or_a_new_training(
        tmp_path: Path) -> None:
    """The page read "The training was canceled. The training was canceled. Your active version
    is unchanged; start a new training when you are ready." right above "Resume from step 2"
    (found in review): the ended sentence, then the stored cancel message that repeats it."""
    from tests.integration.test_web import PASSWORD, sign_in

    settings = make_settings(tmp_path)
    trainer = CheckpointingFake()
    services = _signing_in(settings, trainer)
    try:
        user, _ = services.users.create(name="ann", password=PASSWORD)
        _canceled_at_step_3(services, trainer, user)
        with TestClient(create_app(settings, services=services, run_worker=False),
                        raise_server_exceptions=False) as client:
            sign_in(client, "ann")
            page = client.get("/train").text
            ended = " ".join(page.split('id="ended"', 1)[1].split("</p>", 1)[0].split())
            assert ended.count("was canceled") == 1, ended
            assert "Resume it from step 2, or start a new training." in ended
            assert "when you are ready" not in ended
            assert "Resume from step 2" in page
    finally:
        services.close()


def test_another_users_training_is_neither_canceled_nor_resumed(tmp_path: Path) -> None:
    """Bob, with a model of his own, names Ann's trainings to the API's cancel and resume and to
    the training page's forms: each is the answer an unknown id gets, and Ann's trainings are
    as they were (her queued one not canceled, her canceled one still resumable)."""
    from tests.integration.test_web import PASSWORD, csrf, sign_in

    settings = make_settings(tmp_path)
    trainer = CheckpointingFake()
    services = _signing_in(settings, trainer)
    try:
        ann, _ = services.users.create(name="ann", password=PASSWORD)
        services.users.create(name="bob", password=PASSWORD)
        canceled = _canceled_at_step_3(services, trainer, ann)
        # Queued, and nobody runs it (no worker): a cancel would end it here and now.
        queued = services.training.start(user=ann).training
        checkpoints = _checkpoints(services, canceled.id)
        assert checkpoints
        with TestClient(create_app(settings, services=services, run_worker=False),
                        raise_server_exceptions=False) as client:
            # Past "you have no model yet": only a lookup scoped to Bob's model refuses.
            bob = own_model(client, services, "bob", versions=0).headers
            unknown = "00000000-0000-0000-0000-000000000000"
            for route in ("/api/training/cancel", "/api/training/resume"):
                answers = [client.post(route, headers=bob, json={"training_id": tid})
                           for tid in (queued.id, canceled.id, unknown)]
                assert [r.status_code for r in answers] == [404, 404, 404], answers[0].text
                # Nothing tells Bob that the id is someone's.
                assert answers[0].json() == answers[1].json() == answers[2].json()
            sign_in(client, "bob")
            for form in ("/train/cancel", "/train/resume"):
                for tid in (queued.id, canceled.id):
                    r = client.post(form, data={"csrf_token": csrf(client), "training_id": tid},
                                    follow_redirects=False)
                    assert r.status_code == 404, (form, r.status_code, r.text)
                    assert "no such training" in r.text
        still = services.repo.get_training(queued.id)
        assert still is not None
        assert (still.status, still.cancel_requested) == (TrainingStatus.QUEUED, False)
        assert services.repo.get_training(canceled.id) == canceled
        assert services.training.resume_point(canceled) == 2
        assert _checkpoints(services, canceled.id) == checkpoints
        assert [t.id for t in services.repo.list_trainings(canceled.model_id)] == [
            queued.id, canceled.id]
        bobs = services.models.get(user=services.users.get_by_name(name="bob"))
        assert services.repo.list_trainings(bobs.id) == []
    finally:
        services.close()


def test_a_trainer_that_cannot_write_its_lora_steps_away_and_keeps_the_checkpoints(
        fake_served: tuple[TestClient, Services, CheckpointingFake]) -> None:
    """The worker's disk full as the trainer writes the LoRA (the local trainer raises
    StorageError): the training is neither failed nor its checkpoints dropped; the worker steps
    away naming what failed, and the next attempt resumes from the newest checkpoint."""
    _client, services, trainer = fake_served
    user, _ = services.users.create(name="cid")

    def disk_full(job: TrainingJob, step: int) -> None:
        if step == 4:
            raise StorageError(f"the trained LoRA cannot be written to {job.work_dir}/"
                               "lora.safetensors: No space left on device")

    left = _run_hooked(services, trainer, user, disk_full)
    assert left.status is TrainingStatus.PROCESSING
    assert left.error == "the trained LoRA could not be written on the worker's disk"
    assert [key.rsplit("/", 1)[-1] for key in _checkpoints(services, left.id)] == [
        "step-00000004.ckpt"]

    services.training.run(left.id)
    assert trainer.started_from == [0, 4]
    done = services.repo.get_training(left.id)
    assert done is not None
    assert done.status is TrainingStatus.SUCCEEDED
    assert len(_versions_of(services, done)) == 1


def test_the_training_page_estimates_the_time_left_from_this_attempts_steps(
        tmp_path: Path) -> None:
    """A resumed training that loads for 3 s, then makes its steps a fraction of a second apart
    (0.1 s and a page request): the page shows no time left until two steps of its own are in,
    then what those steps' pace leaves, a second or two (old code: the load and the inherited
    steps counted: "about 9 s left" at its first step, 5 s at its third)."""
    from tests.integration.test_web import PASSWORD, sign_in

    settings = make_settings(tmp_path)
    trainer = CheckpointingFake(steps=12)
    services = _signing_in(settings, trainer)
    try:
        user, _ = services.users.create(name="ann", password=PASSWORD)
        canceled = _canceled_at_step_3(services, trainer, user)
        resumed = services.training.resume(user=user, training_id=canceled.id).training
        with TestClient(create_app(settings, services=services, run_worker=False),
                        raise_server_exceptions=False) as client:
            sign_in(client, "ann")
            left: dict[int, str | None] = {}

            def look(job: TrainingJob, step: int) -> None:
                found = re.search(r"about ([^<]+?) left", client.get("/train/status").text)
                left[step] = found.group(1) if found else None
                time.sleep(0.1)

            trainer.hook, trainer.load_s = look, 3.0
            services.training.run(resumed.id)
        assert trainer.started_from[-1] == 2
        # Its first report is step 3: steps 3 and 4 are one step of its own at most.
        assert (left[3], left[4]) == (None, None)
        # From then on, at most 0.3 s a step for the 7 steps or fewer left.
        assert all(re.fullmatch(r"[0-2] s", left[step] or "") for step in range(5, 12)), left
    finally:
        services.close()


def test_a_canceled_replicate_training_is_refused_saying_replicate_keeps_no_checkpoints(
        tmp_path: Path) -> None:
    """A Replicate training canceled well into its steps was refused with "it was canceled
    before its first one", which was false (found in review, s2_resume.py): Replicate keeps no
    checkpoints, so the refusal says that, and that a resume would start from step 0."""
    import threading

    from selfie_lora.testing.replicate_standin import ReplicateStandIn
    from tests.support.photos import photo_zip

    with ReplicateStandIn() as standin:
        standin.processing_polls = 400
        services = build_services(
            make_settings(tmp_path, trainer="replicate", replicate_api_token=standin.token,
                          replicate_base_url=standin.base_url, replicate_owner="acme",
                          replicate_poll_interval=0.01),
            face_analyzer=one_person_analyzer())
        try:
            user, _ = services.users.create(name="ann")
            started = services.training.upload_zip(user=user, data=photo_zip(3, size=1100))
            assert started.training is not None
            tid = started.training.id
            runner = threading.Thread(target=services.training.run, args=(tid,))
            runner.start()
            deadline = time.monotonic() + 30
            while (t := services.repo.get_training(tid)) is None or t.step < 10:
                assert time.monotonic() < deadline, "the Replicate training made no progress"
                time.sleep(0.02)
            services.training.cancel(user=user, training_id=tid)
            runner.join(30)
            canceled = services.repo.get_training(tid)
            assert canceled is not None
            assert canceled.status is TrainingStatus.CANCELED
            assert canceled.step >= 10

            with pytest.raises(ConflictError) as refused:
                services.training.resume(user=user, training_id=tid)
        finally:
            services.close()
    assert refused.value.message == (
        "a training on Replicate cannot be resumed: Replicate keeps no checkpoints of its "
        "trainings, so it would start again from step 0; start a new training")
    assert "canceled before its first one" not in refused.value.message


# Old code: ``start``'s second look under the model's lock (a rival resume committed between
# ``resume``'s check and this one) said "this training was resumed already as training X" in a
# wording of its own, without what became of X, where ``resume`` itself says "(now succeeded)".
def test_a_resume_that_loses_the_race_under_the_lock_is_refused_as_resume_refuses_it(
        fake_served: tuple[TestClient, Services, CheckpointingFake],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _client, services, trainer = fake_served
    services.users.create(name="ann")
    user = services.users.get_by_name(name="ann")
    canceled = _canceled_at_step_3(services, trainer, user)
    # The rival: a resume that committed its training and has not yet dropped the checkpoints.
    monkeypatch.setattr(services.training._checkpoints, "drop", lambda training_id: None)
    rival = services.training.resume(user=user, training_id=canceled.id).training
    services.training.run(rival.id)  # ended: the model is not busy, the lock's look decides
    # This resume's first look happened before the rival committed: only the lock's one sees it.
    monkeypatch.setattr(services.training._repo, "resumed_as", lambda *args: None)

    with pytest.raises(ConflictError) as refused:
        services.training.resume(user=user, training_id=canceled.id)
    assert refused.value.code == "not_resumable"
    assert refused.value.message == (
        f"this training was resumed already as training {rival.id} (now succeeded)")
