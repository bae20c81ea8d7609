"""Lease owner names of one process, and whether the process a name names is gone.

A name is ``host:pid:uuid:space``. ``space`` says which processes ``pid`` is counted among: a
hash of this kernel's boot id and this process's pid namespace. Two containers may share a
hostname (and a database) while their pids are counted apart, so ``host`` and ``pid`` alone
could name a live process of another container as one that is gone here; with ``space`` a
process is only ever judged by one that sees the same pids.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import time
import uuid
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

# A temporary file a process writes and renames at once (a note, a candidate key) is a dead
# process's once this old: a live one renames it within microseconds.
STALE_TEMP_SECONDS = 60 * 60


@cache
def process_space() -> str:
    """This kernel boot's and pid namespace's mark, "" where it cannot be read (not Linux): an
    owner without one is never judged gone."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}/{namespace}".encode()).hexdigest()[:8]


def default_owner() -> str:
    """A lease owner name unique to this process (workers pass a stable one of their own)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{process_space()}"


def owner_is_gone(owner: str | None) -> bool:
    """Whether ``owner`` (``default_owner``'s form) names a process of this host and pid space
    that no longer exists: its lease is a dead process's, to take over now rather than when it
    lapses. False whenever that cannot be told: another host or container, an older name
    without a space, a worker's name (``host/tag/wN``), a pid that exists (perhaps reused by
    another process: then the lease lapses in its own time)."""
    if not owner:
        return False
    parts = owner.split(":")
    space = process_space()
    # ASCII digits only, and few of them: isdigit() takes '²' (which int() refuses) and any
    # script's digits, and int() refuses over 4300; names we never write (a tampered row).
    # Past 20 digits a pid is past C's int, which process_gone would not judge either.
    if (len(parts) != 4 or not space or parts[3] != space
            or parts[0] != socket.gethostname()
            or not (parts[1].isascii() and parts[1].isdigit()) or len(parts[1]) > 20):
        return False
    return process_gone(int(parts[1]), parts[3])


def process_gone(pid: int, space: str) -> bool:
    """Whether ``pid``, counted in ``space`` (``process_space``), is no process now: False
    whenever that cannot be told here (another space, or this one unknown; a pid that exists,
    perhaps taken again by another process). Also for the leftovers a process names after
    itself (a build's or a backup's scratch)."""
    here = process_space()
    if not here or space != here or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process: alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, run by another user
        return False
    except OverflowError:
        # A pid past C's int (a corrupt or planted name): not told here; its age decides.
        return False
    return False


def scratch_mark() -> str:
    """This process as the scratch it leaves names it (a tiny build's folder, a tar backup's
    ``.part`` and ``.partial``): ``<pid>-<space>`` (``process_space``), or the pid alone where
    the space is unknown, so that another process reads it back (``read_scratch_mark``) and
    judges the pid only where it counts pids as this one does (``process_gone``)."""
    space = process_space()
    return f"{os.getpid()}-{space}" if space else str(os.getpid())


def read_scratch_mark(mark: str) -> tuple[int, str] | None:
    """The pid and the space (``""``: none known) of a ``scratch_mark``, for ``process_gone``;
    None for text no release wrote. Read too: the pid alone (older backups, and any process
    that did not know its space) and ``<pid>-unknown`` (the tiny builds before this mark, which
    said so where the space was unknown). The pid is as written (0 included): whether such a
    pid is one of its names is the caller's to say."""
    pid, dash, space = mark.partition("-")
    # ASCII digits only, as scratch_mark writes them ("²" is a digit to str.isdigit, not to
    # int; int() reads any script's decimals, '\u0661' as 1). A file name is at most 255
    # bytes, so int()'s 4300 digits are never reached.
    if not (pid.isascii() and pid.isdecimal()):
        return None
    if not dash or space == "unknown":
        return int(pid), ""
    if not space or space.strip("0123456789abcdef"):
        return None
    return int(pid), space


def quiet_since(path: Path, cutoff: float) -> bool:
    """Whether nothing in ``path`` (itself included; a folder walked, links not followed) was
    modified after ``cutoff``: a leftover whose process cannot be judged (another machine's or
    container's) is its owner's no more once quiet for longer than that owner ever pauses."""
    if path.is_symlink():
        # Judged by the link itself: os.walk follows a link given as its top, so a link planted
        # under a leftover's name (to / say) had the whole tree it names walked.
        try:
            return path.lstat().st_mtime <= cutoff
        except FileNotFoundError:
            return True
    for parent, _dirs, files in os.walk(path):
        for found in (Path(parent), *(Path(parent) / name for name in files)):
            try:
                if found.lstat().st_mtime > cutoff:
                    return False
            except FileNotFoundError:
                continue
    try:
        return path.lstat().st_mtime <= cutoff  # a file (os.walk yields nothing for one)
    except FileNotFoundError:
        return True


def remove_stale_files(folder: Path, pattern: str, *, left_by: str) -> int:
    """Deletes the regular files of ``folder`` matching the glob ``pattern`` last written over
    ``STALE_TEMP_SECONDS`` ago: temporary files that a process killed before its rename left
    under its pid, which no later process looks at (each writes under its own; the pid may be
    taken again: a container's process is PID 1 every time). ``left_by`` names that process, for
    the log. How many went; one gone meanwhile, or not ours to remove, is skipped."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    removed = 0
    for leftover in folder.glob(pattern):
        try:
            found = leftover.lstat()
            if stat.S_ISREG(found.st_mode) and found.st_mtime < cutoff:
                leftover.unlink()
                logger.info("removed %s, left by %s that died", leftover, left_by)
                removed += 1
        except OSError as exc:
            logger.debug("cannot remove %s: %s", leftover, exc)
    return removed
