"""SELFIE_LORA_DB_POOL_SIZE: the most connections each process holds to a PostgreSQL server.
Found in review: the pool was fixed at 15 a process, so a deployment of many processes could
only fit a server's max_connections by running fewer of them. SQLite keeps its own pool."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy.pool import QueuePool

from selfie_lora.adapters.db.repository import POSTGRES_POOL_SIZE
from selfie_lora.config import Settings, settings_errors
from selfie_lora.wiring import database_engine

pytest.importorskip("psycopg")

# Nothing listens there: building an engine connects to nothing.
NOWHERE = "postgresql+psycopg://selfie@127.0.0.1:9/selfie"


def pool_of(settings: Settings) -> QueuePool:
    engine = database_engine(settings)
    try:
        assert isinstance(engine.pool, QueuePool)
        return engine.pool
    finally:
        engine.dispose()


def test_the_setting_sizes_the_postgresql_pool(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_SIZE", "4")
    pool = pool_of(Settings(home=tmp_path, database_url=NOWHERE))
    assert pool.size() == 4
    assert pool._max_overflow == 0  # the size is the most it opens


def test_the_default_is_the_pool_of_before(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=NOWHERE)
    assert settings.db_pool_size == POSTGRES_POOL_SIZE == 15
    assert pool_of(settings).size() == 15


def test_sqlite_keeps_its_own_pool(tmp_path: Path) -> None:
    # A SQLite connection is a file handle: its pool fits the threads whatever the setting says.
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        db_pool_size=2)
    assert pool_of(settings).size() == 48


@pytest.mark.parametrize(("value", "bound"), [
    ("0", "greater than or equal to 1"), ("1001", "less than or equal to 1000"),
    ("many", "a valid integer")])
def test_a_size_out_of_bounds_is_one_line_naming_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, bound: str) -> None:
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_SIZE", value)
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path)
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_DB_POOL_SIZE: "), line
    assert bound in line, line
    assert value not in line.removeprefix("SELFIE_LORA_DB_POOL_SIZE: ")
