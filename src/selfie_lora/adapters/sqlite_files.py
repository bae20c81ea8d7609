"""SQLite files readable by their owner only.

The database holds every user's password hash and the hashes of their sessions and API keys:
created with the process's umask (022: 0644), any other local account could copy them for
offline cracking, while HOME/secret_key and the blobs are 0600. SQLite creates a database's
``-wal``, ``-shm`` and ``-journal`` with the main file's mode, so a main file made 0600 before
SQLite opens it keeps them all private."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")


def keep_private(database: str | os.PathLike[str] | None) -> None:
    """Before SQLite opens ``database`` (a file path): make it, empty, as 0600 when it is not
    there, and take every permission of the group and others from it and its side files when
    it is (a database of an earlier release: 0644). A folder that is missing is left to SQLite
    to refuse, as before; a file this process may not change is left as it is, with a
    warning."""
    if database is None or str(database) in ("", ":memory:") or str(database).startswith("file:"):
        return  # no file, or a URI SQLite resolves itself
    path = Path(database)
    if not path.parent.is_dir():
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        pass
    except OSError:
        return  # SQLite says why it cannot open it
    for file in (path, *(path.with_name(path.name + suffix) for suffix in SIDE_FILES)):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
            if mode & 0o077:
                os.chmod(file, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not make %s readable by its owner only (%s): other local "
                           "accounts may read it", file, exc)


def tighten(path: Path) -> int | None:
    """Take every permission of the group and others from ``path`` (a file of HOME an earlier
    release or an operator made 0644). Its mode before when it changed it, else None; a file
    this process may not change is left as it is, with a warning."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
            return mode
    except OSError as exc:
        logger.warning("could not make %s readable by its owner only (%s): other local "
                       "accounts may read it", path, exc)
    return None
