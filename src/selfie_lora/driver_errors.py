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
