"""A worker's periodic loops (the reconciler, garbage collection, the settling of erasure holds,
the finishing of interrupted account deletions) on a database or disk that refuses them for a
state that lasts: the database's disk full, its pool's connections all taken, a read-only
standby after a fail-over, this machine's disk full while a blob is written. Found in review:
each round logged an ERROR with a full traceback (the reconciler's every 10 s, for as long as
it lasted), where the presence loop said the same refusal once; now every loop says it once at
WARNING, each retry at DEBUG (with its traceback, for whoever debugs), and its end once at INFO,
while any other error (a defect) keeps its ERROR and traceback at every round. No real full disk
or standby: the drivers' and the file system's real errors are raised through fakes."""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.exc import DBAPIError, InternalError
from sqlalchemy.pool import QueuePool

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.errors import (
    DatabaseLockedError,
    DatabaseRefusedError,
    StorageError,
    StorageFullError,
)
from selfie_lora.services.common import QUOTA_USED_UP, refusal_said
from selfie_lora.services.training import ReconcileReport
from selfie_lora.testing.fakes import InMemoryQueue
from selfie_lora.worker import Identity, Worker


class _PgReadOnly(sqlite3.OperationalError):
    """A driver's error as psycopg raises it on a read-only standby: SQLSTATE 25006
    (read_only_sql_transaction), carried as ``sqlstate``."""

    sqlstate = "25006"


class _PgQuota(sqlite3.OperationalError):
    """A driver's error as psycopg raises it over a used-up quota on the server's disk: no
    SQLSTATE of its own (internal_error, where ENOSPC is disk_full), the C library's words in
    the message."""

    sqlstate = "XX000"


def _refusing(tmp_path: Path, error: Exception) -> SqlRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'selfie-lora.db'}")
    upgrade(engine)

    @event.listens_for(engine, "do_execute")
    def _execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        raise error

    return SqlRepository(engine)


@pytest.mark.parametrize("error", [
    sqlite3.OperationalError("attempt to write a readonly database"),
    _PgReadOnly("cannot execute UPDATE in a read-only transaction")],
    ids=["sqlite", "postgresql"])
def test_a_read_only_database_is_a_refusal(tmp_path: Path, error: Exception) -> None:
    repo = _refusing(tmp_path, error)
    with pytest.raises(DatabaseRefusedError) as caught:
        repo.get_training("t1", for_update=True)
    assert caught.value.message == f"database error: {error}"


def test_a_used_up_quota_on_the_database_server_is_a_refusal_said_as_a_quota(
        tmp_path: Path) -> None:
    # Old code: a StorageError (a defect, its traceback at every round of every loop), and no
    # error of the database ever a quota, so the heartbeat's and the loops' quota words were
    # never said of it.
    repo = _refusing(tmp_path, _PgQuota(
        'could not extend file "base/16384/16397": Disk quota exceeded'))
    with pytest.raises(StorageFullError) as caught:
        repo.get_training("t1", for_update=True)
    assert caught.value.quota
    assert refusal_said(caught.value) == QUOTA_USED_UP
    assert "quota" in caught.value.message.split(": Disk quota exceeded")[0], caught.value.message
    assert "is full" not in caught.value.message


@pytest.mark.parametrize("words", ["Disk quota exceeded", "Quota exceeded",
                                   "Disc quota exceeded"], ids=["glibc", "musl", "bsd"])
def test_a_postgresql_servers_quota_is_worded_where_the_repository_translates_it(
        words: str) -> None:
    # The test above takes the SQLite branch of the words (its engine is SQLite's), so the
    # PostgreSQL server's words were never checked (review 3, B2). psycopg's own XX000 error,
    # with the message a server gives when a quota stops it extending a table's file (the C
    # library's words for EDQUOT: glibc's, musl's in the alpine images, BSD's and macOS's),
    # wrapped as SQLAlchemy wraps it. No server: the engine connects only when used.
    errors = pytest.importorskip("psycopg.errors")  # the postgres extra
    engine = make_engine("postgresql+psycopg://selfie@127.0.0.1:1/selfie")
    repo = SqlRepository(engine)
    said = f'could not extend file "base/16384/16397": {words}'
    error = errors.lookup("XX000")(said)
    try:
        with pytest.raises(StorageFullError) as caught, repo._translate():
            raise InternalError("INSERT INTO trainings ...", {}, error)
    finally:
        engine.dispose()
    assert caught.value.message == ("database error: a disk quota of the database server is "
                                    f"used up: {said}")
    assert caught.value.quota
    assert refusal_said(caught.value) == QUOTA_USED_UP


