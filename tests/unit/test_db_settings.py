"""The database's settings, their checks and their way into the engine, without a server (the
PostgreSQL tests show them in effect).

SELFIE_LORA_DB_POOL_SIZE: the most connections each process holds to a PostgreSQL server.
Found in review: the pool was fixed at 15 a process, so a deployment of many processes could
only fit a server's max_connections by running fewer of them. SQLite keeps its own pool.

SELFIE_LORA_DB_POOL_TIMEOUT, SELFIE_LORA_DB_STATEMENT_TIMEOUT, SELFIE_LORA_DB_ANSWER_TIMEOUT:
how long a thread waits for a free connection of its process's pool, how long PostgreSQL lets a
statement run, and how long the client waits for an answer. Found in review: all three were
constants of the database adapter (30 s, 300 s, the statement's + 30 s) while the pool's size
was a setting, so an operator could not make a busy process fail fast nor let a long report
run."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import ValidationError
from sqlalchemy.pool import QueuePool

from selfie_lora.adapters.db import postgres
from selfie_lora.adapters.db.repository import POOL_TIMEOUT_S, POSTGRES_POOL_SIZE
from selfie_lora.config import Settings, settings_errors
from selfie_lora.wiring import database_engine

pytest.importorskip("psycopg")

# Nothing listens there: building an engine connects to nothing.
NOWHERE = "postgresql+psycopg://selfie@127.0.0.1:9/selfie"


def pool_of(settings: Settings) -> QueuePool:
    """The pool of the engine ``settings`` build (disposed of: nothing was connected)."""
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


class ConnectCalledError(Exception):
    """What the fake connect raises once it has seen the arguments: no server is asked."""


def connect_arguments(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the engine of ``settings`` hands ``postgres.connect`` for a new connection."""
    seen: dict[str, Any] = {}

    def fake_connect(*_cargs: Any, answer_timeout: float | None, **cparams: Any) -> Any:
        seen.update(cparams, answer_timeout=answer_timeout)
        raise ConnectCalledError

    monkeypatch.setattr(postgres, "connect", fake_connect)
    engine = database_engine(settings)
    try:
        with pytest.raises(ConnectCalledError), engine.connect():
            pass
    finally:
        engine.dispose()
    return seen


def test_the_defaults_are_the_bounds_of_before(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path, database_url=NOWHERE)
    assert settings.db_pool_timeout == POOL_TIMEOUT_S == 30
    assert settings.db_statement_timeout == postgres.STATEMENT_TIMEOUT_S == 300
    assert settings.db_answer_timeout is None  # the statement's bound + ANSWER_MARGIN_S
    seen = connect_arguments(settings, monkeypatch)
    assert "-c statement_timeout=300000" in seen["options"]
    assert seen["answer_timeout"] == 300 + postgres.ANSWER_MARGIN_S


# Old code: the variables were not settings (ignored): 30 s, 300000 ms and 330 s.
def test_the_settings_reach_the_postgresql_engine(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_TIMEOUT", "2.5")
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "12.5")
    settings = Settings(home=tmp_path, database_url=NOWHERE)
    assert pool_of(settings).timeout() == 2.5
    seen = connect_arguments(settings, monkeypatch)
    assert "-c statement_timeout=12500" in seen["options"]
    assert seen["answer_timeout"] == 12.5 + postgres.ANSWER_MARGIN_S  # follows the statement's
    monkeypatch.setenv("SELFIE_LORA_DB_ANSWER_TIMEOUT", "20")
    seen = connect_arguments(Settings(home=tmp_path, database_url=NOWHERE), monkeypatch)
    assert seen["answer_timeout"] == 20


def test_the_largest_values_reach_the_postgresql_engine(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A week of statement is 604800000 ms, under PostgreSQL's 2^31-1 (the PostgreSQL test sees
    # the server take it); the unset answer timeout past it is not bounded by its own maximum.
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_SIZE", "1000")
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_TIMEOUT", "3600")
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "604800")
    settings = Settings(home=tmp_path, database_url=NOWHERE)
    pool = pool_of(settings)
    assert (pool.size(), pool.timeout()) == (1000, 3600)
    seen = connect_arguments(settings, monkeypatch)
    assert "-c statement_timeout=604800000" in seen["options"]
    assert 604800000 < 2**31 - 1
    assert seen["answer_timeout"] == 604800 + postgres.ANSWER_MARGIN_S
    # The longest answer timeout that can be set, with the longest statement it allows.
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "604799")
    monkeypatch.setenv("SELFIE_LORA_DB_ANSWER_TIMEOUT", "604800")
    seen = connect_arguments(Settings(home=tmp_path, database_url=NOWHERE), monkeypatch)
    assert "-c statement_timeout=604799000" in seen["options"]
    assert seen["answer_timeout"] == 604800


