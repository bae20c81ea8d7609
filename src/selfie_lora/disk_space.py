"""Whether an error means a full disk, and how much room the disk holding a path has left: what
turns SQLite's "database or disk is full" (and its "disk I/O error" when it cannot even make its
``-wal``/``-shm`` files), or an ``OSError`` ENOSPC, into a sentence that says the disk is full
(or, for EDQUOT, that a quota is used up).

Shared by the adapters (which map such an error to ``StorageFullError``), the readiness check and
the command line's start failures. It reads only the file system's figures (``statvfs``)."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

from selfie_lora.driver_errors import driver_says

# Below this much free space the disk holding SELFIE_LORA_HOME counts as full: ``/readyz`` says
# its storage is not ok (README "Health"). An upload of photos, a training's checkpoint or a
# generation's pictures take several MB each, so with less than this the next write fails.
LOW_SPACE_BYTES = 16 * 1024 * 1024

# SQLite's primary result codes (the low byte of an extended one): SQLITE_IOERR is what it says
# when it cannot make or grow its WAL and shared-memory files on a full disk, SQLITE_FULL when a
# write of the database itself finds no room.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
# PostgreSQL's SQLSTATE disk_full (class 53, insufficient resources).
_PG_DISK_FULL = "53100"
# How a PostgreSQL server's message says a quota used up on its disk: it maps ENOSPC to
# disk_full but EDQUOT to no class of its own (internal_error, XX000), with the C library's words
# for it in the message ("could not extend file ...: Disk quota exceeded"). The words of the
# server's C library: glibc's "Disk quota exceeded", musl's "Quota exceeded" (the alpine
# images), BSD's and macOS's "Disc quota exceeded", all ending so. A server whose lc_messages
# translates them is not told apart (its quota is said as before).
_PG_QUOTA_WORDS = "quota exceeded"


def is_full_error(exc: BaseException | None) -> bool:
    """True for an error that says the disk (or a quota) is full, whatever raised it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _pg_quota(exc) or driver_says(exc, sqlstate=_PG_DISK_FULL, sqlite_code=_SQLITE_FULL,
                                         words="database or disk is full")


def _pg_quota(exc: BaseException | None) -> bool:
    """Whether a PostgreSQL driver's error (it carries a SQLSTATE: psycopg's ``sqlstate``,
    psycopg2's ``pgcode``) says a quota on the server's disk is used up (``_PG_QUOTA_WORDS``).
    SQLite's errors carry no errno: its EDQUOT is a "disk I/O error" or "database or disk is
    full", not told from other causes."""
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return state is not None and _PG_QUOTA_WORDS in str(exc).lower()


def is_io_error(exc: BaseException | None) -> bool:
    """SQLite's "disk I/O error": on a full disk, what it says when it cannot make its files."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == _SQLITE_IOERR
    return "disk i/o error" in str(exc).lower()


def free_bytes(path: Path | str) -> int | None:
    """The bytes free to this user on the disk holding ``path`` (its nearest existing folder);
    None when that cannot be read."""
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def is_quota_error(exc: BaseException | None) -> bool:
    """True for a quota used up (EDQUOT, or a PostgreSQL server's words for it): the disk itself
    may have room, which ``statvfs`` (and ``df``) show, since neither sees a user's, group's or
    project's quota."""
    return (isinstance(exc, OSError) and exc.errno == errno.EDQUOT) or _pg_quota(exc)


# What to do about a quota used up (EDQUOT), where a full disk's advice is to free space: the
# files the quota counts may lie elsewhere on the disk, and ``df`` shows room it does not give.
QUOTA_ADVICE = "raise the quota or delete files it counts"


def full_disk_words(path: Path | str, exc: BaseException | None = None, *,
                    label: str | None = None) -> str:
    """"the disk holding PATH is full (N free)", the free space left out when it cannot be read:
    how an adapter names the disk a full-disk error ``exc`` is about, for the operator. For a
    quota (EDQUOT) "the quota of this account on the disk holding PATH is used up (the disk
    itself has N free)": an operator told the disk is full while ``df`` shows room would not
    think of the quota. ``label``: what the sentence calls PATH (the command line's
    "SELFIE_LORA_HOME (PATH)"), its free space still PATH's disk's."""
    free = free_bytes(path)
    named = path if label is None else label
    if is_quota_error(exc):
        left = f" (the disk itself has {shown(free)} free)" if free is not None else ""
        return f"the quota of this account on the disk holding {named} is used up{left}"
    left = f" ({shown(free)} free)" if free is not None else ""
    return f"the disk holding {named} is full{left}"


def machine_disk_words(exc: BaseException, folder: Path | str) -> str:
    """How a training says this machine's full disk ``exc`` (met in its work, not by a store):
    "this machine's disk is full", and for a quota (EDQUOT) ``full_disk_words`` of the file the
    error names (else of ``folder``, the training's): the disk itself may have room, so "full"
    sent the operator to ``df``, which does not see a quota."""
    if not is_quota_error(exc):
        return "this machine's disk is full"
    named = getattr(exc, "filename", None)
    return full_disk_words(named if isinstance(named, str) else folder, exc)


def shown(size: int) -> str:
    """``size`` bytes as a person reads them: 0 KB, 40 KB, 3.2 MB, 1.5 GB."""
    if size < 1024 * 1024:
        return f"{size // 1024} KB"
    if size < 1024 ** 3:
        return f"{size / 1024 ** 2:.1f} MB"
    return f"{size / 1024 ** 3:.1f} GB"
