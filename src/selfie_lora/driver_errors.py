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


def gave_no_answer(exc: BaseException | None) -> bool:
    """Whether a database driver's error (or SQLAlchemy's, which carries the driver's words)
    says the server gave no answer within the driver's time (``NO_ANSWER_WORDS``)."""
    said = str(exc).lower()
    return any(word in said for word in NO_ANSWER_WORDS)
