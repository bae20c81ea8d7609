"""Backup and restore of the default deployment: the SQLite files and the blobs in HOME.

Backup: the database (and the queue's) is copied with SQLite's online backup API, which reads a
consistent snapshot of a live database in WAL mode while servers and workers write to it; the
blobs are copied after it. Blobs are written before the rows naming them and never changed, so
every blob the snapshot names is already there (a collection that deleted one since is said as
missing); blobs written later are orphans the next collection takes. The manifest is written
last: a folder without one is a backup cut short, and ``restore`` refuses it.

Restore: everything is checked (manifest, sizes, sha256) and written to a folder beside HOME,
which then takes HOME's place with renames: HOME goes aside, the new folder takes its name, and
the old one is kept beside it as ``NAME.before-restore-<time>`` (never deleted: it holds what
the backup lacks, maybe the backup itself; the operator deletes it). A restore killed at any
point leaves the old HOME or the new one, never a mix; killed between the two renames, HOME is
missing and the next restore puts the old one back before it starts. Once HOME is the new
folder, the restore has happened: a later error (moving cache/ across) is a warning.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from selfie_lora.adapters.db.migrate import head_revision, known_revisions
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.db.tables import WorkerRow
from selfie_lora.adapters.home_lock import (
    IN_USE,
    holding,
    only_the_lock,
    restoring_home,
    sharing_home,
)
from selfie_lora.adapters.sqlite_files import PRIVATE_MODE
from selfie_lora.adapters.storage.cache import TMP_PREFIX, fsync_dir
from selfie_lora.config import DATABASE_FILE
from selfie_lora.disk_space import (
    QUOTA_ADVICE,
    free_bytes,
    full_disk_words,
    is_full_error,
    is_io_error,
    is_quota_error,
    shown,
)
from selfie_lora.domain.backup import BACKUP_FORMAT, MANIFEST_NAME, BackupSummary
from selfie_lora.errors import ConfigError, InvalidInputError, StorageError, StorageFullError
from selfie_lora.services.layout import manifest_key, photo_key
from selfie_lora.services.owners import (
    process_gone,
    quiet_since,
    read_scratch_mark,
    scratch_mark,
)

logger = logging.getLogger(__name__)

QUEUE = "queue.db"
SECRET_KEY = "secret_key"
BLOBS = "blobs"
CACHE = "cache"
# Written into a restored HOME: which backup it holds, and that a restore made it.
RESTORED = "restored.json"
# In a folder a restore is filling, until it is HOME: a ``.NAME.restore-new`` without it is the
# old HOME a restore killed after its exchange set aside, kept, never deleted.
PENDING = ".restore-pending"
# In a folder backup from its start until its manifest is written: one found with no manifest
# is a backup killed midway, which the next backup to that name says.
WRITING = ".backup-writing"
_CHUNK = 1 << 20


def _reached(step: str) -> None:
    """A step of a restore; tests replace it to kill the process there."""


def _is_mount(path: Path) -> bool:
    """Whether ``path`` is a mount point (tests replace it: mounting needs root)."""
    return os.path.ismount(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_private(source: Path, target: Path) -> str:
    """``source`` to ``target`` (mode 0600, made first so no byte is ever readable by others),
    synced to the disk; the sha256 of the bytes written, summed as they pass (a backup's
    manifest needs it, and reading each copy again doubled the reads of the blobs).
    ``FileNotFoundError`` when ``source`` is gone, with nothing made: the source is opened
    first, as a blob the garbage collection deleted since it was listed left an empty file
    (made O_EXCL before) that the backup's manifest does not name, which a restore refuses."""
    with source.open("rb") as src:
        _private_folders(target.parent)
        digest = hashlib.sha256()
        fd = _new_file(target)
        try:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    return digest.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    """``data`` written whole to ``fd``, unbuffered: an error (a full disk) is raised by this
    call, never later by a buffer's flush on close, so the caller knows it was a write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _UnwritableError(Exception):
    """A write of a restore beside HOME failed (``error``): the destination's fault, which
    ``_unpack`` must not take for a tar that is not a backup."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


# What a write says when the disk written to, not the backup read, is at fault.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (*_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


@contextmanager
def _writing_beside_home() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in _UNWRITABLE:
            raise _UnwritableError(exc) from exc
        raise


def _no_space(exc: OSError, *, where: Path, needs: int | None) -> str | None:
    """A full disk said as one: which folder's disk, how much is free there and about how much
    the work needs, in the words every full disk and quota is said in (``full_disk_words``; a
    quota, EDQUOT, as one: the disk itself may have room, which ``df`` shows). None for any
    other error."""
    if not is_full_error(exc):
        return None
    # In the unit the free space is said in (``shown``), so that the two compare as read.
    need = f"; it needs about {shown(needs)}" if needs else ""
    return f"{full_disk_words(where, exc)}{need}"


def _make_room(exc: OSError, *, then: str, there: str = "") -> str:
    """What to do about ``exc``, a full disk or a used-up quota (``_no_space``), then ``then``:
    freeing space does not help a quota whose files are elsewhere on that disk."""
    if is_quota_error(exc):
        return f"{QUOTA_ADVICE}, and {then}"
    return f"free some space{there} and {then}"


def _restore_needs(source: Path) -> int | None:
    """About what restoring ``source`` writes beside HOME: a tar is unpacked there, then
    copied, so twice its size; a folder is copied once."""
    try:
        if source.is_file():
            return 2 * source.stat().st_size
        return sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    except OSError:
        return None