def test_a_read_only_sqlite_file_is_a_refusal_by_sqlite_s_own_code(tmp_path: Path) -> None:
    # The case above raises hand-made errors, which carry no ``sqlite_errorcode``: only the
    # words' fallback ran, and the code's test (the one real errors take) would have passed
    # with any constant (review read-report3 nit 7). A database opened read-only gives the real
    # one: SQLITE_READONLY (8), "attempt to write a readonly database".
    path = tmp_path / "selfie-lora.db"
    upgrade(make_engine(f"sqlite:///{path}"))
    repo = SqlRepository(create_engine(f"sqlite:///file:{path}?mode=ro&uri=true"))
    now = datetime.now(UTC)
    with pytest.raises(DatabaseRefusedError) as caught:
        repo.worker_alive("w", now=now, expires_at=now + timedelta(seconds=30),
                          forget_before=now)
    cause = caught.value.__cause__
    assert isinstance(cause, DBAPIError)
    assert isinstance(cause.orig, sqlite3.Error)
    assert cause.orig.sqlite_errorcode & 0xFF == 8
    assert "readonly database" in caught.value.message


def test_a_pool_whose_connections_are_all_taken_is_a_refusal(tmp_path: Path) -> None:
    path = tmp_path / "selfie-lora.db"
    upgrade(make_engine(f"sqlite:///{path}"))
    engine = create_engine(f"sqlite:///{path}", poolclass=QueuePool, pool_size=1,
                           max_overflow=0, pool_timeout=0.05)
    repo = SqlRepository(engine)
    with engine.connect(), pytest.raises(DatabaseRefusedError) as caught:
        repo.get_training("t1")
    assert "QueuePool limit of size 1 overflow 0 reached" in caught.value.message
    assert caught.value.pool_exhausted


def test_another_database_error_is_no_refusal(tmp_path: Path) -> None:
    repo = _refusing(tmp_path, sqlite3.OperationalError("no such column: trainings.nope"))
    with pytest.raises(StorageError) as caught:
        repo.get_training("t1")
    assert not isinstance(caught.value, DatabaseRefusedError)


def _blob_disk_full(tmp_path: Path) -> Exception:
    """What the local blob store raises when its disk is full under a write."""

    def fill(_fh: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        FileSystemBlobStore(tmp_path / "blobs")._write("weights/a.safetensors", fill,
                                                         if_absent=False)
    except StorageError as exc:
        return exc
    raise AssertionError("the write went through")


def _locked(tmp_path: Path) -> Exception:
    """The repository's error for a write kept waiting past SQLite's busy timeout (100 ms here,
    30 s as served) by another connection's write lock: "database is locked"."""
    path = tmp_path / "locked.db"
    upgrade(make_engine(f"sqlite:///{path}"))
    engine = make_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA busy_timeout=100")

    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        now = datetime.now(UTC)
        SqlRepository(engine).worker_alive("w", now=now, expires_at=now + timedelta(seconds=30),
                                           forget_before=now)
    except StorageError as exc:
        return exc
    finally:
        holder.close()
        engine.dispose()
    raise AssertionError("the write went through")


REFUSALS: dict[str, Callable[[Path], Exception]] = {
    "database-full": lambda _p: StorageFullError(
        "database error: the disk holding /srv/selfie-lora.db is full (0 KB free): database or "
        "disk is full"),
    "pool-exhausted": lambda _p: DatabaseRefusedError(
        "database error: QueuePool limit of size 2 overflow 0 reached, connection timed out, "
        "timeout 30.00"),
    "read-only": lambda _p: DatabaseRefusedError(
        "database error: cannot execute UPDATE in a read-only transaction"),
    "blob-disk-full": _blob_disk_full,
    # A write of this machine's disk that no adapter mapped (a hold's copy, a work folder).
    "local-disk-full": lambda _p: OSError(errno.ENOSPC, "No space left on device"),
}
# A used-up quota (EDQUOT), as an adapter says it and as no adapter mapped it: said as the
# refusals above, with what to do about it.
QUOTAS: dict[str, Callable[[Path], Exception]] = {
    "database-quota": lambda _p: StorageFullError(
        "database error: the quota of this account on the disk holding /srv/selfie-lora.db is "
        "used up (the disk itself has 2.0 GB free): database or disk is full", quota=True),
    "local-quota": lambda _p: OSError(errno.EDQUOT, "Disk quota exceeded"),
}

LOOPS = {
    "reconcile": "reconciling trainings",
    "gc": "garbage collection",
    "holds": "settling this machine's erasure holds",
    "erasures": "finishing interrupted account deletions",
}


class _Failing:
    """Each loop's service at the worker's boundary: the one named ``loop`` raises
    ``error()`` while ``failing`` is set; the others go through."""

    def __init__(self, loop: str, error: Callable[[], Exception]) -> None:
        self.loop = loop
        self.error = error
        self.failing = True
        self.rounds = 0

    def _round(self, loop: str) -> None:
        if loop == self.loop:
            self.rounds += 1
            if self.failing:
                raise self.error()

    # TrainingService
    def reconcile(self, *, dead_owners: tuple[str, ...] = (),
                  stopping: threading.Event | None = None) -> ReconcileReport:
        self._round("reconcile")
        return ReconcileReport()

    # GarbageCollector
    def run_due(self, *, stopping: threading.Event | None = None) -> None:
        self._round("gc")

    def settle_holds(self) -> int:
        self._round("holds")
        return 0

    # AccountEraser
    def finish_pending(self, *, stopping: threading.Event | None = None) -> list[Any]:
        self._round("erasures")
        return []


def _rounds(worker: Worker, loop: str) -> None:
    {"reconcile": worker._reconcile, "gc": worker.collect_garbage,
     "holds": worker.finish_erasures, "erasures": worker.finish_erasures}[loop]()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="selfie_lora"):
        yield caplog


