"""One deployment, one storage: the storage id the database records (``services.deployment``).

The new user's scale path: an API server (``serve --no-worker``) and a ``worker``, each with its
own SELFIE_LORA_HOME, one PostgreSQL database and one Redis queue, SELFIE_LORA_STORAGE_URL
forgotten, both started before the first upload. Each bound its own empty HOME/blobs to the
deployment, and every training then failed with "a photo ... is gone from storage ... upload the
photos again", which never helps. Now the second one refuses to start in one line naming
SELFIE_LORA_STORAGE_URL; two processes on one folder (reached by different paths) both start; a
deployment bound before the database recorded its storage adopts the marker it finds. A
training that finds none of its upload's files names the setting instead of "upload again".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.config import get_settings
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.errors import BlobMissingError, DeploymentMismatchError
from selfie_lora.services.common import utcnow
from selfie_lora.services.deployment import DeploymentBinding
from selfie_lora.services.layout import DEPLOYMENT_KEY, manifest_key, photo_key
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.backends import REDIS_ENV, database_url, fresh_engine
from tests.support.photos import photo_zip

Start = Callable[[Path], Services]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Points the environment at one HOME of the scale path: PostgreSQL, Redis, no storage URL."""
    db = database_url("postgres", tmp_path)
    queue = os.environ.get(REDIS_ENV)
    if not queue:
        pytest.skip(f"needs {REDIS_ENV}")
    fresh_engine(db).dispose()
    import redis

    client = redis.Redis.from_url(queue)
    client.flushdb()

    def use(home: Path) -> None:
        monkeypatch.setenv("SELFIE_LORA_HOME", str(home))
        monkeypatch.setenv("SELFIE_LORA_DATABASE_URL", db)
        monkeypatch.setenv("SELFIE_LORA_QUEUE_URL", queue)
        monkeypatch.setenv("SELFIE_LORA_SECRET_KEY", "abcdefghijklmnopqrstuvwxyz0123456789abcd")
        monkeypatch.delenv("SELFIE_LORA_STORAGE_URL", raising=False)
        for name, value in (("MIN_PHOTOS", "1"), ("TRAINER", "local"), ("BASE_MODEL", "tiny"),
                            ("LOCAL_ISOLATION", "inline"), ("INTAKE_WORKERS", "1")):
            monkeypatch.setenv(f"SELFIE_LORA_{name}", value)
        get_settings.cache_clear()

    try:
        yield use
    finally:
        get_settings.cache_clear()
        client.flushdb()
        client.close()


