"""A full disk (ENOSPC, SQLite's "database or disk is full") is an outage the operator ends by
freeing space, said as one: the worker says it once and waits, instead of a traceback a second.
No real full disk: the database's driver and the file system raise their real errors through
fakes."""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.errors import StorageFullError
from selfie_lora.services.training import ReconcileReport
from selfie_lora.testing.fakes import InMemoryQueue
from selfie_lora.worker import Identity, Worker


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

    def reconcile(self, *, dead_owners: tuple[str, ...] = ()) -> ReconcileReport:
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
    system's does (ENOSPC)."""

    full = False

    def _write(self, key: str, fill: Any, *, if_absent: bool) -> bool:
        def no_room(fh: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

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


def test_a_blob_write_on_a_full_disk_is_storage_full_naming_the_folder(tmp_path: Path) -> None:
    store = FullDiskStore(tmp_path / "blobs")
    store.full = True
    with pytest.raises(StorageFullError) as caught:
        store.put("photos/a.jpg", b"x")
    assert caught.value.http_status == 507
    assert f"the disk holding {tmp_path / 'blobs'} is full" in caught.value.message
    assert "No space left on device" in caught.value.message
