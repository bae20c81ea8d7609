"""What a database driver's error says, told one way for every driver this package uses: the full
disk's test (``disk_space.is_full_error``) and the repository's others (a read-only database)
read PostgreSQL's SQLSTATE and SQLite's primary result code alike. Apart from ``disk_space``,
which is about the disk, so that a database error's test does not import a disk module."""

from __future__ import annotations

import sqlite3


def driver_says(exc: BaseException | None, *, sqlstate: str, sqlite_code: int,
                words: str) -> bool:
    """Whether a database driver's error says what PostgreSQL names ``sqlstate`` (psycopg
    carries it as ``sqlstate``, psycopg2 as ``pgcode``) or SQLite names by its primary result
    code ``sqlite_code`` (the low byte of an extended one), by ``words`` where a SQLite error
    carries no code."""
    if sqlstate in (getattr(exc, "sqlstate", None), getattr(exc, "pgcode", None)):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite_code
    return words in str(exc)


# The words of a database call whose wait ran out with no answer from the server (a hung one, on
# which each further call waits as long again), where a refused or reset connection fails at once:
# BoundedConnection's answer timeout, libpq's and psycopg's connect timeout, the kernel's.
NO_ANSWER_WORDS = ("no answer from the server", "timeout expired", "connection timed out")


# SQLAlchemy's pool exhausted ("QueuePool limit of size N overflow M reached, connection timed
# out, timeout 30.00"): this process's own connections all in use, not the server's silence,
# though its words hold "connection timed out" (the repository says it DatabaseBusyError).
POOL_TAKEN_WORDS = "queuepool limit"


def gave_no_answer(exc: BaseException | None) -> bool:
    """Whether a database driver's error (or SQLAlchemy's, which carries the driver's words)
    says the server gave no answer within the driver's time (``NO_ANSWER_WORDS``); an
    exhausted pool's wait (``POOL_TAKEN_WORDS``) is not the server's."""
    said = str(exc).lower()
    if POOL_TAKEN_WORDS in said:
        return False
    return any(word in said for word in NO_ANSWER_WORDS)
