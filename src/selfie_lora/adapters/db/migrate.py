"""Bring a database to the newest schema with Alembic (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

logger = logging.getLogger(__name__)

# An arbitrary 64-bit key that names "selfie-lora's schema migration" among advisory locks.
MIGRATION_LOCK_KEY = 0x5E1F_1E10_4A00_0001
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.cache
def head_revision() -> str | None:
    """The newest migration's revision (read from the scripts once per process)."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def at_head(engine: Engine) -> bool:
    """Whether the database is already at the newest schema (one query, no Alembic run)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return [r[0] for r in rows] == [head_revision()]


@contextmanager
def _unbounded(connection: Connection) -> Iterator[None]:
    if connection.dialect.driver != "psycopg":
        yield
        return
    from selfie_lora.adapters.db.postgres import answering_within

    with answering_within(connection.connection.dbapi_connection, None):
        yield


def upgrade(engine: Engine) -> None:
    """Run every pending migration on ``engine``'s database. Every command and process calls
    this at start-up; a database already at head costs one query, not an Alembic run."""
    if at_head(engine):
        return
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection, _unbounded(connection):
        if connection.dialect.name == "postgresql":
            # A migration takes as long as it takes (an index on a large table), and so does
            # the wait for another process's: no statement or answer time-out while it runs.
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            # Every API server and worker of a deployment upgrades at start-up, often at the
            # same moment: one at a time (the lock ends with this transaction), and the next
            # finds the schema at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
    logger.debug("database at head: %s", engine.url.render_as_string(hide_password=True))
