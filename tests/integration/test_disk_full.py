"""A full disk (ENOSPC, SQLite's "database or disk is full") is an outage the operator ends by
freeing space, said as one: the worker says it once and waits, instead of a traceback a second.
No real full disk: the database's driver and the file system raise their real errors through
fakes."""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, event

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.config import Settings
from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.domain.recipes import get_recipe
from selfie_lora.errors import BlobStoreUnreachableError, StorageFullError
from selfie_lora.services.ports import TrainingJob
from selfie_lora.services.training import ReconcileReport
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer, InMemoryQueue
from selfie_lora.wiring import Services, build_services
from selfie_lora.worker import Identity, Worker
from tests.conftest import make_settings, one_person_analyzer, serving
from tests.integration.test_operations import samples, value
from tests.support.s3 import S3Server
from tests.support.trainings import HoldClock, store_a_checkpoint, uploaded_training


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class FullDisk:
    """SQLite on a disk that fills up: while ``full``, every statement fails as SQLite's does
    when its file cannot grow."""

    def __init__(self, engine: Engine) -> None:
        self.full = False

        @event.listens_for(engine, "do_execute")
        def _execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")


@pytest.fixture
def database(tmp_path: Path) -> tuple[SqlRepository, FullDisk, Path]:
    path = tmp_path / "selfie-lora.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    return SqlRepository(engine), FullDisk(engine), path


def test_the_database_says_a_full_disk_as_one_naming_its_file(
        database: tuple[SqlRepository, FullDisk, Path]) -> None:
    repo, disk, path = database
    disk.full = True
    with pytest.raises(StorageFullError) as caught:
        repo.get_training("t1", for_update=True)
    assert f"the disk holding {path} is full (" in caught.value.message
    assert "free): database or disk is full" in caught.value.message


class ClaimingTraining:
    """``TrainingService`` at the worker's boundary: its ``run`` claims the training in the
    database first, as the real one does (``_claim``)."""

    def __init__(self, repo: SqlRepository) -> None:
        self.repo = repo
        self.runs = 0
        self.claimed: list[str] = []
        self._lock = threading.Lock()

    def run(self, training_id: str, *, owner: str | None = None,
            stopping: threading.Event | None = None) -> None:
        with self._lock:
            self.runs += 1
        with self.repo.atomic() as tx:
            tx.get_training(training_id, for_update=True)
        with self._lock:
            self.claimed.append(training_id)

    def reconcile(self, *, dead_owners: tuple[str, ...] = (),
                  stopping: threading.Event | None = None) -> ReconcileReport:
        return ReconcileReport()


