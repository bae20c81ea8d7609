"""SELFIE_LORA_DB_POOL_SIZE on a PostgreSQL server: a process never holds more connections than
it says, and threads beyond it wait their turn instead of failing, for SELFIE_LORA_DB_POOL_TIMEOUT
at most."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.config import Settings
from selfie_lora.errors import DatabaseUnreachableError, StorageError
from selfie_lora.wiring import database_engine
from tests.support.backends import database_url

pytest.importorskip("psycopg")

pytestmark = pytest.mark.postgres


def test_a_process_holds_at_most_the_pool_size_of_connections(tmp_path: Path) -> None:
    url = database_url("postgres", tmp_path)  # skips without SELFIE_LORA_TEST_POSTGRES_URL
    engine = database_engine(Settings(home=tmp_path, database_url=url, db_pool_size=2))
    backends: set[int] = set()
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def query() -> None:
        try:
            start.wait()
            with engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                conn.execute(text("SELECT pg_sleep(0.2)"))
            with lock:
                backends.add(pid)
        except BaseException as exc:
            failures.append(exc)

    try:
        threads = [threading.Thread(target=query) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        engine.dispose()
    assert failures == []
    assert 1 <= len(backends) <= 2, backends  # 6 queries on at most 2 server processes


# Old code: SELFIE_LORA_DB_POOL_TIMEOUT was no setting; the call waited SQLAlchemy's 30 s.
@pytest.mark.timeout(60)
def test_a_thread_that_finds_the_pool_taken_fails_after_the_pool_wait_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = database_url("postgres", tmp_path)  # skips without SELFIE_LORA_TEST_POSTGRES_URL
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_SIZE", "1")
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_TIMEOUT", "1.5")
    engine = database_engine(Settings(home=tmp_path, database_url=url))
    repo = SqlRepository(engine)
    try:
        with engine.connect() as held:
            held.execute(text("SELECT 1"))
            started = time.monotonic()
            with pytest.raises(StorageError, match="^database error: QueuePool limit of size 1 "
                                                   "overflow 0 reached, connection timed out, "
                                                   r"timeout 1\.50") as caught:
                repo.get_user("nobody")
            took = time.monotonic() - started
        # A process that is busy, not a server that is away: not an outage to wait out.
        assert not isinstance(caught.value, DatabaseUnreachableError)
        assert 1.5 <= took < 5, took
        assert repo.get_user("nobody") is None  # the connection is free again
    finally:
        engine.dispose()
