"""A PostgreSQL server that does not answer is an error in bounded time, never a wait for ever:
one that accepts connections and says nothing stops a command in one line, one that goes silent
mid-run fails the call that waits on it, and a statement that runs too long is cancelled."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from alembic import command
from sqlalchemy import Connection, make_url, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from selfie_lora.adapters.db import postgres
from selfie_lora.adapters.db.migrate import alembic_config, upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.cli import app
from selfie_lora.config import Settings, get_settings
from selfie_lora.errors import DatabaseUnreachableError, StorageError
from selfie_lora.wiring import database_engine
from tests.support.backends import POSTGRES_ENV, database_url, fresh_engine
from tests.support.silent import SilentServer

pytest.importorskip("psycopg")


class FreezingProxy:
    """Forwards to ``upstream`` until frozen, then passes nothing on while the kernel still
    acknowledges every packet: what a stuck proxy or a stopped server looks like from the
    client, which neither TCP keepalives nor tcp_user_timeout notice."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.frozen = threading.Event()
        self._upstream = upstream
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                client = self._listener.accept()[0]
                server = socket.create_connection(self._upstream)
                self._sockets += [client, server]
                threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        except OSError:
            pass

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.frozen.clear()
        self._listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


# Old code: still waiting when the timeout failed the test (no connect timeout at all).
@pytest.mark.timeout(60)
def test_a_server_that_never_answers_stops_a_command_in_one_line_in_bounded_time(
        silent: SilentServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SELFIE_LORA_DATABASE_URL",
                       f"postgresql+psycopg://u:pw_SECRET@127.0.0.1:{silent.port}/x")
    # The default connect timeout (10 s) at libpq's least, 2 s: the test waited 10 s out. Still
    # the default's path (the URL names none), which old code lacked.
    monkeypatch.setitem(postgres.CONNECTION_DEFAULTS, "connect_timeout", 2)
    get_settings.cache_clear()
    try:
        started = time.monotonic()
        result = CliRunner().invoke(app, ["users", "keys", "list", "ann"])
        took = time.monotonic() - started
    finally:
        get_settings.cache_clear()
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(
        f"error: the database (SELFIE_LORA_DATABASE_URL postgresql+psycopg://u:***@127.0.0.1:"
        f"{silent.port}/x) cannot be reached: "), lines
    assert "pw_SECRET" not in result.output
    assert 2 <= took < 30, took  # the connect timeout, and not much more