# Old code: an ERROR with a ~70-line traceback ("the worker failed to run it") for every take of
# the message, about one a second (90 in a minute), until space was freed.
def test_a_worker_whose_database_disk_is_full_says_so_once_and_waits(
        database: tuple[SqlRepository, FullDisk, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    repo, disk, path = database
    disk.full = True
    queue = InMemoryQueue()
    training = ClaimingTraining(repo)
    worker = Worker(training=training, queue=queue, identity=Identity(name="w"),  # type: ignore[arg-type]
                    threads=1, reconcile_seconds=60)
    with caplog.at_level(logging.DEBUG, logger="selfie_lora.worker"):
        worker.start()
        try:
            for _ in range(20):  # the reconciler rings it again and again while it waits
                queue.enqueue_training("t1")
            time.sleep(2.5)
            # Waited between tries (as for a queue outage), not one try per 50 ms.
            assert 2 <= training.runs <= 4
            disk.full = False  # space freed: the next take claims it, with no restart
            _until(lambda: "t1" in training.claimed)
        finally:
            assert worker.stop()
    lines = [r for r in caplog.records if r.name == "selfie_lora.worker"]
    assert [r for r in lines if r.levelno >= logging.ERROR] == []
    [warning] = [r for r in lines if r.levelno == logging.WARNING]
    said = warning.getMessage()
    assert f"the disk holding {path} is full" in said
    assert "tried again every 1 s" in said
    assert "\n" not in said
    assert warning.exc_info is None
    [back] = [r for r in lines if r.levelno == logging.INFO and "again" in r.getMessage()]
    assert "claims again" in back.getMessage()


class _NoRoomCursor(sqlite3.Cursor):
    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if "journal_mode" in sql.lower():
            # What SQLite says when a full disk leaves no room for its -wal and -shm files.
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


class _NoRoomConnection(sqlite3.Connection):
    def cursor(self, factory: Any = _NoRoomCursor) -> Any:
        return super().cursor(factory)


def _no_room_for_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite file opened from now on (the database, the queue) fails as on a full disk.
    SQLAlchemy connects through ``sqlite3.dbapi2``, huey through ``sqlite3``."""
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(*args, **{**kwargs, "factory": _NoRoomConnection})

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)


def _disk_with(free: int) -> Callable[[Any], Any]:
    def usage(_path: Any) -> Any:
        import shutil

        return shutil._ntuple_diskusage(30 * 1024 * 1024, 30 * 1024 * 1024 - free, free)  # type: ignore[attr-defined]
    return usage


# Old code: "error: the database (HOME/selfie-lora.db in SELFIE_LORA_HOME) cannot be used: disk
# I/O error", which sounds like failing hardware.
@pytest.mark.parametrize("argv", [["users", "list"], ["versions", "--user", "ann"]],
                         ids=["users-list", "versions"])
def test_a_command_on_a_full_disk_says_the_disk_is_full_and_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    from typer.testing import CliRunner

    from selfie_lora import disk_space
    from selfie_lora.cli import app
    from selfie_lora.config import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("SELFIE_LORA_HOME", str(home))
    get_settings.cache_clear()
    try:
        made = CliRunner().invoke(app, ["users", "create", "ann"])
        assert made.exit_code == 0, made.output
        _no_room_for_sqlite(monkeypatch)
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(40 * 1024))
        result = CliRunner().invoke(app, argv)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.replace("\n", " ").strip() == (
        f"error: the disk holding SELFIE_LORA_HOME ({home}) is full (40 KB free): free some "
        "space on it, or move SELFIE_LORA_HOME to a disk with room, and run the command again")


# Old code: "... or move SELFIE_LORA_HOME to a disk with room", which leaves a database that
# SELFIE_LORA_DATABASE_URL names on another disk where it is.
def test_a_full_disk_under_a_database_outside_home_says_to_move_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from selfie_lora import disk_space
    from selfie_lora.cli import app
    from selfie_lora.config import get_settings

    database = tmp_path / "elsewhere" / "app.db"
    database.parent.mkdir()
    monkeypatch.setenv("SELFIE_LORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SELFIE_LORA_DATABASE_URL", f"sqlite:///{database}")
    get_settings.cache_clear()
    try:
        made = CliRunner().invoke(app, ["users", "create", "ann"])
        assert made.exit_code == 0, made.output
        _no_room_for_sqlite(monkeypatch)
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(40 * 1024))
        result = CliRunner().invoke(app, ["users", "list"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert result.output.replace("\n", " ").strip() == (
        f"error: the disk holding the database {database} is full (40 KB free): free some space "
        "on it, or move the database to a disk with room (SELFIE_LORA_DATABASE_URL), and run the "
        "command again")


# Old code: "the disk holding SELFIE_LORA_HOME (...) is full (20.0 MB free): free some space on
# it, ...", where df shows room (statvfs does not see a quota) and nothing names the quota.
def test_a_start_over_its_quota_says_the_quota_not_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora import disk_space
    from selfie_lora.cli import _start_failure

    settings = make_settings(tmp_path)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
    over = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(settings.home / "secret"))
    assert _start_failure(settings, over) == (
        f"the quota of this account on the disk holding SELFIE_LORA_HOME ({settings.home}) is "
        "used up (the disk itself has 20.0 MB free): raise the quota or delete files it "
        "counts, or move SELFIE_LORA_HOME to a disk with room, and run the command again")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(settings.home / "secret"))
    assert _start_failure(settings, full) == (
        f"the disk holding SELFIE_LORA_HOME ({settings.home}) is full (20.0 MB free): free some "
        "space on it, or move SELFIE_LORA_HOME to a disk with room, and run the command again")


# Old code: full_disk_words named the disk by its path only, so the command line's start failure
# wrote the quota's sentence again by hand to say "SELFIE_LORA_HOME (PATH)" (two copies of one
# sentence to keep alike). ``label`` names it; the free space is still the path's disk's.
def test_full_disk_words_names_the_disk_by_its_label_with_the_path_s_free_space(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora import disk_space

    monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
    over = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    label = f"SELFIE_LORA_HOME ({tmp_path})"
    assert disk_space.full_disk_words(tmp_path, over, label=label) == (
        f"the quota of this account on the disk holding {label} is used up (the disk itself "
        "has 20.0 MB free)")
    assert disk_space.full_disk_words(tmp_path, full, label=label) == (
        f"the disk holding {label} is full (20.0 MB free)")
    assert disk_space.full_disk_words(tmp_path, full) == (
        f"the disk holding {tmp_path} is full (20.0 MB free)")


def test_a_disk_i_o_error_with_room_to_spare_is_not_called_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from selfie_lora import disk_space
    from selfie_lora.cli import app
    from selfie_lora.config import get_settings

    monkeypatch.setenv("SELFIE_LORA_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert CliRunner().invoke(app, ["users", "create", "ann"]).exit_code == 0
        _no_room_for_sqlite(monkeypatch)
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
        result = CliRunner().invoke(app, ["users", "list"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert "cannot be used: disk I/O error" in result.output


class FullDiskStore(FileSystemBlobStore):
    """The blob folder on a disk that fills up: while ``full``, every write fails as the file
    system's does (ENOSPC, or EDQUOT for a quota)."""

    full = False
    code = errno.ENOSPC

    def _write(self, key: str, fill: Any, *, if_absent: bool) -> bool:
        def no_room(fh: Any) -> None:
            raise OSError(self.code, os.strerror(self.code))

        return super()._write(key, no_room if self.full else fill, if_absent=if_absent)


TOKEN = "m" * 32


# Old code: 500 storage_error "the files or records could not be read or written just now;
# please retry in a moment", and /readyz 200 "ready" the whole time.
def test_the_api_answers_a_full_disk_507_storage_full_and_readyz_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora import disk_space
    from selfie_lora.api.server_errors import server_error_sentence
    from selfie_lora.errors import ErrorCode
    from tests.conftest import auth, make_settings, serving
    from tests.support.photos import synthetic_photo

    settings = make_settings(tmp_path, metrics_token=TOKEN)
    store = FullDiskStore(settings.home / "blobs")
    with serving(settings, blobs=store) as (client, services):
        ann = auth(services, "ann")
        assert client.get("/readyz").status_code == 200
        store.full = True
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(40 * 1024))
        r = client.post("/api/training/upload", headers=ann, data={"start": "false"},
                        files=[("files", ("a.jpg", synthetic_photo(1), "image/jpeg"))])
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["code"] == "storage_full"
        assert error["message"] == server_error_sentence(ErrorCode.STORAGE_FULL)
        assert "disk is full" in error["message"]
        assert "retry in a moment" not in error["message"]
        assert str(tmp_path) not in r.text  # the operator's words stay in the log
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not ready", "checks": {
            "database": "ok", "queue": "ok", "storage": "full"}}
        operator = client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "is full (40 KB free, under the 16.0 MB a ready server keeps)" in (
            operator.json()["checks"]["storage"])
        # Space freed: ready again, and the same upload is taken, with no restart.
        store.full = False
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
        assert client.get("/readyz").status_code == 200
        again = client.post("/api/training/upload", headers=ann, data={"start": "false"},
                            files=[("files", ("a.jpg", synthetic_photo(1), "image/jpeg"))])
        assert again.status_code == 202, again.text
        assert "507" in client.app.openapi()["paths"]["/api/generate"]["post"]["responses"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.ENOSPC], ids=["quota", "full"])