def _new_file(path: Path) -> int:
    """``path`` made new, 0600, open for writing. Never a file that is already there, nor a
    link: one another account made first (in a folder it could write to) is refused, else it
    kept a handle on it and read what the backup wrote (security2 review: secret_key and the
    database)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE)


def _private_folders(folder: Path) -> None:
    """``folder`` and each missing folder above it made 0700 (``mkdir(parents=True)`` gives the
    ones above the umask's mode: 0755 for blobs/photos). Only inside a folder this backup or
    restore made 0700: one found there (a link is none) was made by it. Each is made new, never
    taken as it is: one that appears meanwhile is an error."""
    missing = []
    while not stat.S_ISDIR(_lstat_mode(folder)):
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(mode=0o700)


def _lstat_mode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except FileNotFoundError:
        return 0


_ANOTHER_ACCOUNTS = ("a backup holds secret_key and every password hash, and whoever owns or "
                     "can write to its folder can read and change them")


def _refuse_unless_mine(path: Path, found: os.stat_result, *, instead: str) -> None:
    """A folder or file a backup (or restore) found where it writes: refused, with one line,
    unless this account owns it and no other account can write to it."""
    if found.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to another account (uid {found.st_uid}): "
                          f"{_ANOTHER_ACCOUNTS}; {instead}")
    if stat.S_IMODE(found.st_mode) & 0o022:
        raise ConfigError(f"{path} can be written by other accounts (mode "
                          f"{stat.S_IMODE(found.st_mode):o}): {_ANOTHER_ACCOUNTS}; {instead}")


# What a second backup to the folder a running one writes is told.
_BEING_WRITTEN = ("is being written by another backup, running now: wait for its end, or name "
                  "another DEST")


def _make_dest_folder(dest: Path, stack: ExitStack) -> bool:
    """The backup folder ``dest`` made new, 0700 (True); or an empty folder already there
    taken, made 0700 (False), only when it is this account's and no other can write to it
    (another's stayed its owner's after the chmod, who then planted files in it: security2
    review). Checked on the folder opened, so it cannot be swapped between the check and the
    chmod. Claimed by making its ``WRITING`` file (``O_EXCL``) before it is found empty, which
    stays locked until ``stack`` closes: a second backup to it meanwhile is refused. Unclaimed,
    one started just after the first made it took it too (empty still) and wrote a whole
    backup there, and the first, failing on that one's files, deleted the folder with it."""
    try:
        dest.mkdir(mode=0o700)
        made = True
    except FileExistsError:
        made = False
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise ConfigError(f"{dest} already exists: name a new folder or .tar file") from None
    stack.callback(os.close, fd)
    if not made:
        _refuse_unless_mine(dest, os.fstat(fd), instead="name a new folder, or an empty one "
                            "of your own that no other account can write to")
    try:
        # The claim is the O_EXCL create (atomic on NFSv3 and later too), not a lock on the
        # folder: NFS and SMB emulate flock with POSIX locks, and an exclusive one needs an fd
        # open for writing, which a folder cannot be (EBADF: every folder backup there failed).
        claim = os.open(WRITING, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                        PRIVATE_MODE, dir_fd=fd)
    except FileExistsError:
        raise ConfigError(f"{dest} {_BEING_WRITTEN}") from None
    stack.callback(os.close, claim)  # and the lock with it
    try:
        _lock_claim(claim, dest / WRITING)
        if os.listdir(fd) != [WRITING]:
            # Another backup may have taken it and ended before this one claimed it.
            raise ConfigError(f"{dest} already exists: name a new folder or .tar file")
        os.fchmod(fd, 0o700)  # it holds secret_key
    except BaseException:
        os.unlink(WRITING, dir_fd=fd)
        if made:
            with suppress(OSError):
                dest.rmdir()  # only if empty: never another backup's
        raise
    return made


def _lock_claim(fd: int, path: Path) -> None:
    """The file ``path`` (open for writing as ``fd``) this backup made to claim its DEST
    (``WRITING``) or its tar's scratch (the ``.part``, ``_claim_part``) locked, so that another
    backup tells a running one from one that ended (``_backup_holds``). Blocking:
    only such a check, or a sweep's delete (``_unlink_unheld``), can hold it, each for a few
    syscalls. Where the file system has no locks (NFSv3
    without lockd: ENOLCK), the O_EXCL create still refuses a second backup to the name; only
    what another backup can tell of it differs."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        logger.warning("cannot lock %s (%s): another backup cannot tell this one is running",
                       path, exc.strerror or exc)


def _empty(folder: Path) -> None:
    """What a failed backup wrote into the empty folder it was given: all that is in it (0700,
    this account's), the folder itself kept, as it was there before."""
    try:
        children = list(folder.iterdir())
    except OSError:
        return  # gone, or unreadable: nothing of this backup's to remove
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# SQLite's extended codes of an I/O error while it read (SQLITE_IOERR_READ, _SHORT_READ): HOME's
# disk failing under the copy's source, which no room on the backup's disk explains.
_SQLITE_IOERR_READS = frozenset({266, 522})


def _read_error(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _SQLITE_IOERR_READS


def _database_bytes(database: Path) -> int:
    """The bytes of ``database`` and its -wal: about what SQLite writes copying or rewriting it."""
    total = 0
    for path in (database, database.with_name(f"{database.name}-wal")):
        with suppress(OSError):
            total += path.stat().st_size
    return total


@contextmanager
def _sqlite_writing(target: Path, *, needs: int | None = None) -> Iterator[None]:
    """SQLite's "database or disk is full" while it writes ``target`` in the backup: the
    disk of the backup is full, said as the OSError a file's write gives (it is no error of
    HOME's database, which is only read). Its "disk I/O error" too when ``target``'s disk has
    no room (``_no_room_beside``): SQLite says that for every refused write but ENOSPC, a
    quota's EDQUOT included, which went past the full disk's handling as a fault. ``needs``:
    the bytes the write may take (unset: ``target``'s own, as a rewrite of it); an error while
    SQLite read (HOME's disk failing) is never read as the backup's disk."""
    try:
        yield
    except sqlite3.Error as exc:
        code = errno.ENOSPC if is_full_error(exc) else (
            _no_room_beside(target, needs=_database_bytes(target) if needs is None else needs)
            if is_io_error(exc) and not _read_error(exc) else None)
        if code is not None:
            raise OSError(code, os.strerror(code), str(target)) from exc
        raise


def _no_room_beside(target: Path, *, needs: int) -> int | None:
    """ENOSPC or EDQUOT when ``target``'s disk has no room for this account: a block written
    to a new file beside it is refused so (a quota, which ``statvfs`` cannot see), or the disk
    has less free than the write ``needs`` (a fixed 16 MB, here before, called a disk with room
    for a backup of 0.3 MB full, "10.5 MB free; it needs about 0.3 MB"). None when it has room:
    the I/O error is something else."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{target.name}.room-", dir=target.parent)
    except OSError as exc:
        return exc.errno if is_full_error(exc) else None
    try:
        os.write(fd, bytes(4096))  # a block: an empty file may need none
    except OSError as exc:
        if is_full_error(exc):
            return exc.errno
    finally:
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    free = free_bytes(target.parent)
    return errno.ENOSPC if free is not None and free < needs else None


def _backup_needs(home: Path, *, as_tar: bool) -> int | None:
    """About what a backup of ``home`` writes: its database, queue, key and blobs; twice
    that for a tar, built from a folder beside it."""
    try:
        size = sum(p.stat().st_size for p in (home / DATABASE_FILE, home / QUEUE,
                                              home / SECRET_KEY) if p.is_file())
        size += sum(p.stat().st_size for _key, p in _blob_files(home / BLOBS))
    except OSError:
        return None
    return 2 * size if as_tar else size


# What a tar backup writes beside its DEST until it is whole (``HomeBackups.backup``): named
# for DEST and the backup's ``scratch_mark`` (its pid and process space; read back by
# ``read_scratch_mark``, which reads older backups' pid alone too, and ``<pid>-unknown``, the
# tiny builds' old mark no backup wrote, as that pid alone: one reader, judged the same way).
_LEFTOVER = re.compile(r"\.(?P<dest>.+\.tar)\.(?P<mark>[^.]+)\.(?:part|partial)")
# Another name's leftover whose backup cannot be judged gone goes once untouched this long,
# judged with its partner (``_partner``): a running backup writes one of the two all along
# (each blob a new file in the ``.partial``, then the tar into the ``.part``), so never are
# both still for an hour; either alone may be (the ``.partial`` is only read while the tar is
# written, for hours to a slow NFS folder; the ``.part`` is left empty while blobs are copied).
_OTHERS_QUIET_SECONDS = 60 * 60


def _partner(path: Path) -> Path:
    """The other of a tar backup's scratch pair: ``.NAME.<pid>.part`` for its ``.partial``
    folder, and the other way round."""
    name = path.name
    if name.endswith(".partial"):
        return path.with_name(name.removesuffix("ial"))
    return path.with_name(f"{name}ial")


def _claim_part(part: Path, dest: Path, stack: ExitStack) -> int:
    """This tar backup's ``.part`` made new (0600 from its first byte whatever the umask: it
    will hold the database and secret_key), before its ``.partial`` folder, open for writing,
    and locked until ``stack`` closes: the kernel drops the lock with the process, so the next
    backup knows one it can lock (and the ``.partial`` beside it, ``_in_use``) was left by a
    backup that ended. A pid in the name could not say so: pids are reused (a container's
    backup is PID 1 every time), and a reused one kept the leftovers for good. A regular file
    open for writing, not the folder: NFS and SMB refuse an exclusive lock on an fd open
    read-only (EBADF), as a folder's must be, and every tar backup there failed."""
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE)
    except FileExistsError:
        _scratch(part, dest)
        raise
    stack.callback(os.close, fd)  # and the lock with it
    try:
        _lock_claim(fd, part)
    except BaseException:
        part.unlink(missing_ok=True)  # made here, not yet among what the backup deletes
        raise
    if not _names(part, fd):
        # Deleted before it was locked, by the sweep of another backup to DEST started at the
        # same instant (``_clear_leftovers``: unlocked, named for its DEST): written on, it took
        # the whole tar into a file no name held, and the backup failed only at its rename
        # ("No such file or directory"). Refused at once; the name, if any, is not this file.
        raise ConfigError(f"{dest} {_BEING_WRITTEN} (its start deleted this one's scratch as "
                          "a leftover)")
    return fd


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) is the file open as ``fd``."""
    try:
        named = path.lstat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ESTALE:
            raise
        return False  # NFS: deleted by another machine, its handle stale here
    return os.path.samestat(named, os.fstat(fd))


def _backup_holds(path: Path) -> bool | None:
    """Whether a running backup holds the file ``path`` locked: its DEST folder's ``WRITING``
    (``_make_dest_folder``) or its tar's ``.part`` (``_claim_part``). False once it is gone or
    can be locked; None where that cannot be asked (a link, not ours to read, a lock this file
    system refuses: EBADF, ENOLCK, EIO), which each caller answers on its own safe side.
    Asked with a shared lock, which a read-only fd may take on NFS and SMB too (an exclusive
    one there needs an fd open for writing): a backup holds its own exclusive, so a shared one
    is refused while it runs. An open refused at once (EWOULDBLOCK, as ``O_NONBLOCK`` asks)
    by a lease another process holds on the file (``F_SETLEASE``; a process that merely has it
    open for writing never refuses one) is taken as held too. (The blob cache asks with an
    exclusive one, ``held``, because its readers hold its copies shared.)"""
    try:
        os.close(_open_shared(path))
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.debug("cannot ask for the lock of %s: %s", path, exc)
        return None
    return False


def _open_shared(path: Path) -> int:
    """``path`` (not followed) opened read-only and locked shared, neither waited for (a FIFO
    opened so never hangs): its fd, the caller's to close. BlockingIOError when a backup holds
    it (``_lock_claim``: exclusive) or another's lease refuses the open (``_backup_holds``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _in_use(path: Path) -> bool:
    """Whether a running backup holds ``path``: its ``.part`` locked (``_claim_part``), which
    holds the ``.partial`` folder beside it too."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    kind = found.st_mode
    if stat.S_ISLNK(kind):
        # No backup's: this account's is deleted, never followed; another account's is not ours
        # to delete (in a shared sticky folder that failed with EPERM, and every tar backup there
        # with it).
        return found.st_uid != os.geteuid()
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        # No backup makes one (a FIFO, a device): left alone, never opened.
        return True
    if found.st_uid != os.geteuid():
        # Another account's: not ours to delete (root could; nor is it a backup of ours).
        return True
    if stat.S_ISDIR(kind):
        if not path.name.endswith(".partial"):
            return True  # no backup makes a folder ``.part``: left alone
        # No backup locks its folder: it locks the .part beside it, made (and locked) before
        # the folder, and held until the folder is gone. Gone, it holds the folder no more.
        return _in_use(_partner(path))
    # One whose lock cannot be asked for is left alone: else that one error ended every tar
    # backup into the folder.
    return _backup_holds(path) is not False


def _clear_leftovers(dest: Path) -> None:
    """The ``.NAME.tar.<pid>.part`` tar and ``.partial`` folder of a backup that was killed (or
    hit a full disk) to DEST or to any other tar beside it: the database and secret_key sat
    there for good, and backups named by date (``backup /backups/$(date +%F).tar``) never write
    to one name twice. Those of this account that no running backup holds locked are deleted;
    another account's are left alone (and refused by ``_scratch`` when this backup's own name is
    one of them). Another name's may be a running backup's that cannot be seen holding it (on
    another machine sharing a folder whose locks hold only on each machine: NFS mounted
    ``nolock`` or ``local_lock=flock``, while Linux's default NFS mounts lock at the server,
    which holds across machines; or between its create and its flock), so it goes only when it
    names this machine's process space and a pid gone, or once nothing in it nor in its partner
    (``_partner``) changed for an hour."""
    cutoff = time.time() - _OTHERS_QUIET_SECONDS
    for left in dest.parent.glob(".*.tar.*.part*"):
        named = _LEFTOVER.fullmatch(left.name)
        owner = read_scratch_mark(named["mark"]) if named else None
        if not named or owner is None or _in_use(left):
            continue
        if (named["dest"] != dest.name
                and not process_gone(*owner)
                and not (quiet_since(left, cutoff) and quiet_since(_partner(left), cutoff))):
            logger.debug("left %s: another backup's, perhaps running", left)
            continue
        if left.is_symlink():
            try:
                left.unlink(missing_ok=True)  # no backup makes one, nor locks it
            except OSError as exc:  # EPERM: made another account's meanwhile (sticky folder)
                logger.debug("left %s: %s", left, exc)
                continue
            logger.warning("deleted %s, left by a backup that did not finish", left)
        elif left.is_dir():
            # Only once its .part is locked does a backup make its .partial: found free, it is
            # no running backup's.
            logger.warning("deleting %s, left by a backup that did not finish", left)
            shutil.rmtree(left, ignore_errors=True)
        else:
            _unlink_unheld(left)


def _unlink_unheld(path: Path) -> None:
    """``path``, a ``.part`` found free (``_in_use``), deleted holding its lock (shared), and
    only while it is still the file locked. Found free, it may be a backup's made an instant
    before and not yet locked (``_claim_part``): deleted after that backup had locked it and
    found it still named, it took the backup's whole tar for nothing. Held through the delete,
    the lock makes that backup's wait for the delete (it then finds its name gone and is
    refused at once), and one a backup locked since it was found free is kept."""
    try:
        fd = _open_shared(path)
    except OSError as exc:  # BlockingIOError: a backup holds it now
        logger.debug("left %s: %s", path, exc)
        return  # gone meanwhile, no more ours to open, or held: not deleted here
    # Only syscalls while the lock is held, the lines said once it is let go: a line written
    # to a stderr that blocks (a full pipe, a paused terminal) or a Ctrl-Z there held the
    # backup waiting for this delete as long.
    kept: OSError | str | None = None
    try:
        locked = os.fstat(fd)
        if not (stat.S_ISREG(locked.st_mode) and locked.st_uid == os.geteuid()):
            # Put under its name since it was found free (a FIFO, another account's file):
            # no backup's of ours, left alone as ``_in_use`` leaves it.
            kept = "no file of this account's"
        elif not _names(path, fd):
            return  # made again meanwhile: judged by the next sweep
        else:
            path.unlink()
    except OSError as exc:
        kept = exc
    finally:
        os.close(fd)
    if kept is not None:
        logger.debug("left %s: %s", path, kept)
    else:
        logger.warning("deleted %s, left by a backup that did not finish", path)


def _scratch(path: Path, dest: Path) -> None:
    """This backup's own ``.part``/``.partial`` name, found taken after ``_clear_leftovers``:
    another account's (made in advance for the pids to come, held locked so that it looked
    like a running backup's: security2 review) or one a backup of this account holds. Refused
    in one line; never written into, nor deleted."""
    found = path.lstat()
    _refuse_unless_mine(path, found, instead=f"move it away, or back up to a folder no other "
                        f"account can write to (another can write to {dest.parent})")
    raise ConfigError(f"{path} is in the way of this backup (a running backup holds it): "
                      "try again, or name another DEST")


def _write_tar(folder: Path, fd: int, part: Path, dest: Path) -> None:
    """``folder`` as the tar ``dest``: written to ``part`` (open as ``fd``, ``_claim_part``),
    synced, then renamed."""
    # Left open here (``closefd``): ``fd`` keeps the lock until the scratch is cleared, and no
    # other fd of the file is ever closed (NFS emulates flock with POSIX locks).
    with os.fdopen(fd, "wb", closefd=False) as out:
        with tarfile.open(fileobj=out, mode="w") as tar:
            tar.add(folder, arcname=".")
        out.flush()
        os.fsync(out.fileno())  # else a power loss can leave DEST named but short
    try:
        # Never over a DEST made since it was found free: another backup to the same name,
        # run at once, ended first and said "wrote DEST"; os.replace put this tar in its place.
        _rename_new(part, dest)
    except FileExistsError:
        raise ConfigError(f"{dest} was written by another backup meanwhile: this one is not "
                          "kept; name a new folder or .tar file") from None
    fsync_dir(dest.parent)


# What a file system without hard links says to os.link.
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK)


def _rename_new(source: Path, target: Path) -> None:
    """``source`` renamed ``target``, ``FileExistsError`` where ``target`` is there: at once
    (renameat2's RENAME_NOREPLACE; or, where the file system lacks it, as NFS, CIFS and many
    FUSE ones do, a hard link, which fails at once on a taken name, then ``source`` unlinked).
    Only where hard links are missing too (FAT) is it checked first, then replaced: a backup
    made in the instant between is replaced there."""
    if _renameat2(source, target, flags=_RENAME_NOREPLACE):
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    else:
        source.unlink()
        return
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.replace(source, target)


def _snapshot(source: Path, target: Path) -> None:
    """A consistent copy of the live SQLite database ``source`` (WAL and writers included), as
    one self-contained file (rollback journal, no -wal to go with it)."""
    os.close(_new_file(target))  # 0600 before SQLite opens it, which then keeps that mode
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            with _sqlite_writing(target, needs=_database_bytes(source)):
                src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    with _sqlite_writing(target):
        _single_file(target)


def _single_file(database: Path) -> None:
    """``database`` in rollback-journal mode, its -wal checkpointed into it and gone."""
    db = sqlite3.connect(database)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()


def _forget_workers(database: Path) -> None:
    """The restored copy ``database`` without the ``workers`` rows: they are the presence of the
    processes that consumed the queue where and when the backup was taken, not data. Kept, the
    restored HOME's /metrics counted them (``selfie_lora_workers``: live while their expiry was
    ahead, then stale for an hour), none of them there. Done on the copy (the backup, summed,
    stays as it was made), and on a backup of any age: one older than the table has none."""
    table = WorkerRow.__tablename__
    db = sqlite3.connect(database)
    try:
        with _sqlite_writing(database), db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                          (table,)).fetchone():
                db.execute(f'DELETE FROM "{table}"')
    finally:
        db.close()


def _counts_and_revision(database: Path) -> tuple[dict[str, int], str | None]:
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        counts = {t: int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])
                  for t in tables if t != "alembic_version"}
        revision = None
        if "alembic_version" in tables:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
    finally:
        db.close()
    return counts, revision


def _named_keys(database: Path) -> set[str]:
    """The blobs the snapshot's rows cannot do without: photos, manifests, weights, pictures."""
    engine = make_engine(f"sqlite:///{database}")
    try:
        refs = SqlRepository(engine).gc_references()
    finally:
        engine.dispose()
    keys = set(refs.weights_keys)
    for dataset in refs.datasets:
        keys.add(manifest_key(dataset.id))
        keys.update(photo_key(h) for h in dataset.photo_hashes)
    for generation in refs.generations:
        keys.update(generation.image_keys)
    return keys


