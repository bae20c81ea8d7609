"""How long a PostgreSQL connection waits for the server before it gives up (imported only for a
PostgreSQL URL: psycopg is an extra).

Without these, a server that accepts the connection and never answers (a hung primary, a
half-dead fail-over, a partition that drops packets) held every start, request and worker step
for ever: libpq has no timeout of its own."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.connection import _WAIT_INTERVAL
from sqlalchemy.exc import DisconnectionError

RV = TypeVar("RV")

# A connection that is not made in this long fails (psycopg times the whole handshake).
CONNECT_TIMEOUT_S = 10
# The longest a statement may run on the server: generous next to the longest of ours (the
# collector's listing of every dataset, generation and training, seconds on a large database)
# and to the waits for a row lock; migrations lift it (``unbounded``).
STATEMENT_TIMEOUT_S = 300.0
# What the client waits past the statement timeout for the server's own answer (its error)
# before it stops waiting: the server cannot say anything when it is hung (stopped, stuck on a
# disk) or when whatever sits between (a proxy, a NAT) stopped passing packets but still
# acknowledges them, which neither TCP keepalives nor tcp_user_timeout notice.
ANSWER_MARGIN_S = 30.0
# How long the pool's check of a connection it hands out waits (an empty statement, answered at
# once by a server that is there): a hung server costs this, not the statement's whole bound.
PING_TIMEOUT_S = 10.0

# libpq's own: a connection whose peer has gone (no acknowledgement of what was sent in 30 s, or
# no answer to 3 keepalive probes 10 s apart after 30 s of silence) fails instead of waiting.
# A URL that names any of these (or connect_timeout) keeps its own value.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection that stops waiting for an answer after ``answer_timeout`` seconds
    (None: never) and is closed then: what it had sent may still be half-answered, so it can
    never be used again (the pool sees it closed and drops it)."""

    answer_timeout: float | None = None

    def wait(self, gen: PQGen[RV], interval: float = _WAIT_INTERVAL,
             timeout: float | None = None) -> RV:
        limit = timeout if timeout is not None else self.answer_timeout
        try:
            return super().wait(gen, interval=interval, timeout=limit)
        except psycopg.errors._WaitTimeout:  # psycopg's own, private name for its time-out
            if timeout is not None:  # psycopg's own limit (a cancel's): its caller handles it
                raise
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no answer from the server in {limit:g} s (the connection is closed)") from None


def connect_args(query: dict[str, Any], *, statement_timeout_s: float) -> dict[str, Any]:
    """psycopg's arguments beside the URL's (``query``): the defaults above where the URL says
    nothing, and the statement timeout in the session's options (before the URL's own, which
    libpq lets win)."""
    args = {name: value for name, value in CONNECTION_DEFAULTS.items() if name not in query}
    own = f"-c statement_timeout={round(statement_timeout_s * 1000)}"
    args["options"] = f"{own} {query['options']}" if "options" in query else own
    return args


def connect(*cargs: Any, answer_timeout: float | None, **cparams: Any) -> BoundedConnection:
    try:
        connection = BoundedConnection.connect(*cargs, **cparams)
    except psycopg.OperationalError as exc:
        state = _server_state(exc)
        if state in _NOT_NOW:
            raise _NOT_NOW[state](str(exc), pgconn=exc.pgconn) from exc
        raise
    connection.answer_timeout = answer_timeout
    return connection


# What a server answers a connection with, before any authentication, while it takes none now:
# starting up, shutting down or in recovery (57P03), or at max_connections (53300).
_NOT_NOW: dict[str, type[psycopg.OperationalError]] = {
    "57P03": psycopg.errors.CannotConnectNow,
    "53300": psycopg.errors.TooManyConnections,
}
# The longest the second look waits for the server's first answer (a server that answered the
# connect a moment ago answers this at once).
_LOOK_TIMEOUT_S = 5.0
_PROTOCOL_3 = 196608