@pytest.mark.parametrize("scripts", [True, False], ids=["script", "form"])
def test_a_page_that_meets_a_used_up_quota_says_the_quota_not_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, scripts: bool) -> None:
    """No page-level test met a quota's 507 (the API's had one, test_api): the photos page's
    upload, sent by its script or by the form without scripts, on a blob disk over its quota
    (EDQUOT) answers 507 in the quota's words, never "the disk is full" (df may show room, and
    freeing space need not help); a full disk (ENOSPC) still says it is full. Neither says the
    server's folders."""
    import html
    import re

    from selfie_lora import disk_space
    from selfie_lora.api.server_errors import STORAGE_QUOTA_MESSAGE, server_error_sentence
    from selfie_lora.errors import ErrorCode
    from tests.integration.test_web import PASSWORD, csrf, sign_in
    from tests.support.photos import synthetic_photo

    settings = make_settings(tmp_path)
    store = FullDiskStore(settings.home / "blobs")
    store.code = code
    with serving(settings, blobs=store) as (client, services):
        services.users.create(name="ann", password=PASSWORD)
        sign_in(client, "ann")
        token = csrf(client)
        store.full = True
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
        photos = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(2)]
        r = (client.post("/photos/upload", files=photos, headers={"X-CSRF-Token": token})
             if scripts else
             client.post("/photos/upload", files=photos, data={"csrf_token": token}))
    assert r.status_code == 507, r.text
    # Headed for what it is, a quota's as a full disk's (old code: "Something went wrong").
    assert "<h1>Out of storage space</h1>" in r.text, r.text
    assert "<title>Out of storage space" in r.text, r.text
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", r.text)).split())
    if code == errno.EDQUOT:
        assert STORAGE_QUOTA_MESSAGE in text, text
        assert "disk is full" not in text, text
        assert "freed space" not in text, text
    else:
        assert server_error_sentence(ErrorCode.STORAGE_FULL) in text, text
    assert 'data-code="storage_full"' in r.text
    assert str(tmp_path) not in r.text  # the operator's words stay in the log


def test_a_blob_write_on_a_full_disk_is_storage_full_naming_the_folder(tmp_path: Path) -> None:
    store = FullDiskStore(tmp_path / "blobs")
    store.full = True
    with pytest.raises(StorageFullError) as caught:
        store.put("photos/a.jpg", b"x")
    assert caught.value.http_status == 507
    assert not caught.value.quota
    assert f"the disk holding {tmp_path / 'blobs'} is full" in caught.value.message
    assert "No space left on device" in caught.value.message


# Old code: "the disk holding BLOBS is full (20.0 MB free): Disk quota exceeded", where df shows
# room (statvfs does not see a quota) and nothing says a quota is the limit.
def test_a_blob_write_over_the_quota_says_the_quota_not_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora import disk_space

    monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
    store = FullDiskStore(tmp_path / "blobs")
    store.full, store.code = True, errno.EDQUOT
    with pytest.raises(StorageFullError) as caught:
        store.put("photos/a.jpg", b"x")
    assert caught.value.http_status == 507
    assert caught.value.quota
    assert caught.value.message == (
        f"blob 'photos/a.jpg' cannot be written: the quota of this account on the disk holding "
        f"{tmp_path / 'blobs'} is used up (the disk itself has 20.0 MB free): Disk quota exceeded")


class _WeightsDisk(FullDiskStore):
    """Only the weights' writes find the disk full (the checkpoints were stored before)."""

    def _write(self, key: str, fill: Any, *, if_absent: bool) -> bool:
        if not key.startswith("weights/"):
            return FileSystemBlobStore._write(self, key, fill, if_absent=if_absent)
        return super()._write(key, fill, if_absent=if_absent)


# Old code: each try stepped away at once and counted, so the 4th run failed the training
# ("stopped after 3 interrupted attempts") and dropped its checkpoint.
@pytest.mark.parametrize("where", ["weights blob", "LoRA write", "worker's own write",
                                   "database"])
