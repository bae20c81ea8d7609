"""``SELFIE_LORA_DATABASE_URL`` as it may be printed or logged, for the command line (start
line, start failures) and the database adapter (driver errors, migration log lines) alike.

SQLAlchemy's ``render_as_string(hide_password=True)`` masks only the userinfo password: a
password given as a query parameter (``...?password=s3cret``, the only place for one in the
socket form ``postgresql+psycopg:///db?host=/run/pg&password=...``) was printed at every start
and logged by every migration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

MASK = "***"

# Query parameters shown as they are: libpq's and SQLite's that name where and how to connect,
# never a secret (passfile, sslcert, sslkey, sslrootcert are paths to files, not their content).
# Every other parameter's value is masked: an allow-list, so that a parameter this list does not
# know (a driver's own, a future libpq one) is never printed.
SHOWN_PARAMETERS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "application_name", "fallback_application_name",
    "connect_timeout", "client_encoding", "options", "sslmode", "sslrootcert", "sslcert", "sslkey",
    "sslcrl", "sslcrldir", "sslsni", "gssencmode", "target_session_attrs", "load_balance_hosts",
    "passfile", "channel_binding", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "mode", "timeout", "uri", "cache", "service",
})
# SQLite's ``uri`` is a flag: any other value (a whole URL, with its password) is masked.
_FLAGS = {"uri": frozenset({"true", "false"})}


def _shown_value(name: str, value: str) -> str:
    if name not in SHOWN_PARAMETERS or value.lower() not in _FLAGS.get(name, {value.lower()}):
        return MASK
    return value


def database_url_shown(url: str | URL) -> str:
    """``url`` with every secret in it masked: the userinfo password and the value of every
    query parameter not in ``SHOWN_PARAMETERS`` (``?password=***``). Raises what SQLAlchemy's
    ``make_url`` raises for a string that is not a database URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url) if isinstance(url, str) else url
    host = parsed.host
    if host is not None and "@" in host:
        # A password holding an unescaped '@' ('u:p@ss@h'): SQLAlchemy takes 'ss@h' as the
        # host, so part of the password would show there.
        host = host.rpartition("@")[2]
    shown = parsed.set(host=host, query={}).render_as_string(hide_password=True)
    # Unescaped, as the operator wrote them ('host=/run/pg', not 'host=%2Frun%2Fpg').
    query = [f"{name}={_shown_value(name, value)}"
             for name, values in parsed.query.items()
             for value in ((values,) if isinstance(values, str) else values)]
    return f"{shown}?{'&'.join(query)}" if query else shown
