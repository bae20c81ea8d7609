"""One blob store, one database: the deployment marker (``services.deployment``).

The reviewer's scenario, on the file system and on S3: deployment A trains a version; B, with
another database and the same storage (``selfie-lora gc`` run with SELFIE_LORA_DATABASE_URL
unset or wrong, a staging deployment given production's storage URL), collects garbage two days
later. It deleted every photo and A's weights; now it refuses, naming both deployments, and
deletes nothing. Also: a worker refuses to start on another deployment's store, racing first
starts agree on one id, an upgraded deployment binds cleanly at its first start, and a store no
process has bound yet is protected by the collector's second guard (``--force`` overrides it).
A start binds an unmarked store only if it is empty of photos and weights or holds this
database's own blobs: a worker with an empty or a foreign database leaves another deployment's
unmarked store unbound, and its scheduled collection deletes nothing there.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.domain.entities import TrainingStatus, User, Version
from selfie_lora.errors import ConfigError, DeploymentMismatchError
from selfie_lora.services.common import utcnow
from selfie_lora.services.deployment import DeploymentBinding
from selfie_lora.services.layout import DEPLOYMENT_KEY
from selfie_lora.services.ports import BlobStore
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from selfie_lora.worker import run_worker, start_embedded
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip
from tests.support.s3 import S3Server

# Past the default 24 h grace period: every blob the test wrote is old enough to collect.
LATER = timedelta(days=2)


@dataclass
class Storage:
    """One store that several deployments are (wrongly) given."""

    overrides: dict[str, Any]
    root: Path | None  # the file system store's folder

    def services(self, home: Path) -> Services:
        """A deployment with its own HOME and database (SQLite there), on this store."""
        blobs = FileSystemBlobStore(self.root) if self.root is not None else None
        return build_services(make_settings(home, intake_workers=1, **self.overrides),
                              trainers={"local": FakeTrainer()},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()}, blobs=blobs)


@pytest.fixture(params=["fs", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "fs":
        return Storage(overrides={}, root=tmp_path / "shared-blobs")
    server: S3Server = request.getfixturevalue("s3_server")
    return Storage(overrides=server.settings(server.new_location()), root=None)


@pytest.fixture
def deployments(storage: Storage, tmp_path: Path) -> Iterator[tuple[Services, Services]]:
    a = storage.services(tmp_path / "a")
    b = storage.services(tmp_path / "b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def trained_version(svc: Services, name: str = "ann", *, offset: int = 0
                    ) -> tuple[User, Version]:
    user, _key = svc.users.create(name=name)
    started = svc.training.upload_zip(user=user, data=photo_zip(3, offset=offset))
    assert started.training is not None
    svc.training.run(started.training.id)
    return user, svc.models.versions(user=user)[0]


def two_days_on(svc: Services) -> None:
    later = utcnow() + LATER
    svc.gc._clock = lambda: later


def stored_keys(blobs: BlobStore) -> set[str]:
    return {b.key for prefix in ("photos", "weights", "datasets", "quality")
            for b in blobs.list(prefix)}


def test_another_database_on_a_bound_store_refuses_and_deletes_nothing(
        deployments: tuple[Services, Services]) -> None:
    a, b = deployments
    worker = start_embedded(a, consume=False)  # A's server starts: it binds the store
    worker.stop()
    a_id = a.repo.get_deployment_id()
    assert a_id is not None
    user, version = trained_version(a)
    before = stored_keys(a.blobs)
    assert version.weights_key in before

    two_days_on(b)
    for dry_run in (True, False):
        with pytest.raises(DeploymentMismatchError) as refused:
            b.gc.collect(dry_run=dry_run)
        message = refused.value.message
        assert f"belongs to deployment {a_id}" in message
        assert "this database has none" in message
        assert "SELFIE_LORA_DATABASE_URL" in message
        assert "SELFIE_LORA_STORAGE_URL" in message
    # --force is for the unbound store's guard only: a marker naming another deployment wins.
    with pytest.raises(DeploymentMismatchError):
        b.gc.collect(force=True)

    assert stored_keys(a.blobs) == before
    assert a.blobs.exists(DEPLOYMENT_KEY)
    assert a.models.weights(user=user, version_id=version.id)

    # A's own collection, as late, goes on and keeps its marker.
    two_days_on(a)
    assert a.gc.collect().empty
    assert stored_keys(a.blobs) == before
    assert a.blobs.exists(DEPLOYMENT_KEY)


def test_a_database_with_an_id_of_its_own_refuses_too(
        deployments: tuple[Services, Services], tmp_path: Path) -> None:
    # A staging deployment that ran on its own storage before (its database has an id), then
    # given production's storage URL: its workers refuse to start, and its gc to collect.
    a, b = deployments
    a.operations.bind_deployment()
    trained_version(a)
    b_id = DeploymentBinding(repo=b.repo, blobs=FileSystemBlobStore(tmp_path / "own")).bind()
    a_id = a.repo.get_deployment_id()
    assert b_id != a_id

    with pytest.raises(DeploymentMismatchError) as refused:
        start_embedded(b, consume=True)
    assert f"belongs to deployment {a_id}, this database's is {b_id}" in refused.value.message
    assert "refusing to start" in refused.value.message
    two_days_on(b)
    with pytest.raises(DeploymentMismatchError):
        b.gc.collect()
    assert a.blobs.get(DEPLOYMENT_KEY)  # the marker is A's still
    assert DeploymentBinding(repo=a.repo, blobs=a.blobs).store_id() == a_id


def test_a_store_no_process_has_bound_is_guarded_by_an_empty_database(
        deployments: tuple[Services, Services]) -> None:
    # The reviewer's script as it ran: A trained without a server of this release ever starting
    # (an upgrade not restarted yet), so the store has no marker; B's database is empty.
    a, b = deployments
    user, version = trained_version(a)
    before = stored_keys(a.blobs)
    assert not a.blobs.exists(DEPLOYMENT_KEY)

    two_days_on(b)
    for dry_run in (True, False):
        with pytest.raises(DeploymentMismatchError) as refused:
            b.gc.collect(dry_run=dry_run)
        message = refused.value.message
        assert "this database names no upload and no version" in message
        assert "3 photo(s) and 1 weights file(s)" in message
        assert "selfie-lora gc --force" in message
    assert stored_keys(a.blobs) == before
    assert a.models.weights(user=user, version_id=version.id)
    assert not a.blobs.exists(DEPLOYMENT_KEY), "a collection never binds"

    # Forced, it believes its empty database: what the guard is there to stop.
    assert version.weights_key in b.gc.collect(dry_run=True, force=True).keys


def test_a_worker_with_an_empty_database_leaves_an_unmarked_store_alone(
        deployments: tuple[Services, Services], caplog: pytest.LogCaptureFixture) -> None:
    # The reviewer's r1: A trained on a store no server of this release has marked yet; B, a
    # worker with an empty database (SELFIE_LORA_DATABASE_URL unset), starts on it. Its start
    # bound the store to B's database and its scheduled collection deleted every photo and
    # weights file of A's, and A was refused at its next start.
    a, b = deployments
    user, version = trained_version(a)
    before = stored_keys(a.blobs)
    two_days_on(b)
    b.gc.interval = timedelta(hours=1)

    worker = start_embedded(b, threads=1, collect_garbage=True)
    try:
        worker.collect_garbage()  # its scheduled collection, due now
    finally:
        worker.stop()
    assert stored_keys(a.blobs) == before
    assert a.models.weights(user=user, version_id=version.id)
    assert not a.blobs.exists(DEPLOYMENT_KEY), "B left the store unbound"
    assert b.repo.get_deployment_id() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("not binding the storage to this database: this database names "
                            "no upload and no version, yet it holds photos or weights")
               for m in warnings), warnings
    assert any(m.startswith("garbage collection: refusing to collect garbage: this database "
                            "names no upload and no version, yet the collection would delete "
                            "3 photo(s) and 1 weights file(s)") for m in warnings), warnings
    # Called directly, the scheduled collection says why.
    with pytest.raises(DeploymentMismatchError, match="selfie-lora gc --force"):
        b.gc._run_claimed(work=True, bind=True)
    assert stored_keys(a.blobs) == before

    # A starts on this release: its database names what the store holds, so it binds.
    a_id = a.operations.bind_deployment()
    assert a_id is not None
    assert a_id == a.repo.get_deployment_id()
    assert DeploymentBinding(repo=a.repo, blobs=a.blobs).store_id() == a_id
    two_days_on(a)
    assert a.gc.collect().empty
    assert stored_keys(a.blobs) == before


def test_a_database_of_its_own_does_not_bind_an_unmarked_store_holding_none_of_its_blobs(
        storage: Storage, tmp_path: Path) -> None:
    # A staging deployment with data of its own (on its own storage, before this release),
    # given production's storage URL: its database names uploads and a version, but none of
    # them is in production's store. Its start must not bind that store, nor its worker's
    # collection take production's blobs for orphans.
    a = storage.services(tmp_path / "a")
    own = build_services(make_settings(tmp_path / "b", intake_workers=1),
                         trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()},
                         blobs=FileSystemBlobStore(tmp_path / "staging-blobs"))
    try:
        trained_version(own, "bo", offset=3)  # other selfies than production's
    finally:
        own.close()
    b = storage.services(tmp_path / "b")  # the same database, production's storage
    try:
        user, version = trained_version(a)
        before = stored_keys(a.blobs)
        assert b.operations.bind_deployment() is None
        assert not a.blobs.exists(DEPLOYMENT_KEY)
        two_days_on(b)
        b.gc.interval = timedelta(hours=1)
        with pytest.raises(DeploymentMismatchError) as refused:
            b.gc.run_due()
        assert ("none of the 1 upload(s) and 1 version(s) this database names is in the "
                "storage, yet the collection would delete 3 photo(s) and 1 weights file(s)"
                in refused.value.message)
        with pytest.raises(DeploymentMismatchError, match="none of the 1 upload"):
            b.gc.collect()  # 'selfie-lora gc' too
        assert stored_keys(a.blobs) == before
        assert a.models.weights(user=user, version_id=version.id)
        assert a.operations.bind_deployment() == a.repo.get_deployment_id()
    finally:
        a.close()
        b.close()


def api_and_worker_without_storage_url(tmp_path: Path,
                                       **worker_settings: Any) -> tuple[Services, Services]:
    """An API server and a worker of one deployment (one database) whose worker lacks
    SELFIE_LORA_STORAGE_URL: each keeps its blobs in its own HOME/blobs. The caller closes
    both."""
    api = build_services(make_settings(tmp_path / "api", intake_workers=1),
                         trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    shared_db = f"sqlite:///{(api.settings.home / 'selfie-lora.db').resolve()}"
    worker = build_services(make_settings(tmp_path / "worker", database_url=shared_db,
                                          **worker_settings),
                            trainers={"local": FakeTrainer()},
                            face_analyzer=one_person_analyzer(),
                            generators={"local": FakeGenerator()})
    return api, worker


def test_a_worker_without_the_storage_url_does_not_bind_its_empty_folder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A worker of the scale path whose env lacks SELFIE_LORA_STORAGE_URL: it shares the
    # database but falls back to HOME/blobs, empty. Marking that folder would approve the
    # mismatch (and every training there then fails with "upload the photos again").
    api, worker = api_and_worker_without_storage_url(tmp_path)
    try:
        deployment_id = api.operations.bind_deployment()
        assert deployment_id is not None
        user, _key = api.users.create(name="ann")
        api.training.upload_zip(user=user, data=photo_zip(3))
        # The deployment was bound to the api's store: the worker's refuses (old code: bound).
        with pytest.raises(DeploymentMismatchError) as refused:
            worker.operations.bind_deployment()
        assert not worker.blobs.exists(DEPLOYMENT_KEY)
        assert "is SELFIE_LORA_STORAGE_URL set for this process" in refused.value.message
        # A deployment bound before the database recorded its storage: the worker's empty
        # folder is left unbound with a warning, as before (and its worker refuses to start).
        db = sqlite3.connect(api.settings.home / "selfie-lora.db")
        with db:
            db.execute("UPDATE deployment SET storage_id = NULL")
        db.close()
        worker.operations._decided = None
        with caplog.at_level("WARNING", logger="selfie_lora.services.deployment"):
            assert worker.operations.bind_deployment() is None
        assert not worker.blobs.exists(DEPLOYMENT_KEY)
        assert "is SELFIE_LORA_STORAGE_URL set for this process?" in caplog.text
        assert "names 1 upload(s) and 0 version(s), none of which is in it" in caplog.text
        # A new deployment (nothing named, nothing stored) still binds at its first start.
        assert api.operations.bind_deployment() == deployment_id
    finally:
        api.close()
        worker.close()


def test_an_upgraded_deployment_adopts_the_store_that_holds_its_photos_whichever_starts_first(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A deployment with the 'two folders' mistake from before migration 0021: the API server
    and a worker without SELFIE_LORA_STORAGE_URL each marked their own HOME/blobs with the
    deployment's id, and the database records no storage. After the upgrade the worker starts
    first: its empty folder is not adopted (old code: adopted, and the API server holding every
    photo then refused to start); it is warned, as before 0021, and its worker refuses. The API
    server's store, which holds the photos, is adopted when it starts."""
    api, worker = api_and_worker_without_storage_url(tmp_path)
    try:
        deployment_id = api.operations.bind_deployment()
        assert deployment_id is not None
        user, _key = api.users.create(name="ann")
        api.training.upload_zip(user=user, data=photo_zip(3))
        markers = {}
        for name, services, when in (("api", api, "2026-11-01T00:00:00+00:00"),
                                     ("worker", worker, "2026-11-01T00:00:01+00:00")):
            # The release before wrote markers without a storage_id.
            markers[name] = json.dumps({"deployment_id": deployment_id,
                                        "created_at": when}).encode()
            services.blobs.delete(DEPLOYMENT_KEY)
            services.blobs.put(DEPLOYMENT_KEY, markers[name])
        db = sqlite3.connect(api.settings.home / "selfie-lora.db")
        with db:
            db.execute("UPDATE deployment SET storage_id = NULL")
        db.close()
        for services in (api, worker):
            services.operations._decided = None

        with caplog.at_level("WARNING", logger="selfie_lora.services.deployment"):
            assert worker.operations.bind_deployment() == deployment_id
        assert worker.repo.get_deployment_storage_id() is None  # not adopted
        assert "not recording this storage as the deployment's" in caplog.text
        assert "holds none of the 1 upload(s) and 0 version(s)" in caplog.text
        assert "is SELFIE_LORA_STORAGE_URL set for this process?" in caplog.text
        with pytest.raises(ConfigError, match="is SELFIE_LORA_STORAGE_URL set for this worker"):
            worker.operations.check_worker_storage()
        assert worker.blobs.get(DEPLOYMENT_KEY) == markers["worker"]  # left as it was

        # The API server holding the photos starts: its store is adopted, marker unchanged.
        assert api.operations.bind_deployment() == deployment_id
        adopted = api.repo.get_deployment_storage_id()
        assert adopted is not None
        assert api.blobs.get(DEPLOYMENT_KEY) == markers["api"]
        # The worker's next start now refuses: its folder is not the deployment's storage.
        worker.operations._decided = None
        with pytest.raises(DeploymentMismatchError, match="SELFIE_LORA_STORAGE_URL"):
            worker.operations.bind_deployment()
        assert api.repo.get_deployment_storage_id() == adopted
    finally:
        api.close()
        worker.close()