def test_a_local_training_on_a_full_disk_waits_without_spending_its_attempts_and_finishes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    settings = make_settings(tmp_path)
    blobs = _WeightsDisk(settings.blob_dir)
    full = {"now": False}

    def train(job: TrainingJob) -> None:
        assert job.checkpoints is not None
        if job.resume_from is None:  # the first attempt stores a checkpoint
            ckpt = job.work_dir / "step-2.ckpt"
            ckpt.write_bytes(b"checkpoint at step 2")
            job.checkpoints.save(ckpt, step=2)
        if full["now"] and where == "LoRA write":
            # What the local trainer raises for the child's ENOSPC (``_child_error``).
            raise StorageFullError(f"the trained LoRA cannot be written to {job.work_dir}: "
                                   "No space left on device")
        if full["now"] and where == "worker's own write":
            raise OSError(errno.ENOSPC, "No space left on device")
        if where == "database":
            # The database's disk: its next write (the trainer's progress) is refused, and so
            # is the write that would record the wait.
            database.full = full["now"]

    trainer = FakeTrainer(on_train=train)
    clock = HoldClock()
    services = build_services(settings, trainers={"local": trainer}, blobs=blobs,
                              generators={"local": FakeGenerator()},
                              face_analyzer=one_person_analyzer(), clock=clock.now)
    database = FullDisk(services.repo._engine)  # type: ignore[attr-defined]
    try:
        training_id, training = uploaded_training(services)

        blobs.full = where == "weights blob"
        full["now"] = True
        caplog.set_level(logging.DEBUG, logger="selfie_lora")
        gaps = []
        for _ in range(6):
            services.training.run(training_id)
            database.full = False  # for the test's reads
            t = training()
            assert not t.status.is_terminal, t.error  # old code: counted, failed at the 4th
            assert t.recoveries == 0
            assert t.lease_expires_at is not None
            if where != "database":  # there the wait could not be written: the lease runs out
                assert t.error is not None
                assert "is full" in t.error
                gaps.append((t.lease_expires_at - clock.now()).total_seconds())
            # Waiting: a ring meanwhile claims nothing.
            services.training.run(training_id)
            assert training().attempt == t.attempt
            clock.past(t)
        assert gaps == ([] if where == "database" else [5, 15, 30, 60, 60, 60])
        assert services.training.checkpoint_step(training_id=training_id) == 2
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "waits without spending its attempts" in warnings[0].getMessage()

        caplog.clear()
        blobs.full = False
        full["now"] = False
        services.training.run(training_id)
        t = training()
        assert t.status is TrainingStatus.SUCCEEDED, t.error
        assert trainer.jobs[-1].resume_from is not None  # from the checkpoint kept
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
                and "room again" in r.getMessage()]
        assert len(said) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        services.close()


def _local_services(settings: Settings, trainer: FakeTrainer, *, clock: HoldClock) -> Services:
    """The services of a local ``trainer``'s trainings, on a blob store with room."""
    return build_services(settings, trainers={"local": trainer},
                          blobs=FileSystemBlobStore(settings.blob_dir),
                          generators={"local": FakeGenerator()},
                          face_analyzer=one_person_analyzer(), clock=clock.now)


# Old code: the fetch of the checkpoint to resume from, on a full disk or over the quota, was a
# plain StorageError, counted as an attempt: a training resuming there spent its attempts and
# FAILED ("stopped after 3 interrupted attempts"), said as the storage being unreachable.
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_training_resuming_onto_a_full_disk_waits_without_spending_its_attempts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    from selfie_lora.services import checkpoints as checkpoint_service

    settings = make_settings(tmp_path)

    def train(job: TrainingJob) -> None:
        if job.resume_from is None:  # the first attempt stores a checkpoint, then is stopped
            store_a_checkpoint(job)
            raise OSError(errno.ENOSPC, "No space left on device")

    def refused(path: Path) -> Any:
        raise OSError(code, os.strerror(code), str(path))

    trainer = FakeTrainer(on_train=train)
    clock = HoldClock()
    services = _local_services(settings, trainer, clock=clock)
    try:
        training_id, training = uploaded_training(services)
        services.training.run(training_id)
        clock.past(training())
        assert services.training.checkpoint_step(training_id=training_id) == 2
        # Every later attempt's fetch of that checkpoint finds no room.
        monkeypatch.setattr(checkpoint_service, "private_replacement", refused)
        for _ in range(6):
            services.training.run(training_id)
            t = training()
            assert not t.status.is_terminal, t.error  # old code: failed at the 4th
            assert t.recoveries == 0
            assert t.error is not None
            assert t.error.startswith("a disk quota of the server is used up: "
                                      if code == errno.EDQUOT else
                                      "a disk of the server is full: "), t.error
            clock.past(t)
        monkeypatch.undo()
        services.training.run(training_id)
        t = training()
        assert t.status is TrainingStatus.SUCCEEDED, t.error
        assert trainer.jobs[-1].resume_from is not None  # from the checkpoint kept
    finally:
        services.close()


# Old code: the child sent its traceback, logged as a WARNING at every try, and the worker got a
# plain StorageError (counted) for the LoRA write, a failed training for any other ENOSPC.
@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),
    StorageFullError("the trained LoRA cannot be written to /w/lora.safetensors: No space left "
                     "on device")])
