"""Which PostgreSQL errors are an outage (``DatabaseUnreachableError``: a worker waits it out,
said once, with no training's attempt spent) and which are a database error like any other:
psycopg gives no SQLSTATE for any connection that failed, so a server that answered "no" (a
database or role that does not exist, a refused login) was taken for one that is not there."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.exc import OperationalError

from selfie_lora.adapters.db.postgres import _server_state
from selfie_lora.adapters.db.repository import SqlRepository, _unreachable, make_engine
from selfie_lora.errors import DatabaseUnreachableError, StorageError
from tests.support.backends import database_url

psycopg = pytest.importorskip("psycopg")


class RefusingServer:
    """Speaks PostgreSQL's protocol as far as a server that turns a connection away: it answers
    the start-up message with a FATAL ``code``/``message`` of its own, as PostgreSQL does for a
    database that does not exist, a login it refuses or while it starts or stops."""

    def __init__(self, code: str, message: str, *, socket_dir: str | None = None) -> None:
        """On 127.0.0.1, or with ``socket_dir`` on the Unix socket libpq looks for there (on
        port 5432)."""
        self._fields = b"".join(
            kind + value.encode() + b"\0"
            for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message)))
        if socket_dir is None:
            self._listener = socket.socket()
            self._listener.bind(("127.0.0.1", 0))
            self.port: int = self._listener.getsockname()[1]
        else:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(f"{socket_dir}/.s.PGSQL.5432")
            self.port = 5432
        self._listener.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            while True:
                conn = self._listener.accept()[0]
                with conn:
                    self._answer(conn)
        except OSError:
            pass

    def _answer(self, conn: socket.socket) -> None:
        while True:
            (size,) = struct.unpack("!I", self._read(conn, 4))
            body = self._read(conn, size - 4)
            if struct.unpack("!I", body[:4])[0] in (80877103, 80877104):  # SSL, GSS request
                conn.sendall(b"N")
                continue
            payload = self._fields + b"\0"
            conn.sendall(b"E" + struct.pack("!I", len(payload) + 4) + payload)
            return

    @staticmethod
    def _read(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("the client went away")
            data += chunk
        return data

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def refusing(request: pytest.FixtureRequest) -> Iterator[RefusingServer]:
    server = RefusingServer(*request.param)
    yield server
    server.close()


def _repo(port: int) -> SqlRepository:
    return SqlRepository(make_engine(f"postgresql+psycopg://ann@127.0.0.1:{port}/sl"
                                     "?connect_timeout=5&sslmode=disable"))


# Old code: every one of these was DatabaseUnreachableError (no SQLSTATE on a failed connect).
@pytest.mark.parametrize("refusing", [
    ("3D000", 'database "sl" does not exist'),
    ("28000", 'role "ann" does not exist'),
    ("28P01", 'password authentication failed for user "ann"'),
    ("28000", 'no pg_hba.conf entry for host "127.0.0.1", user "ann", database "sl", no '
              "encryption"),
], indirect=True, ids=["no database", "no role", "wrong password", "pg_hba"])
def test_a_server_that_turns_the_login_away_is_a_database_error_not_an_outage(
        refusing: RefusingServer) -> None:
    with pytest.raises(StorageError, match=r"database error: .*FATAL") as raised:
        _repo(refusing.port).get_training("any")
    assert not isinstance(raised.value, DatabaseUnreachableError)


@pytest.mark.parametrize("refusing", [
    ("57P03", "the database system is starting up"),
    ("57P03", "the database system is shutting down"),
    ("53300", "sorry, too many clients already"),
], indirect=True, ids=["starting up", "shutting down", "too many clients"])
def test_a_server_that_takes_no_connection_now_is_an_outage(refusing: RefusingServer) -> None:
    with pytest.raises(DatabaseUnreachableError, match=r"database error: .*FATAL"):
        _repo(refusing.port).get_training("any")


# A server with another lc_messages says its FATALs in that language, and psycopg gives a failed
# connect no SQLSTATE. Old code: StorageError (no English words), a restart counted.
@pytest.mark.parametrize("refusing", [
    ("57P03", "das Datenbanksystem fährt hoch"),
    ("57P03", "das Datenbanksystem fährt herunter"),
    ("57P03", "le système de bases de données est en cours d'arrêt"),
    ("57P03", "データベースシステムはリカバリモードです"),
    ("53300", "tut mir leid, schon zu viele Verbindungen"),
], indirect=True, ids=["de starting up", "de shutting down", "fr shutting down", "ja recovery",
                       "de too many clients"])
def test_a_server_that_takes_no_connection_now_is_an_outage_in_any_language(
        refusing: RefusingServer) -> None:
    with pytest.raises(DatabaseUnreachableError, match=r"database error: .*FATAL"):
        _repo(refusing.port).get_training("any")


@pytest.mark.parametrize("refusing", [
    ("3D000", "Datenbank »sl« existiert nicht"),
    ("28000", "keine pg_hba.conf-Eintrag für Host »127.0.0.1«, Benutzer »ann«, Datenbank »sl«"),
], indirect=True, ids=["de no database", "de pg_hba"])
def test_a_login_turned_away_in_another_language_stays_a_database_error(
        refusing: RefusingServer) -> None:
    with pytest.raises(StorageError, match=r"database error: .*FATAL") as raised:
        _repo(refusing.port).get_training("any")
    assert not isinstance(raised.value, DatabaseUnreachableError)


class _DefaultSocketAttempt:
    """What psycopg keeps of a connect whose conninfo named no host (``postgresql:///sl``):
    its options say no host, and libpq's PQhost the socket folder it tried, its compiled-in
    default (/var/run/postgresql on Debian), here a folder of the test's."""

    needs_password = False
    used_password = False
    hostaddr = b""
    port = b"5432"

    def __init__(self, socket_dir: str) -> None:
        self.host = socket_dir.encode()
        self.info = [SimpleNamespace(keyword=keyword, val=val) for keyword, val in (
            (b"user", b"ann"), (b"dbname", b"sl"), (b"host", None), (b"hostaddr", None),
            (b"port", b"5432"))]


def test_a_server_on_libpq_s_default_socket_is_looked_at_again_too() -> None:
    """The second look (which reads the code of a refusal in any language) found no host in a
    conninfo that names none, libpq's default socket, and gave up: a German server starting up
    there was a database error. It now takes the host the attempt used, as libpq says it."""
    socket_dir = tempfile.mkdtemp(prefix="sl-pg-")  # short: a socket's path is bounded
    server = RefusingServer("57P03", "das Datenbanksystem fährt hoch", socket_dir=socket_dir)
    try:
        failed = psycopg.OperationalError(
            "connection failed: FATAL:  das Datenbanksystem fährt hoch",
            pgconn=cast(Any, _DefaultSocketAttempt(socket_dir)))
        assert _server_state(failed) == "57P03"
    finally:
        server.close()
        shutil.rmtree(socket_dir)


def test_a_server_that_closes_the_connection_at_once_is_an_outage() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)

        def close_each() -> None:
            try:
                while True:
                    listener.accept()[0].close()
            except OSError:
                pass

        threading.Thread(target=close_each, daemon=True).start()
        with pytest.raises(DatabaseUnreachableError, match="closed the connection"):
            _repo(listener.getsockname()[1]).get_training("any")