def test_a_worker_without_the_storage_url_takes_no_training_and_names_the_setting(
        tmp_path: Path) -> None:
    # Left unbound, the worker still took the queued training, which failed telling the user
    # to upload the photos again: the operator's missing setting blamed on the user. It
    # refuses to start, naming the setting, and the training stays queued, untouched.
    api, worker = api_and_worker_without_storage_url(tmp_path, reconcile_seconds=0.2)
    # Old code: the worker runs until a signal; this one ends it, after it had its chance.
    stop = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        assert api.operations.bind_deployment() is not None
        user, _key = api.users.create(name="ann")
        training = api.training.upload_zip(user=user, data=photo_zip(3)).training
        assert training is not None
        stop.start()
        with pytest.raises(ConfigError) as refused:
            run_worker(worker, threads=1)
        stop.cancel()
        assert refused.value.message.startswith("refusing to start: ")
        assert "is SELFIE_LORA_STORAGE_URL set for this process" in refused.value.message
        assert "this process's storage is not the deployment's" in refused.value.message
        after = api.repo.get_training(training.id)
        assert after is not None
        assert after.status == TrainingStatus.QUEUED
        assert (after.attempt, after.lease_owner, after.error) == (training.attempt, None, None)
        # A worker given the deployment's storage is not refused.
        api.operations.check_worker_storage()
    finally:
        stop.cancel()
        api.close()
        worker.close()