def test_the_training_child_says_a_full_disk_in_one_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        raised: Exception) -> None:
    import queue

    from selfie_lora.adapters.flux import trainer as local

    def run(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise raised

    monkeypatch.setattr(local, "_run", run)
    events: queue.Queue[tuple[Any, ...]] = queue.Queue()
    with pytest.raises(SystemExit):
        local._child_train(SimpleNamespace(out_path=Path("/w/lora.safetensors")),  # type: ignore[arg-type]
                           events, threading.Event())
    message = events.get_nowait()
    assert message[0] == "error"
    assert message[1] == "StorageFullError"
    assert "No space left on device" in message[2]
    if isinstance(raised, OSError):  # said as inline isolation says it (``_full_disk_error``)
        assert message[2] == (f"this machine's disk is full: OSError: [Errno {errno.ENOSPC}] "
                              "No space left on device")
    else:  # ours already says what is full: passed on as it is
        assert message[2] == str(raised)
    assert "\n" not in message[2]
    assert message[4] == ""  # no traceback
    caplog.set_level(logging.DEBUG, logger="selfie_lora")
    mapped = local.LocalTrainer._child_error(message)
    assert isinstance(mapped, StorageFullError)
    assert not mapped.quota  # a full disk, said as one
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _quota_words(path: Path) -> str:
    """What a training over its quota at ``path`` says, with 20.0 MB free (``_disk_with``)."""
    return (f"the quota of this account on the disk holding {path} is used up (the disk itself "
            f"has 20.0 MB free): OSError: [Errno {errno.EDQUOT}] {os.strerror(errno.EDQUOT)}")


# Old code: the row said "a disk of the server is full (this machine's disk is full: OSError:
# [Errno 122] Disk quota exceeded: ...)", where df shows room and nothing names the quota; then
# (the row's detail dropped) "a disk of the server is full: the training waits for space to be
# freed", and the WARNING still advised "free space on that disk".
@pytest.mark.parametrize("where", ["worker's own write", "trainer"])
def test_a_training_over_its_quota_waits_saying_the_quota_not_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, where: str) -> None:
    from selfie_lora import disk_space

    settings = make_settings(tmp_path)
    written: list[Path] = []

    def train(job: TrainingJob) -> None:
        written.append(job.work_dir / "photo-0.png")
        if where == "trainer":  # what the local trainer raises for its child's EDQUOT
            raise StorageFullError(_quota_words(written[-1]), quota=True)
        # A write of the worker's own (no adapter's), over the account's quota.
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(written[-1]))

    services = build_services(settings, trainers={"local": FakeTrainer(on_train=train)},
                              blobs=FileSystemBlobStore(settings.blob_dir),
                              generators={"local": FakeGenerator()},
                              face_analyzer=one_person_analyzer(), clock=HoldClock().now)
    try:
        training_id, training = uploaded_training(services)
        monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
        caplog.set_level(logging.WARNING, logger="selfie_lora")
        services.training.run(training_id)
        t = training()
        assert not t.status.is_terminal, t.error
        assert t.recoveries == 0
        assert t.error is not None
        words = _quota_words(written[-1])
        # The quota's words (with the folder) are the operator's, in the WARNING; the row's
        # error is the user's, with no path (test_a_training_waiting_for_room_shows_...).
        assert words not in t.error, t.error
        assert str(settings.home) not in t.error, t.error
        assert "this machine's disk is full" not in t.error
        assert t.error == ("a disk quota of the server is used up: the training waits for the "
                           "quota to be raised or files it counts to be deleted and goes on by "
                           "itself then, from its last checkpoint"), t.error
        assert "is full" not in t.error
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1, said
        assert words in said[0], said
        assert "free space on that disk" not in said[0], said
        assert ("raise the quota or delete files it counts and it goes on by itself"
                in said[0]), said
    finally:
        services.close()


# Old code: "this machine's disk is full: OSError: [Errno 122] Disk quota exceeded".
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_the_training_loop_says_a_scratch_write_over_its_quota_as_the_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    from selfie_lora import disk_space
    from selfie_lora.adapters.flux import train_loop

    def load(*_args: Any, **_kwargs: Any) -> Any:
        # The photos' cache, written while the base loads, finds no room.
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(train_loop, "load_training_base", load)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
    out = tmp_path / "work" / "lora.safetensors"
    full = _tiny_training_on_a_full_disk(tmp_path, photo=b"x")
    assert full.quota is (code == errno.EDQUOT)  # what the worker says it as
    if code == errno.EDQUOT:
        assert full.message == _quota_words(out.parent)
    else:
        assert full.message == (
            f"this machine's disk is full: OSError: [Errno {code}] {os.strerror(code)}")


