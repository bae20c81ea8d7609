"""Database and queue URLs for contract tests: SQLite and huey-SQLite always, PostgreSQL and
Redis when the environment names them (``.ci/run`` does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from selfie_lora.adapters.db.repository import make_engine
from selfie_lora.adapters.db.tables import Base

POSTGRES_ENV = "SELFIE_LORA_TEST_POSTGRES_URL"
REDIS_ENV = "SELFIE_LORA_TEST_REDIS_URL"


def database_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@"
                    "127.0.0.1:5432/test); .ci/run sets it")
    return url


def queue_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    url = os.environ.get(REDIS_ENV)
    if not url:
        pytest.skip(f"Redis tests need {REDIS_ENV} (e.g. redis://127.0.0.1:6379/0); .ci/run sets it")
    return url


def fresh_engine(url: str) -> Engine:
    """An engine on an empty schema (PostgreSQL is shared between tests: wipe it first)."""
    engine = make_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    return engine