def test_a_store_this_process_only_just_marked_is_guarded_at_its_next_collection(
        deployments: tuple[Services, Services]) -> None:
    # B starts first on an empty store and marks it (nothing there to doubt), while A, still on
    # the release before the marker, goes on uploading and training into it: B's first
    # collection checks its listing as an unbound store's instead of trusting its own marker.
    a, b = deployments
    assert b.operations.bind_deployment() is not None
    user, version = trained_version(a)
    before = stored_keys(a.blobs)
    two_days_on(b)
    b.gc.interval = timedelta(hours=1)
    with pytest.raises(DeploymentMismatchError) as refused:
        b.gc.run_due()
    assert "this process only just wrote the storage's deployment.json" in refused.value.message
    assert stored_keys(a.blobs) == before
    assert a.models.weights(user=user, version_id=version.id)


def test_an_upgraded_deployment_binds_at_its_first_start_and_collects(
        deployments: tuple[Services, Services]) -> None:
    # Data from before this release: rows, blobs, no id, no marker. The first start binds;
    # racing starts (threads here, processes in production) agree on one id.
    a, _b = deployments
    trained_version(a)
    orphan = "photos/" + "0" * 64 + ".jpg"
    a.blobs.put(orphan, b"an upload that died before its row")
    assert a.repo.get_deployment_id() is None

    barrier = threading.Barrier(4)
    ids: list[str | None] = []

    def start() -> None:
        barrier.wait()
        ids.append(a.operations.bind_deployment())

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4
    assert len(set(ids)) == 1
    assert ids[0] == a.repo.get_deployment_id()
    assert json.loads(a.blobs.get(DEPLOYMENT_KEY))["deployment_id"] == ids[0]
    assert a.operations.bind_deployment() == ids[0]  # a restart: the same

    two_days_on(a)
    assert a.gc.collect().keys == (orphan,)
    assert a.blobs.exists(DEPLOYMENT_KEY)