# Old code: the trained LoRA's write over the quota (the biggest file a local training writes)
# was StorageFullError(quota=False): said as a full disk, "free space on that disk", where df
# shows room.
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_the_training_loop_says_the_lora_write_over_its_quota_as_the_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    from PIL import Image

    from selfie_lora.adapters.flux import train_loop

    def save(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(train_loop, "save_lora", save)
    photo = io.BytesIO()  # a real one, so the training gets to its end
    Image.new("RGB", (256, 256), (120, 90, 60)).save(photo, "PNG")
    full = _tiny_training_on_a_full_disk(tmp_path, photo=photo.getvalue())
    assert full.quota is (code == errno.EDQUOT)  # what the worker says it as
    out = tmp_path / "work" / "lora.safetensors"
    assert full.message == f"the trained LoRA cannot be written to {out}: {os.strerror(code)}"


def _tiny_training_on_a_full_disk(tmp_path: Path, *, photo: bytes) -> StorageFullError:
    """What a tiny local training of ``photo`` into ``tmp_path/work`` raises, on a disk made
    full by the caller."""
    from selfie_lora.adapters.flux import train_loop
    from selfie_lora.adapters.flux.tiny import TINY

    with pytest.raises(StorageFullError) as caught:
        train_loop.train_flux_lora(pipeline_source=TINY, cache_dir=tmp_path / "cache",
                                   photos=[(photo, "a photo")], recipe=get_recipe("local-tiny-v1"),
                                   out_path=tmp_path / "work" / "lora.safetensors",
                                   device="cpu", num_threads=1)
    return caught.value


# Old code: the child said "OSError: [Errno 122] Disk quota exceeded", inline isolation "this
# machine's disk is full: OSError: [Errno 122] Disk quota exceeded".
@pytest.mark.parametrize("isolation", ["child", "inline"])
def test_the_local_trainer_says_a_write_over_its_quota_as_the_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str) -> None:
    import queue

    from selfie_lora import disk_space
    from selfie_lora.adapters.flux import trainer as local

    def run(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(local, "_run", run)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
    work = tmp_path / "work"
    request = SimpleNamespace(out_path=work / "lora.safetensors")
    if isolation == "child":
        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        with pytest.raises(SystemExit):
            local._child_train(request, events, threading.Event())  # type: ignore[arg-type]
        message = events.get_nowait()
        # Named as a full disk's, in the five slots a parent of the previous release reads
        # (the fork server may run a new child under an old parent during an upgrade): that
        # parent knew no other name and failed the training for good ("StorageFullError(quota)"
        # in old code); the quota rides in the user_message slot, which it ignores there.
        assert len(message) == 5
        assert message[1] == "StorageFullError"
        mapped = local.LocalTrainer._child_error(message)
    else:
        trainer = local.LocalTrainer(base_model="tiny", cache_dir=tmp_path / "cache",
                                     isolation="inline", device="cpu")
        keep = local._Keepers(checkpoints=local._Keeper(None),
                              samples=local._Keeper(None, what="sample"))
        with pytest.raises(StorageFullError) as caught:
            trainer._train_inline(request, None, keep)  # type: ignore[arg-type]
        mapped = caught.value
    assert isinstance(mapped, StorageFullError)
    assert mapped.message == _quota_words(work)
    assert mapped.quota  # through the child's message too: the worker says a quota


def test_train_in_the_terminal_says_once_that_it_waits_for_room() -> None:
    from rich.console import Console

    from selfie_lora.console import follow_training

    now = datetime.now(UTC)
    base = Training(id="t1", model_id="m", dataset_id="d", backend="local",
                    status=TrainingStatus.PROCESSING, is_retraining=False, trigger_word="x",
                    destination="", trainer_version="", recipe=get_recipe("local-tiny-v1"),
                    preserved={}, created_at=now)
    waiting = dataclasses.replace(base, error="a disk of the server is full (no room)",
                                  lease_expires_at=now + timedelta(minutes=1))
    rows = iter([waiting, waiting, waiting,
                 dataclasses.replace(base, status=TrainingStatus.SUCCEEDED)])
    out = Console(file=io.StringIO(), width=300)
    follow_training(lambda: next(rows), out=out, interval=0.0)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert text.count("waiting: a disk of the server is full (no room)") == 1
    assert "Ctrl-C" in text


class _WritesRefused:
    """A full database disk as PostgreSQL has one (SQLSTATE 53100 on a write), and SQLite when
    only the commit needs new room: while ``full``, reads go through and every write fails."""

    def __init__(self, engine: Engine) -> None:
        self.full = False

        @event.listens_for(engine, "do_execute")
        def _execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
            if self.full and not statement.lstrip().upper().startswith(("SELECT", "BEGIN")):
                raise sqlite3.OperationalError("database or disk is full")


# Old code: the claim tried while the disk was still full dropped the worker's mark before its
# own write was refused, so the claim after space was freed counted a take-over from itself
# ("takes it over from <itself>") and the 3rd outage failed it ("its worker stopped 3 times").
def test_claims_refused_by_a_still_full_database_disk_keep_the_wait_uncounted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)
    full = {"now": False}

    def train(job: TrainingJob) -> None:
        if job.resume_from is None:
            store_a_checkpoint(job)
        # The database's disk fills during the attempt: its next write (the progress) is
        # refused, and so is the write that would record the wait.
        database.full = full["now"]

    trainer = FakeTrainer(on_train=train)
    clock = HoldClock()
    services = _local_services(settings, trainer, clock=clock)
    database = _WritesRefused(services.repo._engine)  # type: ignore[attr-defined]
    try:
        training_id, training = uploaded_training(services)  # its reads go through: writes fail

        caplog.set_level(logging.DEBUG, logger="selfie_lora")
        full["now"] = True
        for _ in range(4):  # outages: more than the 3 attempts a training may spend
            services.training.run(training_id)  # claimed, then left: the wait is not written
            assert database.full
            t = training()
            assert t.recoveries == 0
            clock.past(t)  # its lease runs out while the disk is still full
            for _ in range(2):  # the worker retries the message while the database is full
                with pytest.raises(StorageFullError):
                    services.training.run(training_id)
            database.full = False  # space freed: the next claim goes through
        full["now"] = False
        services.training.run(training_id)
        t = training()
        assert t.status is TrainingStatus.SUCCEEDED, t.error  # old code: failed, 3 take-overs
        assert t.recoveries == 0
        assert not [r for r in caplog.records if "takes it over" in r.getMessage()]
    finally:
        services.close()


def _refuse_lora_writes(monkeypatch: pytest.MonkeyPatch, code: int,
                        refused: Callable[[], bool]) -> None:
    """The Replicate trainer's write of the downloaded LoRA refused with ``code`` while
    ``refused()``."""
    from selfie_lora.adapters.replicate import trainer as replicate_trainer

    real_write = replicate_trainer._write_atomically

    def write(path: Path, data: bytes) -> None:
        if refused():
            raise OSError(code, os.strerror(code), str(path))
        real_write(path, data)

    monkeypatch.setattr(replicate_trainer, "_write_atomically", write)


_Blobs = TypeVar("_Blobs", bound=FileSystemBlobStore)


def _replicate_services(
        tmp_path: Path, standin: Any, clock: Any,
        blobs_at: Callable[[Path], _Blobs]) -> tuple[Services, _Blobs]:
    """Services training on the Replicate stand-in, on ``clock``, with the blob store
    ``blobs_at(blob_dir)``."""
    from selfie_lora.adapters.replicate.session import ReplicateConnection
    from selfie_lora.adapters.replicate.trainer import ReplicateTrainer
    from tests.integration.test_trainer_outage import OWNER

    settings = make_settings(tmp_path, trainer="replicate", replicate_owner=OWNER,
                             replicate_api_token=standin.token,
                             replicate_base_url=standin.base_url)
    trainer = ReplicateTrainer(connection=ReplicateConnection(
        api_token=standin.token, base_url=standin.base_url, max_retries=2,
        sleep=clock.sleep), owner=OWNER, poll_interval=0.0)
    blobs = blobs_at(settings.blob_dir)
    return build_services(settings, trainers={"replicate": trainer}, blobs=blobs,
                          generators={"replicate": FakeGenerator(backend="replicate")},
                          face_analyzer=one_person_analyzer(), clock=clock.now), blobs