def _server_state(exc: psycopg.OperationalError) -> str | None:
    """The SQLSTATE of the server's refusal of a failed connect, when it refused before any
    authentication; None when there is none to read (no server answered, it asked for a
    password, the error already has its SQLSTATE or class).

    psycopg gives a failed connect no SQLSTATE: libpq keeps the server's FATAL only as text, in
    the server's ``lc_messages`` (``FATAL:  das Datenbanksystem fährt hoch``), so a restart of a
    server set to another language was read as a refused login (a training's attempt spent, a
    500 for a 503). The code is on the wire, so the attempt that failed (its host and address)
    is made once more with a bare start-up message, and the code of the server's first answer
    read: a server that takes no connection now says so before authentication, whatever its
    settings (SSL, pg_hba.conf). libpq's ping reads it too, but holds the GIL as it waits."""
    if exc.sqlstate is not None or isinstance(exc, psycopg.errors.ConnectionTimeout):
        return None
    pgconn = exc.pgconn
    # 57P03 and 53300 come before authentication: a server that asked for a password took it.
    if pgconn is None or pgconn.needs_password or pgconn.used_password:
        return None
    params = {option.keyword.decode(): option.val.decode(errors="replace")
              for option in pgconn.info if option.val is not None}
    params.update(_attempt(pgconn))
    try:
        with _open(params) as sock:
            return _first_answer(sock, user=params.get("user", ""),
                                 database=params.get("dbname", ""))
    except (OSError, ValueError, struct.error):
        return None


def _attempt(pgconn: psycopg.pq.abc.PGconn) -> dict[str, str]:
    """The host, address and port the failed attempt used, as libpq has them (PQhost,
    PQhostaddr, PQport): a conninfo that names no host connects to libpq's compiled-in socket
    folder (/var/run/postgresql, or /tmp, as libpq was built), which its options leave empty.
    (psycopg makes one attempt per host of a list, each naming its own.) Empty where libpq
    does not tell (a closed connection, a libpq before 12 for the address)."""
    found: dict[str, str] = {}
    for name in ("host", "hostaddr", "port"):
        try:
            value = getattr(pgconn, name)
        except psycopg.Error:  # a closed connection, or libpq before 12 (hostaddr)
            continue
        if value:
            found[name] = value.decode(errors="replace")
    if "host" in found:  # the attempt's own address, or none (a socket): not the options'
        found.setdefault("hostaddr", "")
    return found


def _open(params: dict[str, str]) -> socket.socket:
    host = params.get("hostaddr") or params.get("host") or ""
    port = int(params.get("port") or 5432)
    timeout = min(float(params.get("connect_timeout") or _LOOK_TIMEOUT_S), _LOOK_TIMEOUT_S)
    if host.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(f"{host}/.s.PGSQL.{port}")
        except OSError:
            sock.close()
            raise
        return sock
    if not host:
        raise ValueError("no host to look at")
    return socket.create_connection((host, port), timeout=timeout)


def _first_answer(sock: socket.socket, *, user: str, database: str) -> str | None:
    """Send a start-up message (protocol 3.0, no SSL) and read the SQLSTATE of an error the
    server answers before it asks for anything; None for an authentication request or any other
    message."""
    body = struct.pack("!I", _PROTOCOL_3) + b"".join(
        name + b"\0" + value.encode() + b"\0"
        for name, value in ((b"user", user), (b"database", database)) if value) + b"\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    for _ in range(16):
        kind = _read(sock, 1)
        (size,) = struct.unpack("!I", _read(sock, 4))
        if not 4 <= size <= 65536:
            return None
        payload = _read(sock, size - 4)
        if kind == b"E":
            for field in payload.split(b"\0"):
                if field[:1] == b"C":
                    return field[1:].decode("ascii", errors="replace")
            return None
        # AuthenticationOk (trust) is followed by the backend's own errors; any other request
        # means the server takes connections.
        if kind != b"R" or payload[:4] != b"\0\0\0\0":
            return None
    return None


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("the server closed the connection")
        data += chunk
    return data


@contextmanager
def answering_within(dbapi_connection: Any, seconds: float | None) -> Iterator[None]:
    """Another client time-out on ``dbapi_connection`` for a while: None for a migration, which
    takes as long as it takes (its transaction also sets ``statement_timeout`` to 0), a short
    one for the pool's ping."""
    if not isinstance(dbapi_connection, BoundedConnection):
        yield
        return
    before = dbapi_connection.answer_timeout
    dbapi_connection.answer_timeout = seconds
    try:
        yield
    finally:
        dbapi_connection.answer_timeout = before


def ping(dbapi_connection: Any, do_ping: Callable[[Any], object]) -> None:
    """The dialect's ping within ``PING_TIMEOUT_S`` (or the connection's own bound, if shorter);
    a connection that fails it is one the pool replaces (``DisconnectionError``)."""
    bound = getattr(dbapi_connection, "answer_timeout", None)
    try:
        with answering_within(dbapi_connection, min(PING_TIMEOUT_S, bound or PING_TIMEOUT_S)):
            do_ping(dbapi_connection)
    except psycopg.Error as exc:
        raise DisconnectionError(str(exc)) from exc