def _named_keys_of(database: Path, *, revision: str | None) -> set[str]:
    """``_named_keys``, or none on an older schema whose tables this release's queries do not
    find (0001 has no version_quality): the backup copies such a database as it is (README
    "Rolling back"), and only its check of missing blobs is skipped, said in the log. It ended
    the backup ('database error: no such table: version_quality')."""
    try:
        return _named_keys(database)
    except StorageError as exc:
        if isinstance(exc, StorageFullError) or revision == head_revision():
            raise
        logger.warning("the backup's database is at an older schema (%s): the blobs it names "
                       "are not checked for missing ones (%s)", revision, exc.message)
        return set()


def _blob_files(root: Path) -> Iterator[tuple[str, Path]]:
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.startswith(TMP_PREFIX):  # a write in progress is no blob yet
                path = Path(folder) / name
                yield path.relative_to(root).as_posix(), path


class HomeBackups:
    """Backups of the SQLite database, the queue, the secret key and the blobs in ``home``."""

    def __init__(self, *, home: Path) -> None:
        self._home = home

    # -- backup ------------------------------------------------------------------------------

    def backup(self, *, dest: Path) -> BackupSummary:
        # Shared, as a server's: never during a restore, nor a restore during it, which swapped
        # HOME between the database's snapshot and the blobs (the restored HOME's) it copied.
        with sharing_home(self._home):
            return self._backup_held(dest=dest)

    def _backup_held(self, *, dest: Path) -> BackupSummary:
        database = self._home / DATABASE_FILE
        if not database.is_file():
            raise ConfigError(f"nothing to back up: no database in {self._home} "
                              "(SELFIE_LORA_HOME)")
        as_tar = dest.name.endswith(".tar")
        if (not as_tar and dest.is_dir() and not dest.is_symlink()
                and (dest / WRITING).is_file() and not (dest / MANIFEST_NAME).exists()):
            # One whose lock cannot be asked for (no locks here) is said as cut short.
            if _backup_holds(dest / WRITING):
                # Not cut short: a backup writes it now (``_make_dest_folder``).
                raise ConfigError(f"{dest} {_BEING_WRITTEN}")
            # A folder backup killed while it wrote (the tar's scratch is cleared instead: its
            # own name, locked): never deleted here, as DEST is the operator's, but said as
            # what it is rather than only "already exists".
            raise ConfigError(f"{dest} holds a backup cut short (killed while it wrote: it has "
                              f"no {MANIFEST_NAME}), which restore refuses: delete it and back "
                              "up again, or name a new folder")
        if dest.is_symlink() or (dest.exists() and (as_tar or not dest.is_dir()
                                                    or any(dest.iterdir()))):
            raise ConfigError(f"{dest} already exists: name a new folder or .tar file")
        # The pid with the process space it counts in: another backup judges it by that alone.
        me = scratch_mark()
        folder = dest.with_name(f".{dest.name}.{me}.partial") if as_tar else dest
        part = dest.with_name(f".{dest.name}.{me}.part")
        made: list[Path] = []  # deleted if it fails: what this backup made, nothing else
        taken: list[Path] = []  # the empty DEST it was given: emptied again if it fails
        done = False
        # The locks on what this backup writes, held until what it made is cleared away too:
        # else another backup could take DEST between the two.
        with ExitStack() as stack:
            try:
                summary = self._backup(dest, folder, part, stack, made, taken, as_tar=as_tar)
                done = True
                return summary
            except OSError as exc:
                full = _no_space(exc, where=dest.parent, needs=_backup_needs(self._home,
                                                                             as_tar=as_tar))
                if full:
                    # StorageFullError as every full disk's (a quota said as one): the error
                    # tree's word for it, not the plain StorageError of a fault to trace.
                    raise StorageFullError(f"cannot write the backup to {dest}: {full}; nothing "
                                           "of it was left there: "
                                           f"{_make_room(exc, then='back up again')}",
                                           quota=is_quota_error(exc)) from exc
                raise StorageError(f"cannot write the backup to {dest}: "
                                   f"{exc.strerror or exc}") from exc
            finally:
                if as_tar and folder in made:
                    shutil.rmtree(folder, ignore_errors=True)
                if as_tar and part in made:
                    part.unlink(missing_ok=True)
                # A folder cut short blocked the next backup to its name ("already exists")
                # until deleted by hand: removed as the tar's scratch is, never a folder found
                # there.
                if not done and dest in made:
                    shutil.rmtree(dest, ignore_errors=True)
                if not done and dest in taken:
                    _empty(dest)

    def _backup(self, dest: Path, folder: Path, part: Path, stack: ExitStack,
                made: list[Path], taken: list[Path], *, as_tar: bool) -> BackupSummary:
        if as_tar:
            _clear_leftovers(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part_fd = -1
        if as_tar:
            # The .part first: locked, it says the .partial folder is in use from its start.
            part_fd = _claim_part(part, dest, stack)
            made.append(part)
            try:
                folder.mkdir(mode=0o700)  # new, never one found there (a link neither)
            except FileExistsError:
                _scratch(folder, dest)
                raise
            made.append(folder)
        else:
            (made if _make_dest_folder(dest, stack) else taken).append(dest)
            fsync_dir(dest)
        summary = self._write(folder)
        if not as_tar:
            # The manifest is there: the backup is whole (a copy of the folder, tarred by
            # hand, must hold nothing a restore does not know).
            (dest / WRITING).unlink()
            fsync_dir(dest)
        if as_tar:
            _write_tar(folder, part_fd, part, dest)
        return replace(summary, path=dest)

    def _write(self, folder: Path) -> BackupSummary:
        created_at = datetime.now(UTC).isoformat()
        # The database first, the blobs after: every blob it names is written by then.
        _snapshot(self._home / DATABASE_FILE, folder / DATABASE_FILE)
        counts, revision = _counts_and_revision(folder / DATABASE_FILE)
        named = _named_keys_of(folder / DATABASE_FILE, revision=revision)
        # Reading it switched it to WAL (the engine's setting): one file again, then summed.
        with _sqlite_writing(folder / DATABASE_FILE):
            _single_file(folder / DATABASE_FILE)
        files = {DATABASE_FILE: _sha256(folder / DATABASE_FILE)}
        if (self._home / QUEUE).is_file():
            _snapshot(self._home / QUEUE, folder / QUEUE)
            files[QUEUE] = _sha256(folder / QUEUE)
        if (self._home / SECRET_KEY).is_file():
            files[SECRET_KEY] = _copy_private(self._home / SECRET_KEY, folder / SECRET_KEY)
        blobs: dict[str, dict[str, object]] = {}
        total = 0
        for key, path in _blob_files(self._home / BLOBS):
            target = folder / BLOBS / key
            try:
                digest = _copy_private(path, target)
            except FileNotFoundError:
                continue  # collected since it was listed
            size = target.stat().st_size
            blobs[key] = {"size": size, "sha256": digest}
            total += size
        missing = tuple(sorted(named - blobs.keys()))
        if missing:
            logger.warning("%d blob(s) the database names are not in the storage: %s",
                           len(missing), ", ".join(missing[:5]))
        manifest = {"format": BACKUP_FORMAT, "schema_revision": revision,
                    "created_at": created_at, "counts": counts, "files": files,
                    "blobs": blobs, "missing": list(missing)}
        tmp = folder / f".{MANIFEST_NAME}.tmp"
        fd = _new_file(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / MANIFEST_NAME)  # last: the backup is whole
        fsync_dir(folder)
        return BackupSummary(path=folder, created_at=created_at, schema_revision=revision,
                             counts=counts, blobs=len(blobs), blob_bytes=total, missing=missing)

    # -- restore -----------------------------------------------------------------------------

    def restore(self, *, source: Path, force: bool) -> BackupSummary:
        # A HOME that is a link (/srv/selfie -> /mnt/data/selfie) is restored where it points:
        # the folders beside it, on its disk, and the link left as it is. Beside the link, the
        # exchange swapped the link itself, and every later restore found its name taken.
        home = self._home.resolve()
        if _is_mount(home):
            # The swap renames HOME's folder, which a mount point cannot be (EBUSY): refused
            # before anything is written, as the copy beside it would also have been on the
            # disk above the mount (a container's own layer), not on HOME's.
            raise ConfigError(
                f"SELFIE_LORA_HOME ({home}) is a mount point (a disk or a container volume): a "
                "restore replaces HOME's folder by another made beside it, which a mount point "
                f"cannot be; set SELFIE_LORA_HOME to a folder inside it (such as {home / 'home'}) "
                "for the restore and the service, or mount the disk one folder up; nothing was "
                "changed")
        # Never under a running server or worker: it would go on writing into the old HOME's
        # unlinked database, and its blobs into the new HOME.
        self._put_back(home)
        with restoring_home(home):
            return self._restore(home, source=source, force=force)

    @staticmethod
    def _put_back(home: Path) -> None:
        """A restore killed between its two renames left no HOME and the old one aside: put it
        back, before ``restoring_home`` makes a HOME to lock (the new one is whole too, but the
        restore that made it did not finish)."""
        old = home.with_name(f".{home.name}.restore-old")
        if old.is_dir() and not home.exists() and not home.is_symlink():
            _restore_scratch(old)
            os.rename(old, home)
            logger.warning("put back %s, which a restore killed midway had set aside", home)

    def _restore(self, home: Path, *, source: Path, force: bool) -> BackupSummary:
        recovered = self._recover(home)
        if not source.exists():
            raise InvalidInputError(f"no such backup: {source}")
        if home.exists() and not home.is_dir():
            raise ConfigError(f"SELFIE_LORA_HOME ({home}) is a file, not a folder")
        # Empty but for the lock: made by this restore (or one before it) to hold the lock.
        if home.is_dir() and not only_the_lock(home) and not force:
            raise ConfigError(f"SELFIE_LORA_HOME ({home}) is not empty: stop the server and "
                              "workers, then restore with --force to replace what is in it")
        new = home.with_name(f".{home.name}.restore-new")
        with ExitStack() as stack:
            summary = self._replace(home, new, stack, source=source)
        # Said with this restore's own output too, not only logged: until now that HOME waited
        # under a hidden name that nothing pointed at.
        return replace(summary, warnings=(*recovered, *summary.warnings))

    def _replace(self, home: Path, new: Path, stack: ExitStack, *,
                 source: Path) -> BackupSummary:
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            new.mkdir(mode=0o700)
            (new / PENDING).touch(mode=0o600)
            # Locked before it becomes HOME, until the restore ends.
            stack.enter_context(holding(new))
            if source.is_file():
                unpacked = home.with_name(f".{home.name}.restore-unpacked")
                if unpacked.is_symlink() or (unpacked.exists() and not unpacked.is_dir()):
                    # Followed, the database and secret_key were unpacked into the link's
                    # target and left there (rmtree skips a link).
                    raise ConfigError(f"{unpacked} is in the way of a restore: move it away "
                                      "first")
                _restore_scratch(unpacked)
                shutil.rmtree(unpacked, ignore_errors=True)  # a killed restore's
                try:
                    self._unpack(source, unpacked)
                    summary = self._fill(unpacked, new, source=source)
                finally:
                    shutil.rmtree(unpacked, ignore_errors=True)
            else:
                summary = self._fill(source, new, source=source)
            # Raises only while HOME is still the old folder; ``new`` is then ours to delete.
            previous = self._swap(home, new)
        except OSError as exc:
            _discard(new, home)
            full = _no_space(exc, where=home.parent, needs=_restore_needs(source))
            if full:
                # Never "not a backup": a user told so may throw a good backup away.
                raise StorageFullError(
                    f"cannot restore into {home}: {full}; the backup is not at fault and "
                    "nothing was changed: "
                    f"{_make_room(exc, then='restore again', there=' there')}",
                    quota=is_quota_error(exc)) from exc
            raise StorageError(f"cannot restore into {home}: {exc.strerror or exc}") from exc
        except Exception:
            _discard(new, home)
            raise
        # HOME is the backup's now: nothing from here on fails the restore, nor deletes.
        warnings: list[str] = []
        try:
            fsync_dir(home.parent)
            (home / PENDING).unlink(missing_ok=True)
        except OSError as exc:
            warnings.append(f"could not sync {home.parent}: {exc.strerror or exc}")
        kept = None
        if previous is not None and only_the_lock(previous):
            # The empty HOME this restore made to lock: nothing in it to keep.
            shutil.rmtree(previous, ignore_errors=True)
        elif previous is not None:
            warnings += _carry_cache(previous, home)
            kept, problem = _keep_aside(previous, home)
            if problem:
                warnings.append(problem)
        for warning in warnings:
            logger.warning("%s", warning)
        return replace(summary, path=home, replaced=kept, warnings=tuple(warnings))

    @staticmethod
    def _recover(home: Path) -> list[str]:
        """One restore killed after its swap left the old HOME aside: keep it as a restore that
        ends does, and say where. (One killed between its two renames, with no HOME left, was
        put back by ``_put_back`` before ``restoring_home`` made a HOME to lock, so HOME is
        there now.)"""
        said: list[str] = []
        old = home.with_name(f".{home.name}.restore-old")
        new = home.with_name(f".{home.name}.restore-new")
        deleting = _deleting(home)
        _restore_scratch(old)
        _restore_scratch(new)
        _restore_scratch(deleting)
        if deleting.is_symlink() or (deleting.exists() and not deleting.is_dir()):
            raise ConfigError(f"{deleting} is in the way of a restore: move it away first")
        if deleting.is_dir():
            shutil.rmtree(deleting)  # a delete killed midway: what it had not deleted yet
        if old.is_dir() and (home / RESTORED).is_file():
            # Killed after the swap, before the old one was kept aside.
            _carry_cache(old, home)
            said.append(_recovered(old, home))
        elif old.is_dir():
            raise ConfigError(f"{old} is a SELFIE_LORA_HOME a restore killed midway set aside, "
                              f"and {home} was made since: move one of them away first")
        if new.is_symlink() or (new.exists() and not new.is_dir()):
            raise ConfigError(f"{new} is in the way of a restore: move it away first")
        if new.is_dir() and (new / PENDING).exists():
            _delete(new, home)  # a restore killed before its swap: a copy of a backup
        elif new.is_dir():
            # Killed after its exchange: this is the HOME it replaced.
            _carry_cache(new, home)
            said.append(_recovered(new, home))
        if home.is_dir():
            (home / PENDING).unlink(missing_ok=True)
        return said

    @staticmethod
    def _unpack(source: Path, folder: Path) -> None:
        """The tar ``source`` into ``folder``: the files its manifest names, each checked
        against it before a byte is written, and nothing else. Unpacked whole first, a 10 KB
        tar with a sparse member (or junk the manifest never names) filled the disk beside
        HOME before any check. Done here rather than by ``extractall(filter="data")``:
        ``filter`` came with Python 3.11.4, and 3.11.0-3.11.3 answered a restore with a
        TypeError's traceback."""
        _refuse_compressed(source)
        try:
            # "r:": uncompressed only (as backup writes it). tarfile.open(source) inflated a
            # gzip, bz2 or xz tar on the fly, and the sizes checked below are the manifest's,
            # which whoever made the tar wrote: 510 KB of gzip wrote 512 MB beside HOME before
            # a sha256 failed. Uncompressed, no member holds more than the tar file itself.
            with tarfile.open(source, "r:") as tar:
                members = tar.getmembers()  # headers only: the data is skipped over
                for member in members:
                    _check_kind(member, source=source)
                sizes = _manifest_sizes(tar, members, source=source)
                with _writing_beside_home():
                    folder.mkdir(mode=0o700)  # new: never one made meanwhile (or a link)
                for member in members:
                    if member.isreg():
                        _extract(tar, member, folder, sizes, source=source)
        except _UnwritableError as exc:
            # The disk beside HOME (full, read-only, not ours), not the tar: said as such.
            raise exc.error from None
        except (tarfile.TarError, OSError) as exc:
            raise InvalidInputError(f"{source} is not a backup: {exc}") from exc

    def _fill(self, backup: Path, new: Path, *, source: Path) -> BackupSummary:
        """Checks ``backup`` whole and copies it into ``new``."""
        try:
            data = json.loads((backup / MANIFEST_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(f"{backup} is not a complete backup: it has no "
                                    f"{MANIFEST_NAME} (a backup cut short)") from None
        except (ValueError, OSError) as exc:
            raise InvalidInputError(f"{backup}/{MANIFEST_NAME} cannot be read: {exc}") from exc
        manifest = _Manifest.read(data, where=backup)
        revision = manifest.schema_revision
        blobs = manifest.blobs
        entries: list[tuple[str, str, int | None]] = [
            (name, digest, None) for name, digest in manifest.files.items()]
        entries += [(f"{BLOBS}/{key}", digest, size) for key, (size, digest) in blobs.items()]
        for relative, digest, size in entries:
            path = backup / relative
            if ".." in Path(relative).parts or Path(relative).is_absolute():
                raise InvalidInputError(f"the backup names a file outside it: {relative}")
            if _links_in(backup, relative):
                # Followed, a link to /etc/shadow or another account's HOME, with a manifest
                # that sums that file, would be copied into HOME.
                raise InvalidInputError(f"{relative} in the backup is a symbolic link (or lies "
                                        "under one): a backup holds files only")
            if not path.is_file():
                raise InvalidInputError(f"the backup is missing {relative}")
            if size is not None and path.stat().st_size != size:
                raise InvalidInputError(f"{relative} in the backup is damaged: its size "
                                        "is not the manifest's")
            if _sha256(path) != digest:
                raise InvalidInputError(f"{relative} in the backup is damaged: its sha256 "
                                        "is not the manifest's")
        for relative, digest, _size in entries:
            # What was written, not only what was checked: a byte changed in between (a flaky
            # disk or NFS, a folder backup written over meanwhile) was restored unseen, and past
            # ``_forget_workers`` the database's copy can no longer be compared.
            if _copy_private(backup / relative, new / relative) != digest:
                raise InvalidInputError(f"{relative} in the backup is damaged: what was copied "
                                        "is not the manifest's sha256 (it changed after it was "
                                        "checked)")
            _reached("copied")
        _forget_workers(new / DATABASE_FILE)
        _reached("forgotten")
        # 0600 as every other file the restore writes (write_text gave the umask's 0644): it
        # names where a copy of the database and secret_key lies, and HOME may be 0755.
        fd = _new_file(new / RESTORED)
        try:
            _write_all(fd, (json.dumps(
                {"backup": str(source.absolute()), "created_at": manifest.created_at,
                 "restored_at": datetime.now(UTC).isoformat()}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        for folder, _dirs, _files in os.walk(new):
            fsync_dir(Path(folder))
        return BackupSummary(path=new, created_at=str(manifest.created_at),
                             schema_revision=revision, counts=manifest.counts,
                             blobs=len(blobs), blob_bytes=sum(s for s, _d in blobs.values()),
                             missing=manifest.missing)

    @staticmethod
    def _swap(home: Path, new: Path) -> Path | None:
        """``new`` in HOME's place; the old HOME's folder now (None: there was none). Raises
        only with HOME the old folder still."""
        old = home.with_name(f".{home.name}.restore-old")
        _reached("swap")
        if home.exists() and _exchange(new, home):
            # One step: HOME is the old folder or the new one, whenever this is killed.
            _reached("swapped")
            return new
        if not home.exists():
            os.rename(new, home)
            _reached("swapped")
            return None
        os.rename(home, old)
        fsync_dir(home.parent)
        _reached("set-aside")
        try:
            os.rename(new, home)
        except OSError:
            os.rename(old, home)
            raise
        _reached("swapped")
        return old


# What a restore writes into HOME itself, never a backup's file.
_RESTORE_WRITES = frozenset({RESTORED, PENDING, IN_USE})


@dataclass(frozen=True)
class _Manifest:
    """A backup's manifest.json, its every field checked for its type: one that a damaged or
    foreign file had otherwise (blobs a list, a size "abc", no sha256) ended a restore in a
    traceback instead of one line."""

    schema_revision: str | None
    created_at: str | None
    files: dict[str, str]  # the database, the queue, secret_key: their sha256
    blobs: dict[str, tuple[int, str]]  # key: (size, sha256)
    counts: dict[str, int]
    missing: tuple[str, ...]

    @classmethod
    def read(cls, data: object, *, where: Path) -> _Manifest:
        """``data`` (the parsed JSON) checked: a format this release does not know, a schema
        newer than its own, or a field of the wrong kind is refused in one line."""
        if not isinstance(data, dict) or data.get("format") != BACKUP_FORMAT:
            found = data.get("format") if isinstance(data, dict) else "?"
            raise InvalidInputError(f"{where} is a backup in a format this release does not "
                                    f"know ({found})")
        revision = data.get("schema_revision")
        if revision is not None and not isinstance(revision, str):
            raise cls._bad(where, "schema_revision is not a revision")
        if revision is not None and revision not in known_revisions():
            raise ConfigError(f"the backup's schema ({revision}) is newer than this release's: "
                              "restore it with the release that made it")
        created_at = data.get("created_at")
        files = data.get("files", {})
        blobs = data.get("blobs", {})
        counts = data.get("counts", {})
        missing = data.get("missing", [])
        if created_at is not None and not isinstance(created_at, str):
            raise cls._bad(where, "created_at is not a time")
        if not isinstance(files, dict) or not all(
                _is_name(n) and _is_sha256(d) for n, d in files.items()):
            raise cls._bad(where, "files is not an object of sha256 sums")
        for name in sorted(files.keys() & _RESTORE_WRITES):
            # Made new (O_EXCL) by the restore: named here, it ended 'File exists'.
            raise cls._bad(where, f"files names {name}, which only a restore writes")
        if DATABASE_FILE not in files:
            raise InvalidInputError(f"{where} is not a backup: its manifest names no database")
        if not isinstance(blobs, dict):
            raise cls._bad(where, "blobs is not an object")
        checked: dict[str, tuple[int, str]] = {}
        for key, meta in blobs.items():
            size = meta.get("size") if isinstance(meta, dict) else None
            digest = meta.get("sha256") if isinstance(meta, dict) else None
            if (not _is_name(key) or not isinstance(size, int) or isinstance(size, bool)
                    or size < 0 or not _is_sha256(digest)):
                raise cls._bad(where, f"blob {key!r} is not a key with a size and a sha256")
            assert isinstance(digest, str)
            checked[key] = (size, digest)
        if not isinstance(counts, dict) or not all(
                isinstance(n, int) and not isinstance(n, bool) for n in counts.values()):
            raise cls._bad(where, "counts is not an object of numbers")
        if not isinstance(missing, list) or not all(isinstance(k, str) for k in missing):
            raise cls._bad(where, "missing is not a list of keys")
        return cls(schema_revision=revision, created_at=created_at, files=dict(files),
                   blobs=checked, counts={str(t): n for t, n in counts.items()},
                   missing=tuple(missing))

    @staticmethod
    def _bad(where: Path, what: str) -> InvalidInputError:
        return InvalidInputError(f"{where} is not a backup: its {MANIFEST_NAME} cannot be read "
                                 f"({what})")


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def _is_sha256(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


# The most a manifest.json may be (about 200 bytes a blob: millions of blobs).
_MANIFEST_MAX = 1 << 30

# The first bytes of the compressions tarfile.open would have read through.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def _refuse_compressed(source: Path) -> None:
    try:
        with source.open("rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise InvalidInputError(f"{source} is not a backup: {exc}") from exc
    kind = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is not None:
        raise InvalidInputError(
            f"{source} is not a backup as selfie-lora backup writes it: it is compressed "
            f"({kind}); uncompress it first (a backup's .tar is never compressed)")


def _member_name(member: tarfile.TarInfo, *, source: Path) -> str:
    """A member's name inside the backup (``./blobs/x`` is ``blobs/x``); one outside it (an
    absolute name, a ``..``) is refused."""
    name = PurePosixPath(member.name)
    parts = [part for part in name.parts if part != "."]
    if name.is_absolute() or ".." in parts:
        raise InvalidInputError(f"{source} is not a backup: it names a file outside it "
                                f"({member.name})")
    return "/".join(parts)


def _check_kind(member: tarfile.TarInfo, *, source: Path) -> None:
    """A file or a folder, never sparse (expanded, a few KB of tar become any size), with a
    name inside the backup. A link, a device or a name outside is no backup's: refused."""
    _member_name(member, source=source)
    if not (member.isreg() or member.isdir()):
        raise InvalidInputError(f"{source} is not a backup: {member.name} is not a file or a "
                                "folder (a link or a device)")
    if member.issparse():
        raise InvalidInputError(f"{source} is not a backup: {member.name} is a sparse file")


def _manifest_sizes(tar: tarfile.TarFile, members: list[tarfile.TarInfo], *,
                    source: Path) -> dict[str, int | None]:
    """The files ``manifest.json`` names (itself too), with the size it gives (None: any, for
    the database, the queue and secret_key), read from the tar before anything is written."""
    found = [m for m in members if m.isreg() and _member_name(m, source=source) == MANIFEST_NAME]
    if not found:
        raise InvalidInputError(f"{source} is not a complete backup: it has no {MANIFEST_NAME} "
                                "(a backup cut short)")
    if len(found) > 1 or found[0].size > _MANIFEST_MAX:
        raise InvalidInputError(f"{source} is not a backup: its {MANIFEST_NAME} is not one file")
    data = tar.extractfile(found[0])
    try:
        assert data is not None  # a regular member
        with data:
            parsed = json.loads(data.read())
    except (ValueError, AssertionError) as exc:
        raise InvalidInputError(f"{source} is not a backup: its {MANIFEST_NAME} cannot be "
                                f"read ({exc})") from exc
    manifest = _Manifest.read(parsed, where=source)
    sizes: dict[str, int | None] = {name: None for name in manifest.files}
    sizes.update({f"{BLOBS}/{key}": size for key, (size, _digest) in manifest.blobs.items()})
    sizes[MANIFEST_NAME] = found[0].size
    return sizes


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, folder: Path,
             sizes: dict[str, int | None], *, source: Path) -> None:
    """One file of a backup's tar (0600), checked against the manifest before it is written:
    named by it, once, with the size it gives. ``sizes`` loses each name written."""
    name = _member_name(member, source=source)
    if name not in sizes:
        raise InvalidInputError(f"{source} is not a backup: {member.name} is not in its "
                                f"{MANIFEST_NAME} (or is in the tar twice)")
    size = sizes.pop(name)
    if size is not None and member.size != size:
        raise InvalidInputError(f"{source} is not a backup: {member.name} is {member.size} "
                                f"bytes, its {MANIFEST_NAME} says {size}")
    data = tar.extractfile(member)
    if data is None:
        raise InvalidInputError(f"{source} is not a backup: {member.name} cannot be read")
    target = folder / name
    with _writing_beside_home():
        _private_folders(target.parent)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE)
    try:
        with data:
            # Read (the tar's fault when it fails) apart from written (the disk's).
            while chunk := data.read(_CHUNK):
                with _writing_beside_home():
                    _write_all(fd, chunk)
    finally:
        os.close(fd)


def _links_in(backup: Path, relative: str) -> bool:
    """Whether ``relative``, or a folder it lies in, is a symbolic link inside ``backup``."""
    path = backup
    for part in Path(relative).parts:
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return True
        except FileNotFoundError:
            return False
    return False


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the names of the folders ``a`` and ``b`` at once (Linux's renameat2 with
    RENAME_EXCHANGE); False where the system or the file system cannot."""
    return _renameat2(a, b, flags=_RENAME_EXCHANGE)


def _renameat2(a: Path, b: Path, *, flags: int) -> bool:
    """Linux's renameat2 of ``a`` to ``b`` with ``flags``: True once done, False where the
    system or the file system cannot; any other error raised."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _restore_scratch(path: Path) -> None:
    """A restore's folder beside HOME (``.NAME.restore-new``, ``-old``, ``-unpacked``) found
    there: a killed restore's is this account's, and is deleted or put back; another account's
    (made in advance by one that can write beside HOME) is refused, never deleted, renamed into
    HOME nor written into."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return
    if found.st_uid != os.geteuid():
        raise ConfigError(f"{path} is in the way of a restore and belongs to another account "
                          f"(uid {found.st_uid}): move it away first")


def clear_killed_restores(home: Path) -> list[Path]:
    """The copies a restore of ``home`` killed before its swap left beside it: the tar it was
    unpacking (``.NAME.restore-unpacked``) and the HOME it was filling (``.NAME.restore-new``,
    still marked ``PENDING``), each a whole backup (its database, secret_key and every photo, a
    user deleted since among them), which only the next restore removed, and a HOME whose
    restore was not run again kept for good. Called by a command that holds HOME (serve,
    worker, train and resume waiting for their training) once it holds HOME's shared lock
    (``wiring.using_home``): no restore of HOME runs then, as one holds that lock exclusive
    from before it makes either until it ends, and ``-new``'s own lock (``holding``) is taken
    here too, for the moment a restore without an exchange renames HOME away. Left alone:
    another account's, a link, a file, and a ``-new`` without the mark (the HOME a restore
    replaced, which the next restore keeps aside and names). Each goes by way of
    ``.NAME.restore-deleting`` (``_delete``), and what a delete killed midway left under that
    name is removed first, with no conditions. The folders removed."""
    home = home.resolve()
    removed: list[Path] = []
    deleting = _deleting(home)
    for folder in (deleting, home.with_name(f".{home.name}.restore-unpacked"),
                   home.with_name(f".{home.name}.restore-new")):
        try:
            found = folder.lstat()
            if (not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid()
                    or (folder.name.endswith("-new") and not (folder / PENDING).is_file())):
                continue
            if folder == deleting:
                shutil.rmtree(folder)  # a delete killed midway: nothing else uses that name
            else:
                with holding(folder):
                    _delete(folder, home)
        except FileNotFoundError:
            continue
        except ConfigError as exc:
            # Held: by a restore between its two renames, or by a serve or worker started with
            # this one (systemd starts both at once), which is deleting it now: nothing wrong.
            logger.info("left %s, which a restore killed midway may have left: %s", folder,
                        exc.message)
            continue
        except OSError as exc:  # not ours to remove, or the disk failing
            logger.warning("left %s, which a restore killed midway may have left: %s", folder,
                           exc)
            continue
        logger.warning("removed %s, a copy of a backup that a restore killed midway left",
                       folder)
        removed.append(folder)
    return removed


def _deleting(home: Path) -> Path:
    """Where a restore's copy beside ``home`` goes to be deleted (``_delete``)."""
    return home.with_name(f".{home.name}.restore-deleting")


def _delete(folder: Path, home: Path) -> None:
    """``folder`` (a killed restore's copy beside ``home``) deleted: renamed first to a name
    that only deletes use, which the next sweep removes whatever is in it. Deleted where it
    was, a delete killed midway (a start stopped by systemd, the OOM killer; a whole backup's
    photos take a while) left part of a ``-new`` without its ``PENDING`` mark (removed early in
    rmtree's order): kept from then on as the HOME a restore replaced, and named so by the next
    restore."""
    deleting = _deleting(home)
    if deleting.is_dir() and not deleting.is_symlink():
        shutil.rmtree(deleting)  # an earlier delete's, killed midway
    os.rename(folder, deleting)
    shutil.rmtree(deleting)


def _discard(new: Path, home: Path) -> None:
    """The ``-new`` of a restore that failed, deleted as far as it can be (``_delete``)."""
    try:
        _delete(new, home)
    except OSError:
        shutil.rmtree(new, ignore_errors=True)


def _carry_cache(old: Path, home: Path) -> list[str]:
    """The downloaded base model (HOME/cache, many GB) is no data of the backup's, and the
    restored HOME keeps it rather than download it again. Where it cannot be moved (another
    file system, a mount point), it stays in the old HOME: a warning, not a failed restore."""
    if not (old / CACHE).is_dir() or (home / CACHE).exists():
        return []
    try:
        os.rename(old / CACHE, home / CACHE)
    except OSError as exc:
        return [f"the base model cache stays in {old / CACHE} ({exc.strerror or exc}): move it "
                f"to {home / CACHE}, or it is downloaded again"]
    return []


def _kept_name(home: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    kept = home.with_name(f"{home.name}.before-restore-{stamp}")
    n = 1
    while kept.exists() or kept.is_symlink():
        n += 1
        kept = home.with_name(f"{home.name}.before-restore-{stamp}-{n}")
    return kept


def _keep_aside(previous: Path, home: Path) -> tuple[Path, str | None]:
    """The HOME a restore replaced, under a name that says so, beside the new one: it holds
    whatever the backup lacks (newer data, work/, the operator's files, maybe the backup)."""
    kept = _kept_name(home)
    try:
        os.rename(previous, kept)
    except OSError as exc:
        return previous, (f"the replaced HOME stays in {previous} ({exc.strerror or exc}); "
                          "rename it before the next restore")
    return kept, None


def _recovered(previous: Path, home: Path) -> str:
    kept, problem = _keep_aside(previous, home)
    if problem:
        raise ConfigError(problem)
    said = (f"kept {kept}, the SELFIE_LORA_HOME a restore killed midway replaced (it waited "
            f"hidden as {previous.name}): delete it once you no longer need it")
    logger.warning("%s", said)
    return said