# Old code: the row said it went on "from its last checkpoint" (a remote run has none); the LoRA
# write's ENOSPC was a plain StorageError, counted (failed after 3 attempts, "could not be
# written on the worker's disk"); and the blob write's wait ended, once Replicate's output had
# expired, in Replicate's sentence ("could no longer be downloaded from Replicate"), the full
# disk never named. Over a quota (EDQUOT) the row said the quota while it waited, but the expiry
# still said "a disk of the server was full ... Free space on the server's disk".
@pytest.mark.parametrize("where", ["weights blob", "LoRA write", "LoRA write over the quota",
                                   "weights blob over the quota"])
def test_a_replicate_training_on_a_full_disk_waits_and_names_the_disk_when_its_output_expired(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    from selfie_lora.testing.replicate_standin import ReplicateStandIn
    from tests.integration.test_trainer_outage import FakeClock

    code = errno.EDQUOT if where.endswith("over the quota") else errno.ENOSPC
    # The worker's disk stays full.
    _refuse_lora_writes(monkeypatch, code, lambda: where.startswith("LoRA write"))
    clock = FakeClock()
    with ReplicateStandIn() as standin:
        services, blobs = _replicate_services(tmp_path, standin, clock, _WeightsDisk)
        blobs.full = where.startswith("weights blob")
        blobs.code = code
        try:
            training_id, training = uploaded_training(services)

            began = clock.now()
            for _ in range(3):
                services.training.run(training_id)
                t = training()
                assert not t.status.is_terminal, t.error  # old code (LoRA write): counted
                assert t.recoveries == 0
                assert t.error is not None
                assert t.error.startswith("a disk quota of the server is used up: "
                                          if code == errno.EDQUOT else
                                          "a disk of the server is full: "), t.error
                assert "checkpoint" not in t.error  # old code: "from its last checkpoint"
                act = ("raise the quota or delete files it counts" if code == errno.EDQUOT
                       else "free space")
                assert ("downloading its trained LoRA from Replicate again (Replicate keeps a "
                        f"finished run's output about an hour, so {act} before then)"
                        in t.error)
                clock.past_the_hold(t)
            # Nobody freed space within the hour: Replicate has dropped the run's output.
            expired_at = began + timedelta(hours=1)
            standin.fail_while("GET", "/files/trainings/*", lambda: clock.now() > expired_at,
                               status=404)
            clock.sleep(3600)
            services.training.run(training_id)
            t = training()
            assert t.status is TrainingStatus.FAILED, t.error
            assert t.recoveries == 0
            assert t.error is not None
            assert "could no longer be downloaded from Replicate" not in t.error
            if code == errno.EDQUOT:
                assert t.error.startswith("The training finished, but a disk quota of the server "
                                          "was used up for 1 h"), t.error
                assert ("so its LoRA file could not be stored, and meanwhile Replicate let the "
                        "trained output expire (it keeps it about an hour). Raise the server's "
                        "disk quota or delete files it counts (or ask its operator to) and start "
                        "the training again." in t.error), t.error
                assert "full" not in t.error, t.error
                assert "Free space" not in t.error, t.error
            else:
                assert t.error.startswith("The training finished, but a disk of the server was "
                                          "full for 1 h")
                assert ("so its LoRA file could not be stored, and meanwhile Replicate let the "
                        "trained output expire (it keeps it about an hour). Free space on the "
                        "server's disk (or ask its operator to) and start the training again."
                        in t.error)
        finally:
            services.close()


class _WeightsAway(FileSystemBlobStore):
    """The object storage away for the weights' writes only, while ``away``."""

    away = False

    def _write(self, key: str, fill: Any, *, if_absent: bool) -> bool:
        if self.away and key.startswith("weights/"):
            raise BlobStoreUnreachableError("the object storage could not be reached")
        return super()._write(key, fill, if_absent=if_absent)


# Old code: the wait for room was noted until the run's step moved, which a finished run's never
# does: the disk freed (the quota raised) and the output written, its expiry while the object
# storage was away was still told as the disk ("The training finished, but a disk quota of the
# server was used up for 1 h 2 min ... Raise the server's disk quota ..."), not the storage.
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_replicate_output_expiring_after_the_disk_had_room_again_names_the_storage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    from selfie_lora.testing.replicate_standin import ReplicateStandIn
    from tests.integration.test_trainer_outage import FakeClock

    full = {"now": True}
    _refuse_lora_writes(monkeypatch, code, lambda: full["now"])
    clock = FakeClock()
    with ReplicateStandIn() as standin:
        services, blobs = _replicate_services(tmp_path, standin, clock, _WeightsAway)
        try:
            training_id, training = uploaded_training(services)
            began = clock.now()
            services.training.run(training_id)
            t = training()
            assert t.error is not None
            assert t.error.startswith("a disk"), t.error
            clock.past_the_hold(t)
            # 50 minutes later the disk has room (the quota raised); the object storage is away.
            clock.sleep(50 * 60)
            full["now"] = False
            blobs.away = True
            services.training.run(training_id)
            t = training()
            assert not t.status.is_terminal, t.error
            assert t.error is not None
            assert "object storage" in t.error, t.error
            clock.past_the_hold(t)
            expired_at = began + timedelta(hours=1)
            standin.fail_while("GET", "/files/trainings/*", lambda: clock.now() > expired_at,
                               status=404)
            clock.sleep(11 * 60)
            services.training.run(training_id)
            t = training()
            assert t.status is TrainingStatus.FAILED, t.error
            assert t.error == ("The training finished, but the server's storage could not be "
                               "reached to store its LoRA file, and while the training waited "
                               "for it Replicate let the trained output expire (it keeps it "
                               "about an hour). Nothing is wrong with your photos: start the "
                               "training again."), t.error
        finally:
            services.close()


# Old code: the row's error (which GET /api/training/progress and `selfie-lora train` show the
# user) said the operator's words: "a disk of the server is full (the quota of this account on the
# disk holding HOME/work/ID/attempt-1 is used up (the disk itself has 20.0 MB free): ...)", and a
# full blob store "(blob '...' cannot be written: the disk holding HOME/blobs is full (...))".
@pytest.mark.parametrize("where", ["quota", "weights blob"])
def test_a_training_waiting_for_room_shows_its_user_no_server_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        where: str) -> None:
    from selfie_lora import disk_space

    settings = make_settings(tmp_path)
    blobs = _WeightsDisk(settings.blob_dir)
    blobs.full = where == "weights blob"

    def train(job: TrainingJob) -> None:
        if where == "quota":  # a write on an open file: the error names no file
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(disk_space.shutil, "disk_usage", _disk_with(20 * 1024 * 1024))
    with serving(settings, blobs=blobs, trainer=FakeTrainer(on_train=train),
                 clock=HoldClock().now) as (client, services):
        training_id, training = uploaded_training(services)
        ann = services.users.get_by_name(name="ann")
        _key, secret = services.users.create_key(user=ann)
        caplog.set_level(logging.WARNING, logger="selfie_lora")
        services.training.run(training_id)
        assert not training().status.is_terminal, training().error
        r = client.get("/api/training/progress", params={"training_id": training_id},
                       headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        error = r.json()["training"]["error"]
        assert error is not None
        assert error.startswith("a disk quota of the server is used up: " if where == "quota"
                                else "a disk of the server is full: "), error
        assert str(settings.home) not in error, error
        assert "free" not in error.split(":")[0], error  # nor the disk's free space
        # The operator's WARNING keeps the folder and its free space.
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1, said
        folder = settings.home / ("work" if where == "quota" else "blobs")
        assert str(folder) in said[0], said
        assert "20.0 MB free" in said[0], said


# Old code: no such gauge: a training waiting for room was one more unfinished training in
# selfie_lora_trainings, its wait only in its row's error sentence.
def test_metrics_count_the_trainings_waiting_for_room(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    blobs = _WeightsDisk(settings.blob_dir)
    clock = HoldClock()
    with serving(settings, blobs=blobs, clock=clock.now) as (client, services):
        training_id, training = uploaded_training(services)
        blobs.full = True  # its LoRA cannot be stored: it waits for room
        services.training.run(training_id)
        t = training()
        assert t.lease_owner is None
        assert not t.status.is_terminal, t.error
        assert t.error is not None
        assert "is full" in t.error
        found = samples(client.get("/metrics").text)
        assert value(found, "selfie_lora_trainings_waiting", reason="full_disk") == 1
        assert value(found, "selfie_lora_trainings_waiting", reason="object_storage") == 0
        clock.past(t)
        found = samples(client.get("/metrics").text)
        assert value(found, "selfie_lora_trainings_waiting", reason="full_disk") == 0


# Old code: the blob cache turned both into a plain StorageError, 500 storage_error "please
# retry in a moment"; and a quota (EDQUOT) did not even evict the copies nobody holds. Later,
# the quota's 507 said "the server's disk is full ... once they have freed space".
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_generation_whose_weights_cannot_be_copied_to_a_full_disk_is_507_storage_full(
        code: int, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from selfie_lora.adapters.storage import cache as cache_module
    from selfie_lora.api.server_errors import server_error_sentence
    from selfie_lora.errors import ErrorCode
    from tests.support.owners import own_model

    settings = make_settings(tmp_path, **s3_server.settings(s3_server.new_location()))
    with serving(settings, run_worker=True) as (client, services):
        owner = own_model(client, services, "ann")
        [version] = services.models.versions(user=services.users.get_by_name(name="ann"))
        services.blobs.forget_local_copy(version.weights_key)  # this machine has no copy
        fsync = os.fsync

        def full(fd: int) -> None:
            # The cache's copies only (a file system with delayed allocation, or NFS, says a
            # full disk or quota at the fsync): the database and the queue write as before.
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(settings.blob_cache_dir)):
                raise OSError(code, os.strerror(code))
            fsync(fd)

        monkeypatch.setattr(cache_module.os, "fsync", full)
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["code"] == "storage_full"
        # Said as the quota it is (old code: "the server's disk is full", for both).
        assert error["message"] == server_error_sentence(ErrorCode.STORAGE_FULL,
                                                         quota=code == errno.EDQUOT)
        assert ("disk quota of the server is used up" in error["message"]) == (
            code == errno.EDQUOT)
        if code == errno.ENOSPC:
            assert f"the disk holding {settings.blob_cache_dir} is full" in caplog.text
            assert "lower SELFIE_LORA_BLOB_CACHE_GB or free disk space" in caplog.text
        else:  # statvfs does not see a quota: the disk may have room, the quota has none
            assert (f"the quota of this account on the disk holding {settings.blob_cache_dir} "
                    "is used up") in caplog.text
            assert ("raise the quota or delete files it counts on this machine, or lower "
                    "SELFIE_LORA_BLOB_CACHE_GB") in caplog.text
            assert "is full" not in caplog.text
        # No partial copy left behind (the cache's temporary files are dot-files).
        assert not list(settings.blob_cache_dir.rglob(f"{cache_module.TMP_PREFIX}*"))
        monkeypatch.undo()  # space freed: it generates, with no restart
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert r.status_code == 200, r.text
