"""Database and queue URLs for contract tests: SQLite and huey-SQLite always, PostgreSQL and
Redis when the environment names them (``.ci/run`` does)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import Engine, create_engine, text

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import make_engine

POSTGRES_ENV = "SELFIE_LORA_TEST_POSTGRES_URL"
REDIS_ENV = "SELFIE_LORA_TEST_REDIS_URL"

# The kinds a contract test runs on; the server-backed ones carry their marker, so
# ``pytest -m "not postgres and not redis"`` leaves them out.
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
QUEUES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@functools.cache
def migrated_sqlite_template() -> Path:
    """A SQLite database at the newest schema, made once per process: tests copy it instead of
    running the migrations for every database they open (``upgrade`` then finds it at head)."""
    folder = Path(tempfile.mkdtemp(prefix="sl-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    engine = make_engine(f"sqlite:///{folder / 'db.sqlite'}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return folder / "db.sqlite"


def copy_migrated_sqlite(target: Path) -> None:
    """``target`` becomes a fresh database at the newest schema (unless it exists already)."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_sqlite_template(), target)


def _xdist_worker() -> int | None:
    """The number of this pytest-xdist worker (``make test-fast`` runs two), None when serial."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name.removeprefix("gw")) if name.startswith("gw") else None


def database_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@"
                    "127.0.0.1:5432/test); .ci/run sets it")
    worker = _xdist_worker()
    if worker is None:
        return url
    # Parallel workers wipe the schema between tests: each gets a database of its own.
    parts = urlsplit(url)
    name = f"{parts.path.lstrip('/') or 'test'}_xdist_{worker}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                            {"n": name}).first() is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return urlunsplit(parts._replace(path=f"/{name}"))


def migrated_engine(kind: str, tmp_path: Path) -> Engine:
    """An engine on a database of its own at the newest schema, nothing in it. SQLite: a copy of
    migrated_sqlite_template (running the migrations took 0.4-1.4 s a test on a loaded machine).
    PostgreSQL: the shared schema dropped and migrated; a copy of a migrated template database
    (``CREATE DATABASE ... TEMPLATE``) was measured no faster, 0.2-1.3 s a test either way."""
    if kind == "sqlite":
        target = tmp_path / "contract.db"
        copy_migrated_sqlite(target)
        return make_engine(f"sqlite:///{target}")
    engine = fresh_engine(database_url(kind, tmp_path))
    upgrade(engine)
    return engine


def queue_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    url = os.environ.get(REDIS_ENV)
    if not url:
        pytest.skip(f"Redis tests need {REDIS_ENV} (e.g. redis://127.0.0.1:6379/0); .ci/run sets it")
    worker = _xdist_worker()
    if worker is None:
        return url
    # Parallel workers flush their queue between tests: each gets a database number of its own.
    return urlunsplit(urlsplit(url)._replace(path=f"/{redis_database('contract', worker)}"))


# Redis database numbers a test run flushes (a Redis server has 16: 0-15), one per pytest-xdist
# worker for each user: the queue contract tests count up from 2 (2, 3, ...), the end-to-end
# scale path (tests/e2e/conftest.py) down from 13 (13, 12, ...). Both flush their database
# before and after a test, so no number may be both's: 6 workers fit (2-7 and 8-13).
_CONTRACT_FIRST_DB = 2
_E2E_FIRST_DB = 13
MAX_REDIS_WORKERS = (_E2E_FIRST_DB - _CONTRACT_FIRST_DB + 1) // 2


def redis_database(user: Literal["contract", "e2e"], worker: int) -> int:
    """The Redis database number of pytest-xdist worker ``worker`` for ``user``; the test fails
    (it does not share another's number) on a worker past MAX_REDIS_WORKERS."""
    if not 0 <= worker < MAX_REDIS_WORKERS:
        pytest.fail(f"pytest-xdist worker gw{worker}: the Redis tests give each of at most "
                    f"{MAX_REDIS_WORKERS} workers Redis database numbers of its own "
                    f"({_CONTRACT_FIRST_DB}-{_CONTRACT_FIRST_DB + MAX_REDIS_WORKERS - 1} and "
                    f"{_E2E_FIRST_DB - MAX_REDIS_WORKERS + 1}-{_E2E_FIRST_DB}); run them with "
                    f"-n {MAX_REDIS_WORKERS} or fewer", pytrace=False)
    return _CONTRACT_FIRST_DB + worker if user == "contract" else _E2E_FIRST_DB - worker


def fresh_engine(url: str) -> Engine:
    """An engine on an empty schema.

    PostgreSQL is shared between tests, and between checkouts of different ages on one machine:
    drop the whole schema rather than the tables this checkout knows, so a table that a newer
    migration left behind (and its foreign keys) cannot break an older run."""
    engine = make_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    return engine