def _worker(fake: _Failing) -> Worker:
    return Worker(training=fake, queue=InMemoryQueue(),  # type: ignore[arg-type]
                  identity=Identity(name="w"), threads=1, gc=fake,  # type: ignore[arg-type]
                  erasure=fake)  # type: ignore[arg-type]


def _five_refused_then_two(logged: pytest.LogCaptureFixture, loop: str,
                           error: Exception) -> list[logging.LogRecord]:
    """What ``loop`` said over five rounds that ``error`` refused, then two that went through."""
    fake = _Failing(loop, lambda: error)
    worker = _worker(fake)
    for _round in range(5):
        _rounds(worker, loop)
    fake.failing = False
    for _round in range(2):
        _rounds(worker, loop)
    assert fake.rounds == 7
    return [r for r in logged.records if r.getMessage().startswith(LOOPS[loop])]


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("refusal", [*REFUSALS, *QUOTAS])
def test_a_lasting_refusal_is_said_once_per_loop_and_its_end_once(
        tmp_path: Path, logged: pytest.LogCaptureFixture, loop: str, refusal: str) -> None:
    error = {**REFUSALS, **QUOTAS}[refusal](tmp_path)
    said = _five_refused_then_two(logged, loop, error)
    # Old code: five ERROR records, each with its traceback, and no end.
    assert [(r.levelname, bool(r.exc_info)) for r in said] == [
        ("WARNING", False), *[("DEBUG", True)] * 4, ("INFO", False)]
    words = error.message if isinstance(error, StorageError) else str(error)
    assert words in said[0].getMessage()
    if refusal in QUOTAS:
        # As the training heartbeat says it: raise the quota, where a full disk's words sent
        # the operator to free space (old code: no advice).
        assert said[0].getMessage().endswith(
            "(its end is logged; raise the quota or delete files it counts)"), said[0].getMessage()
        assert "full disk" not in said[0].getMessage()
    else:
        assert "(its end is logged)" in said[0].getMessage()
    assert "\n" not in said[0].getMessage()
    assert "goes through again" in said[-1].getMessage()
    assert not [r for r in logged.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("defect", [
    RuntimeError("a bug"),
    StorageError("database error: no such column: trainings.nope"),
    OSError(errno.EACCES, "Permission denied")], ids=["bug", "statement", "not-full"])
def test_any_other_error_keeps_its_traceback_every_round(
        logged: pytest.LogCaptureFixture, loop: str, defect: Exception) -> None:
    worker = _worker(_Failing(loop, lambda: defect))
    for _round in range(3):
        _rounds(worker, loop)
    said = [r for r in logged.records if r.getMessage().startswith(LOOPS[loop])]
    assert [(r.levelname, bool(r.exc_info)) for r in said] == [("ERROR", True)] * 3


def _pool_exhausted(tmp_path: Path) -> DatabaseRefusedError:
    """The repository's error for a pool whose connections are all taken past the wait."""
    path = tmp_path / "pool.db"
    upgrade(make_engine(f"sqlite:///{path}"))
    engine = create_engine(f"sqlite:///{path}", poolclass=QueuePool, pool_size=1,
                           max_overflow=0, pool_timeout=0.05)
    with engine.connect(), pytest.raises(DatabaseRefusedError) as caught:
        SqlRepository(engine).get_training("t1")
    return caught.value


def _read_only(tmp_path: Path) -> DatabaseRefusedError:
    """The repository's error for a database that takes no writes."""
    repo = _refusing(tmp_path, sqlite3.OperationalError("attempt to write a readonly database"))
    with pytest.raises(DatabaseRefusedError) as caught:
        repo.get_training("t1", for_update=True)
    return caught.value


def _gc_said(logged: pytest.LogCaptureFixture,
             rounds: list[Exception | None]) -> list[logging.LogRecord]:
    """The gc loop's rounds, each raising its error (``None``: it goes through): what it said."""
    errors = iter(rounds)
    fake = _Failing("gc", lambda: error)
    worker = _worker(fake)
    for error in errors:
        fake.failing = error is not None
        _rounds(worker, "gc")
    return [r for r in logged.records if r.getMessage().startswith(LOOPS["gc"])]


@pytest.mark.parametrize(("first", "then", "was"), [
    (REFUSALS["database-full"], _read_only, "a full disk"),
    (REFUSALS["local-disk-full"], _pool_exhausted, "a full disk"),
    (_pool_exhausted, _read_only, "the database's connections all taken"),
    (_read_only, REFUSALS["database-full"], "a read-only database"),
    (_locked, _pool_exhausted, "statements kept waiting by a lock or past the database's timeout"),
    # A used-up quota was "a full disk" (the operator sent to free space df shows is there),
    # and a disk that filled after it was not said at all (one kind).
    (QUOTAS["database-quota"], _read_only, "a used-up disk quota"),
    (QUOTAS["local-quota"], _pool_exhausted, "a used-up disk quota"),
    (QUOTAS["database-quota"], REFUSALS["database-full"], "a used-up disk quota"),
    (REFUSALS["local-disk-full"], QUOTAS["local-quota"], "a full disk")],
    ids=["full-then-read-only", "local-full-then-pool", "pool-then-read-only",
         "read-only-then-full", "locked-then-pool", "quota-then-read-only",
         "local-quota-then-pool", "quota-then-full", "local-full-then-quota"])
def test_a_refusal_of_another_kind_while_one_lasts_is_said_too(
        tmp_path: Path, logged: pytest.LogCaptureFixture, first: Callable[[Path], Exception],
        then: Callable[[Path], Exception], was: str) -> None:
    # Review: one refusal said at WARNING, then another kind of it (the disk freed, but a
    # fail-over's read-only standby met before any round went through) was only at DEBUG, the
    # operator still looking at the first one's words.
    said = _gc_said(logged, [first(tmp_path), first(tmp_path), then(tmp_path), then(tmp_path),
                             None])
    # Old code: WARNING, then DEBUG for all three others, the new kind's words never above DEBUG.
    assert [(r.levelname, bool(r.exc_info)) for r in said] == [
        ("WARNING", False), ("DEBUG", True), ("WARNING", False), ("DEBUG", True),
        ("INFO", False)]
    second = then(tmp_path)
    words = second.message if isinstance(second, StorageError) else str(second)
    assert words in said[2].getMessage()
    assert f"it was refused for {was} until now" in said[2].getMessage()
    assert "(its end is logged" in said[2].getMessage()
    assert "until now" not in said[0].getMessage()
    assert not [r for r in logged.records if r.levelno >= logging.ERROR]


def test_two_refusals_that_alternate_are_each_said_once_until_a_round_goes_through(
        tmp_path: Path, logged: pytest.LogCaptureFixture) -> None:
    # Review: a fail-over whose rounds meet the pool's timeout and the read-only standby by
    # turns (or a full disk and a read-only database, whichever a round meets first) said a
    # WARNING every round, each a change of kind: the WARNING at each round the loops' change set
    # out to remove. Each kind is said once while the outage lasts, and again after it ended.
    said = _gc_said(logged, [REFUSALS["database-full"](tmp_path), _read_only(tmp_path)] * 3
                    + [None, _read_only(tmp_path)])
    # Old code: six WARNINGs.
    assert [r.levelname for r in said] == [
        "WARNING", "WARNING", "DEBUG", "DEBUG", "DEBUG", "DEBUG", "INFO", "WARNING"]
    assert "it was refused for a full disk until now" in said[1].getMessage()
    assert "until now" not in said[-1].getMessage()


def test_a_refusal_of_the_same_kind_in_other_words_is_not_said_again(
        logged: pytest.LogCaptureFixture) -> None:
    # A read-only standby refuses each statement in its own words (UPDATE, INSERT): one refusal.
    errors = iter([DatabaseRefusedError(f"database error: cannot execute {verb} in a read-only "
                                        "transaction") for verb in ("UPDATE", "INSERT", "DELETE")])
    fake = _Failing("gc", lambda: next(errors))
    worker = _worker(fake)
    for _round in range(3):
        _rounds(worker, "gc")
    said = [r for r in logged.records if r.getMessage().startswith(LOOPS["gc"])]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG", "DEBUG"]


def test_a_pool_whose_connections_stay_taken_is_said_with_a_leak_as_a_cause_too(
        tmp_path: Path, logged: pytest.LogCaptureFixture) -> None:
    # Review: once an ERROR with its traceback each round, an exhausted pool became one WARNING
    # in the pool's words, which point at SELFIE_LORA_DB_POOL_SIZE alone; a connection a defect
    # never gives back exhausts it as well, and no bigger pool mends that.
    error = _pool_exhausted(tmp_path)
    worker = _worker(_Failing("gc", lambda: error))
    for _round in range(2):
        _rounds(worker, "gc")
    said = [r for r in logged.records if r.getMessage().startswith(LOOPS["gc"])]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"]
    assert "SELFIE_LORA_DB_POOL_SIZE" in said[0].getMessage()
    assert "a connection held by a defect" in said[0].getMessage()
    assert "(its end is logged" in said[0].getMessage()


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_lock_held_past_the_database_s_wait_is_said_once_with_what_holds_it(
        tmp_path: Path, logged: pytest.LogCaptureFixture, loop: str) -> None:
    # SQLite's "database is locked" (PostgreSQL's lock_timeout, statement_timeout): old code, a
    # plain StorageError, an ERROR with its traceback at every round. Not in the pool's words:
    # nothing of this process's to resize, the lock is held elsewhere.
    error = _locked(tmp_path)
    assert isinstance(error, DatabaseLockedError)
    said = _five_refused_then_two(logged, loop, error)
    assert [(r.levelname, bool(r.exc_info)) for r in said] == [
        ("WARNING", False), *[("DEBUG", True)] * 4, ("INFO", False)]
    assert "database error: database is locked" in said[0].getMessage()
    assert "(its end is logged; a transaction elsewhere holds a lock it needs" in (
        said[0].getMessage())
    assert "SELFIE_LORA_DB_POOL_SIZE" not in said[0].getMessage()
    assert "goes through again" in said[-1].getMessage()
    assert not [r for r in logged.records if r.levelno >= logging.ERROR]


def test_a_statement_cancelled_from_outside_is_said_with_a_cancel_among_its_causes(
        logged: pytest.LogCaptureFixture) -> None:
    # Review 4 (RISK 2): PostgreSQL's 57014 is also an outside cancel (pg_cancel_backend, a
    # pooler's query_timeout), mapped to DatabaseLockedError as the statement_timeout is (told
    # apart by words only, which lc_messages may translate). The advice named a lock or a server
    # too loaded alone: an operator who cancelled a runaway statement was told a wrong cause.
    error = DatabaseLockedError("database error: canceling statement due to user request")
    said = _five_refused_then_two(logged, "gc", error)
    words = said[0].getMessage()
    assert "a transaction elsewhere holds a lock it needs" in words
    assert "slower than the statement timeout" in words
    assert "SELFIE_LORA_DB_STATEMENT_TIMEOUT" in words
    assert "cancelled from outside (pg_cancel_backend, a pooler's query_timeout)" in words


def test_sqlite_s_lock_is_advised_with_the_lock_alone(
        tmp_path: Path, logged: pytest.LogCaptureFixture) -> None:
    # Review 7 (RISK 4): SQLite's "database is locked" (and PostgreSQL's 55P03, a lock's wait
    # known as such) was advised with 57014's causes too: PostgreSQL's statement timeout, which
    # README says SQLite has not, and a backend to cancel.
    said = _five_refused_then_two(logged, "gc", _locked(tmp_path))
    words = said[0].getMessage()
    assert "database is locked" in words
    assert "a transaction elsewhere holds a lock it needs" in words
    assert "pg_cancel_backend" not in words
    assert "SELFIE_LORA_DB_STATEMENT_TIMEOUT" not in words