def test_a_server_that_refuses_connections_is_an_outage_not_a_refused_statement() -> None:
    """PostgreSQL stopped: the repository says the database cannot be reached
    (``DatabaseUnreachableError``), which a worker waits out without spending a training's
    attempts; it was a StorageError like any statement the database refused."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    repo = SqlRepository(make_engine(f"postgresql+psycopg://u@127.0.0.1:{port}/x"
                                     "?connect_timeout=2"))
    with pytest.raises(DatabaseUnreachableError, match="database error: ") as raised:
        repo.get_training("any")
    assert not raised.value.unanswered  # refused at once: no wait to spare the next call


def test_a_server_that_says_nothing_is_an_outage_that_got_no_answer(
        silent: SilentServer) -> None:
    """A hung server (here one that accepts and says nothing): the outage says it got no answer
    (``unanswered``), so that a reconcile pass does not wait on it again in each part."""
    engine = make_engine(f"postgresql+psycopg://u@127.0.0.1:{silent.port}/x?connect_timeout=1")
    try:
        with pytest.raises(DatabaseUnreachableError, match="timeout") as raised:
            SqlRepository(engine).get_training("any")
    finally:
        engine.dispose()
    assert raised.value.unanswered


def test_a_url_s_own_connect_timeout_wins(silent: SilentServer) -> None:
    engine = make_engine(f"postgresql+psycopg://u@127.0.0.1:{silent.port}/x?connect_timeout=1")
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="timeout"), engine.connect():
            pass
    finally:
        engine.dispose()
    assert time.monotonic() - started < 5


@pytest.fixture
def postgres_url(tmp_path: Path) -> str:
    url = database_url("postgres", tmp_path)  # skips without SELFIE_LORA_TEST_POSTGRES_URL
    engine = fresh_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


# Old code: the call waited for ever (caught by the test's timeout).
@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_a_server_gone_silent_mid_run_fails_the_call_with_a_database_error(
        postgres_url: str) -> None:
    assert os.environ.get(POSTGRES_ENV)
    parts = urlsplit(postgres_url)
    proxy = FreezingProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxied = urlunsplit(parts._replace(
        netloc=f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username
        else f"127.0.0.1:{proxy.port}", query="connect_timeout=2"))
    engine = make_engine(proxied, statement_timeout_s=1, answer_timeout_s=2)
    try:
        repo = SqlRepository(engine)
        assert repo.get_user("nobody") is None  # through the proxy
        proxy.frozen.set()
        started = time.monotonic()
        # The pool's ping gets no answer, then neither does a new connection (or, without the
        # ping, the statement itself).
        with pytest.raises(StorageError, match=r"database error: (no answer from the server|"
                                               r"connection timeout expired)") as raised:
            repo.count_trainings_by_status()
        assert time.monotonic() - started < 10
        # A wait that ran out, told as one (a reconcile pass, a stop, wait on it once).
        assert isinstance(raised.value, DatabaseUnreachableError)
        assert raised.value.unanswered
        # The connection that got no answer is gone: the next call, once the server answers
        # again, gets a fresh one.
        proxy.frozen.clear()
        assert repo.get_user("nobody") is None
    finally:
        proxy.close()
        engine.dispose()


def cancelled_by_the_server(conn: Connection) -> None:
    """A statement of 3 s on ``conn`` ends in the server's own cancel (SQLSTATE 57014,
    query_canceled: the statement timeout), not another error whose words say so."""
    with pytest.raises(OperationalError, match="statement timeout") as caught:
        conn.execute(text("SELECT pg_sleep(3)"))
    assert getattr(caught.value.orig, "sqlstate", None) == "57014"


@pytest.mark.postgres
def test_a_statement_past_the_timeout_is_cancelled_by_the_server(postgres_url: str) -> None:
    engine = make_engine(postgres_url, statement_timeout_s=0.5)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "500ms"
            cancelled_by_the_server(conn)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_migration_runs_without_the_statement_timeout(postgres_url: str) -> None:
    # A migration takes as long as it takes: an index on a large table ran past any bound.
    # The schema as it was before 0013, whichever migrations came after it (their own
    # downgrades undo them), with no bound on the way down.
    command.downgrade(alembic_config(postgres_url), "0012")
    engine = make_engine(postgres_url, statement_timeout_s=0.5)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "CREATE OR REPLACE FUNCTION slow_fold() RETURNS trigger AS $$ "
                "BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(text("INSERT INTO users (id, name, api_key_hash, created_at) "
                              "VALUES ('u1', 'ann', 'unused:u1', now())"))
            conn.execute(text("CREATE TRIGGER slow BEFORE UPDATE ON users FOR EACH ROW "
                              "EXECUTE FUNCTION slow_fold()"))
        upgrade(engine)  # 0013 fills name_folded: one second a row, past the 0.5 s bound
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name_folded FROM users")).scalar() == "ann"
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "500ms"
    finally:
        engine.dispose()


# Old code: SELFIE_LORA_DB_STATEMENT_TIMEOUT and SELFIE_LORA_DB_ANSWER_TIMEOUT were no settings:
# "5min" in effect, and the client waited 330 s.
@pytest.mark.postgres
def test_the_statement_timeout_set_is_the_one_in_effect(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "0.75")
    monkeypatch.setenv("SELFIE_LORA_DB_ANSWER_TIMEOUT", "40")
    engine = database_engine(Settings(home=tmp_path, database_url=postgres_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "750ms"
            assert isinstance(conn.connection.dbapi_connection, postgres.BoundedConnection)
            assert conn.connection.dbapi_connection.answer_timeout == 40
            cancelled_by_the_server(conn)
    finally:
        engine.dispose()


# Old code: the client's answer timeout followed the setting (330 s) whatever the URL's own
# options let a statement run; the server's options are the URL's (libpq lets the last win).
@pytest.mark.postgres
def test_a_url_s_own_statement_timeout_is_in_effect_and_the_answer_follows_it(
        postgres_url: str, tmp_path: Path) -> None:
    url = make_url(postgres_url).update_query_dict(
        {"options": "-c statement_timeout=5000"}).render_as_string(hide_password=False)
    engine = database_engine(Settings(home=tmp_path, database_url=url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "5s"
            dbapi = conn.connection.dbapi_connection
            assert getattr(dbapi, "answer_timeout", None) == 5 + postgres.ANSWER_MARGIN_S
    finally:
        engine.dispose()


# The longest statement timeout the setting takes is one PostgreSQL takes (it refuses a connect
# that sets more than 2^31-1 ms).
@pytest.mark.postgres
def test_the_longest_statement_timeout_is_one_the_server_takes(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_DB_STATEMENT_TIMEOUT", "604800")
    engine = database_engine(Settings(home=tmp_path, database_url=postgres_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "7d"
    finally:
        engine.dispose()