def started(home: Path, use: Callable[[Path], None]) -> Services:
    """What ``serve`` or ``worker`` does before it serves or works: builds its services from the
    environment and binds the storage (``worker`` then checks it too)."""
    use(home)
    services = build_services(get_settings(), trainers={"local": FakeTrainer()},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    try:
        services.operations.bind_deployment()
        services.operations.check_worker_storage()
    except BaseException:
        services.close()
        raise
    return services


def app_cli() -> object:
    from selfie_lora.cli import app

    return app


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize("second", [["worker"], ["serve", "--no-worker", "--port", "{port}"]],
                         ids=["worker", "serve-no-worker"])
def test_a_second_process_with_its_own_empty_folder_refuses_in_one_line_before_any_upload(
        tmp_path: Path, scale: Callable[[Path], None], second: list[str]) -> None:
    api = started(tmp_path / "api", scale)
    try:
        deployment_id = api.repo.get_deployment_id()
        assert deployment_id is not None
        scale(tmp_path / "worker")
        args = [arg.replace("{port}", str(free_port())) for arg in second]
        result = CliRunner().invoke(app_cli(), args)  # type: ignore[arg-type]
        assert isinstance(result.exception, SystemExit), result.exception  # old code: it ran
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("error: refusing to start: this process's storage is not "
                                   "the deployment's"), result.output
        assert "is SELFIE_LORA_STORAGE_URL set for this process" in lines[0]
        # Its folder is left as it was, and the API server's binding stands.
        assert not (tmp_path / "worker" / "blobs" / DEPLOYMENT_KEY).exists()
        assert api.repo.get_deployment_id() == deployment_id
        assert started(tmp_path / "api", scale).close() is None  # a restart of the api: fine
    finally:
        api.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
def test_one_folder_reached_by_two_paths_lets_both_start(
        tmp_path: Path, scale: Callable[[Path], None]) -> None:
    # The same storage mounted at different paths on two machines: here a second HOME whose
    # blobs folder is a link to the first's.
    (tmp_path / "worker").mkdir()
    (tmp_path / "api" / "blobs").mkdir(parents=True)
    (tmp_path / "worker" / "blobs").symlink_to(tmp_path / "api" / "blobs")
    api = started(tmp_path / "api", scale)
    try:
        worker = started(tmp_path / "worker", scale)
        try:
            assert worker.repo.get_deployment_id() == api.repo.get_deployment_id()
            # The photos the api stores are the worker's: its training runs.
            user, _key = api.users.create(name="erin")
            training = api.training.upload_zip(user=user, data=photo_zip(3)).training
            assert training is not None
            worker.training.run(training.id)
            done = worker.repo.get_training(training.id)
            assert done is not None
            assert done.status is TrainingStatus.SUCCEEDED, done.error
        finally:
            worker.close()
    finally:
        api.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_deployment_bound_before_adopts_its_marker_and_then_refuses_another_folder(
        tmp_path: Path, scale: Callable[[Path], None]) -> None:
    # Bound by the release before: the database has the deployment's id and no storage id,
    # the store a marker without one.
    scale(tmp_path / "api")
    old = build_services(get_settings(), trainers={}, generators={})
    try:
        old.repo.ensure_deployment_id("d-old", now=utcnow())
        assert old.repo.get_deployment_storage_id() is None
    finally:
        old.close()
    blobs = tmp_path / "api" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    marker = json.dumps({"deployment_id": "d-old", "created_at": "2026-11-01T10:00:00+00:00"})
    (blobs / DEPLOYMENT_KEY).write_text(marker)

    api = started(tmp_path / "api", scale)
    try:
        assert api.repo.get_deployment_id() == "d-old"
        adopted = api.repo.get_deployment_storage_id()
        assert adopted is not None
        assert (blobs / DEPLOYMENT_KEY).read_text() == marker  # not rewritten
        assert started(tmp_path / "api", scale).close() is None  # a restart: the same
        assert api.repo.get_deployment_storage_id() == adopted
        with pytest.raises(DeploymentMismatchError, match="SELFIE_LORA_STORAGE_URL"):
            started(tmp_path / "worker", scale)
    finally:
        api.close()


def test_a_training_that_finds_none_of_its_upload_names_the_storage_setting(
        tmp_path: Path) -> None:
    # A worker whose storage is not the one the photos went to (an unbound one, as before this
    # release): "upload the photos again" never helps; the setting does, which is the
    # operator's: its name is in the row's reason (the worker's log line), the user is told to
    # tell the operator.
    svc = build_services(make_settings(tmp_path, intake_workers=1),
                         trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    try:
        user, _key = svc.users.create(name="erin")
        training = svc.training.upload_zip(user=user, data=photo_zip(3)).training
        assert training is not None
        dataset = svc.repo.get_dataset(training.dataset_id)
        assert dataset is not None
        for key in (manifest_key(dataset.id), *map(photo_key, dataset.photo_hashes)):
            svc.blobs.delete(key)
        svc.training.run(training.id)
        final = svc.repo.get_training(training.id)
        assert final is not None
        assert final.status is TrainingStatus.FAILED
        assert final.error is not None
        assert "SELFIE_LORA_STORAGE_URL" in final.history[-1]["reason"]
        assert "tell the operator" in final.error  # old code: "upload the photos again"
        assert "uploading the photos again does not help" in final.error
    finally:
        svc.close()


class _MarkedMeanwhile:
    """A store whose first read of the marker finds none, while another process of the
    deployment marks it and records it in the database at that very moment (processes of one
    deployment started at once on one bucket)."""

    def __init__(self, store: Any, other: DeploymentBinding) -> None:
        self._store = store
        self._other = other
        self.first_read = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get(self, key: str) -> bytes:
        if key == DEPLOYMENT_KEY and self.first_read:
            self.first_read = False
            assert self._other.bind() is not None  # the other process, between two lines
            raise BlobMissingError(key)
        data: bytes = self._store.get(key)
        return data


def test_a_process_whose_store_is_marked_while_it_starts_binds_to_it(
        services: Services, tmp_path: Path) -> None:
    """The scale path's end-to-end test saw a worker refuse to start ('this process's storage
    is not the deployment's') when the API server marked the shared bucket, and recorded it,
    between the worker's read of the marker and its look at the database."""
    assert services.repo.get_deployment_storage_id() is None
    shared = FileSystemBlobStore(tmp_path / "bucket")
    first = DeploymentBinding(repo=services.repo, blobs=shared)
    store = _MarkedMeanwhile(shared, first)
    second = DeploymentBinding(repo=services.repo, blobs=store)
    assert second.bind() == services.repo.get_deployment_id()
    assert not store.first_read  # the marker appeared meanwhile, as in the failing run
    assert not second.wrote_marker