def test_two_databases_racing_to_bind_one_fresh_store_one_wins(
        deployments: tuple[Services, Services]) -> None:
    a, b = deployments
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def start(name: str, svc: Services) -> None:
        barrier.wait()
        try:
            outcome[name] = svc.operations.bind_deployment()
        except DeploymentMismatchError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=start, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, v in outcome.items() if isinstance(v, str)]
    assert len(won) == 1
    lost = "b" if won == ["a"] else "a"
    assert isinstance(outcome[lost], DeploymentMismatchError)
    assert DeploymentBinding(repo=a.repo, blobs=a.blobs).store_id() == outcome[won[0]]


def test_a_marker_this_service_did_not_write_is_refused(
        deployments: tuple[Services, Services]) -> None:
    a, _b = deployments
    a.blobs.put(DEPLOYMENT_KEY, b'{"something": "else"}')
    with pytest.raises(DeploymentMismatchError, match="names no deployment id"):
        a.operations.bind_deployment()
    with pytest.raises(DeploymentMismatchError, match="names no deployment id"):
        a.gc.collect()
    assert a.blobs.get(DEPLOYMENT_KEY) == b'{"something": "else"}'


def test_a_worker_s_collection_binds_the_store(deployments: tuple[Services, Services]) -> None:
    # A worker whose start found the store away binds it at its next collection.
    a, _b = deployments
    a.gc.interval = timedelta(hours=1)
    assert not a.blobs.exists(DEPLOYMENT_KEY)
    a.gc.run_due()
    assert DeploymentBinding(repo=a.repo, blobs=a.blobs).store_id() == a.repo.get_deployment_id()


def test_selfie_lora_gc_with_the_wrong_database_refuses_in_one_line(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``selfie-lora gc`` from a shell whose SELFIE_LORA_DATABASE_URL names another (empty)
    database deleted the deployment's photos and weights; now it says why it will not."""
    a = build_services(make_settings(tmp_path, home=home, intake_workers=1),
                       trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                       generators={"local": FakeGenerator()})
    try:
        a.operations.bind_deployment()
        _user, version = trained_version(a)
        a_id = a.repo.get_deployment_id()
    finally:
        a.close()
    weights = home / "blobs" / version.weights_key
    monkeypatch.setenv("SELFIE_LORA_DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    from selfie_lora.config import get_settings

    get_settings.cache_clear()
    for args in (["gc"], ["gc", "--force"], ["gc", "--dry-run"]):
        result = CliRunner().invoke(app_cli(), args)
        assert result.exit_code == 1, result.output
        assert f"gc: refusing to collect garbage: the storage (deployment.json) belongs to " \
               f"deployment {a_id}" in " ".join(result.output.split())
        assert "Traceback" not in result.output
    assert weights.exists()


def app_cli() -> Any:
    from selfie_lora.cli import app

    return app