def test_the_pool_wait_is_sqlite_s_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its pool is its own size, but a thread that finds it taken waits as long.
    monkeypatch.setenv("SELFIE_LORA_DB_POOL_TIMEOUT", "4")
    sqlite = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert pool_of(sqlite).timeout() == 4


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("SELFIE_LORA_DB_POOL_TIMEOUT", "0", "greater than 0"),
    ("SELFIE_LORA_DB_POOL_TIMEOUT", "-1", "greater than 0"),
    ("SELFIE_LORA_DB_POOL_TIMEOUT", "3601", "less than or equal to 3600"),
    ("SELFIE_LORA_DB_POOL_TIMEOUT", "inf", "finite number"),
    ("SELFIE_LORA_DB_POOL_TIMEOUT", "soon", "a valid number"),
    # 0 is PostgreSQL's "no bound", and under a millisecond rounded to it.
    ("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "0", "greater than or equal to 0.001"),
    ("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "0.0004", "greater than or equal to 0.001"),
    ("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "604801", "less than or equal to 604800"),
    ("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "-5", "greater than or equal to 0.001"),
    ("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "nan", "finite number"),
    ("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "5m", "a valid number"),
    ("SELFIE_LORA_DB_ANSWER_TIMEOUT", "0", "greater than 0"),
    ("SELFIE_LORA_DB_ANSWER_TIMEOUT", "1e9", "less than or equal to"),
    ("SELFIE_LORA_DB_ANSWER_TIMEOUT", "-5", "greater than 0"),
    ("SELFIE_LORA_DB_ANSWER_TIMEOUT", "inf", "finite number"),
    ("SELFIE_LORA_DB_ANSWER_TIMEOUT", "nan", "finite number"),
])
def test_a_bad_value_is_one_line_naming_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
        says: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path)
    [line] = settings_errors(caught.value)
    assert line.startswith(f"{variable}: "), line
    assert says in line, line
    if value not in says:  # "0" is in "greater than 0"
        assert value not in line.removeprefix(f"{variable}: ")  # values are never printed


@pytest.mark.parametrize("answer", ["300", "60", "300.5", "300.999"])
def test_an_answer_timeout_within_the_statement_s_is_refused_naming_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    # The client would give up (and drop the connection) before the server's own cancel of a
    # slow statement could answer: every such statement would cost a connection, its error
    # "no answer from the server" instead of PostgreSQL's.
    monkeypatch.setenv("SELFIE_LORA_DB_ANSWER_TIMEOUT", answer)
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path)
    [line] = settings_errors(caught.value)
    # Within a second of it too: the server's cancel (its timer, then the way back) cannot
    # answer in a millisecond (old code took 300.001).
    assert line == (f"SELFIE_LORA_DB_ANSWER_TIMEOUT ({answer}) must be at least 1 s more than "
                    "SELFIE_LORA_DB_STATEMENT_TIMEOUT (300): the client would stop waiting "
                    "before the server cancels a statement that runs too long"), line
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "30")
    assert Settings(home=tmp_path).db_answer_timeout == float(answer)
    monkeypatch.setenv("SELFIE_LORA_DB_ANSWER_TIMEOUT", "301")
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "300")
    assert Settings(home=tmp_path).db_answer_timeout == 301  # a second more is enough


# A URL's own options come after ours in the connection's options, and libpq lets the last one
# win. Old code: the answer timeout and its check followed the setting alone, so a URL that let a
# statement run an hour still lost its connection at 330 s ("no answer from the server").
@pytest.mark.parametrize(("options", "seconds"), [
    ("-c statement_timeout=5000", 5.0),  # no unit: milliseconds
    ("-c statement_timeout=1h", 3600.0),
    ("-cstatement_timeout=90s", 90.0),
    ("--statement-timeout=2min", 120.0),
    ("-c Statement_Timeout=1.5s -c work_mem=64MB", 1.5),
    ("-c statement_timeout=10s -c statement_timeout=20s", 20.0),  # the last one wins
    ("-c statement_timeout=7\\ d", 604800.0),  # a backslash keeps the space in the value
])
def test_a_url_s_own_statement_timeout_is_the_one_the_answer_follows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str, seconds: float) -> None:
    url = f"{NOWHERE}?options={quote(options)}"
    settings = Settings(home=tmp_path, database_url=url)
    assert settings.db_statement_timeout_in_effect == seconds
    seen = connect_arguments(settings, monkeypatch)
    assert seen["options"].endswith(options)  # the URL's after ours: it wins
    assert seen["answer_timeout"] == seconds + postgres.ANSWER_MARGIN_S
    # A set answer timeout is checked against it, not against the setting's 300 s.
    monkeypatch.setenv("SELFIE_LORA_DB_ANSWER_TIMEOUT", str(seconds))
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, database_url=url)
    [line] = settings_errors(caught.value)
    assert line.startswith(f"SELFIE_LORA_DB_ANSWER_TIMEOUT ({seconds:g}) must be at least 1 s more than "
                           "the statement_timeout in SELFIE_LORA_DATABASE_URL's options "
                           f"({seconds:g})"), line


def test_a_url_without_its_own_statement_timeout_keeps_the_setting_s(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=f"{NOWHERE}?options={quote('-c work_mem=4MB')}",
                        db_statement_timeout=12)
    assert settings.db_statement_timeout_in_effect == 12
    assert Settings(home=tmp_path).db_statement_timeout_in_effect == 300  # SQLite: the setting's


@pytest.mark.parametrize(("options", "says"), [
    ("-c statement_timeout=0", "no bound"),
    ("-c statement_timeout=0.4", "no bound"),  # rounded to 0 ms
    ("-c statement_timeout=700000s", "604800 s"),
    ("-c statement_timeout=5x", "cannot be read here"),
    ("-c statement_timeout=010", "cannot be read here"),  # octal to PostgreSQL
    ("-c statement_timeout", "cannot be read here"),
    ("-X statement_timeout=5", "cannot be read here"),
])
def test_a_url_s_own_statement_timeout_out_of_bounds_or_unread_is_refused(
        tmp_path: Path, options: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, database_url=f"{NOWHERE}?options={quote(options)}")
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_DATABASE_URL: its options' statement_timeout "), line
    assert says in line, line
    assert "SELFIE_LORA_DB_STATEMENT_TIMEOUT" in line, line  # what to set instead