def _wrapped(orig: Exception, *, invalidated: bool = False) -> OperationalError:
    """``orig`` as SQLAlchemy hands it on from a statement."""
    return OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(("orig", "outage"), [
    # psycopg's own, with no SQLSTATE: a statement it refused to send is a defect.
    (psycopg.OperationalError("sending query and params failed: number of parameters must be "
                              "between 0 and 65535"), False),
    (psycopg.OperationalError('connection failed: connection to server at "127.0.0.1", port '
                              '5432 failed: FATAL:  database "nope" does not exist'), False),
    (psycopg.OperationalError("connection failed: connection to server at \"127.0.0.1\", port "
                              "5499 failed: Connection refused\n\tIs the server running on "
                              "that host and accepting TCP/IP connections?"), True),
    (psycopg.errors.ConnectionTimeout("connection timeout expired"), True),
    (psycopg.OperationalError("failed to resolve host 'db.invalid': [Errno -3] Temporary "
                              "failure in name resolution"), True),
    # The server's, with their SQLSTATE.
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
    (psycopg.errors.CannotConnectNow("the database system is starting up"), True),
    (psycopg.errors.ConnectionFailure("connection failure"), True),
    (psycopg.errors.ProtocolViolation("invalid message format"), False),
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
    (psycopg.errors.InvalidCatalogName('database "nope" does not exist'), False),
])
def test_only_a_server_out_of_reach_is_an_outage(orig: Exception, outage: bool) -> None:
    assert _unreachable(_wrapped(orig)) is outage


def test_a_connection_sqlalchemy_found_lost_is_an_outage() -> None:
    assert _unreachable(_wrapped(psycopg.OperationalError("the connection is lost"),
                                 invalidated=True))


@pytest.mark.postgres
def test_too_many_parameters_is_a_database_error_not_an_outage(tmp_path: Path) -> None:
    """A statement psycopg refuses to send (no SQLSTATE, the connection still good)."""
    repo = SqlRepository(make_engine(database_url("postgres", tmp_path)))
    statement = text("SELECT 1 WHERE 1 IN :ids").bindparams(bindparam("ids", expanding=True))
    with (pytest.raises(StorageError, match="number of parameters") as raised,
          repo._translate(), repo._engine.connect() as conn):
        conn.execute(statement, {"ids": list(range(70_000))})
    assert not isinstance(raised.value, DatabaseUnreachableError)
    repo._engine.dispose()
