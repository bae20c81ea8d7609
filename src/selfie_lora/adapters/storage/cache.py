"""Copies of remote blobs on this machine, in a folder bounded in size.

The object-storage ``BlobStore`` hands out local files of blobs that never change (a version's
LoRA weights, which the local generator loads from a path). A worker that generates for many
users fetches every version it is asked for once and, without a bound, keeps them all: FLUX
LoRAs weigh 20-200 MB, so a few thousand versions fill a disk, and the garbage collector deletes
blobs from the bucket, not the copies on each machine.

**Eviction: least recently used first, after each fetch** (the only time the folder grows).
"Used" is the file's modification time, which every hit sets (access times are not kept on
``noatime``/``relatime`` mounts). Several processes share one folder (the API server and the
workers of one HOME), so a copy must not vanish while one of them still needs it: a copy is
handed out inside a context (``copy``) that holds a shared ``flock`` on it until the user is done
with it, and the evictor removes only copies it can lock exclusively at that moment. A local
generation holds its copy while it waits for the pipeline behind other generations (FLUX jobs
take minutes each, so a queue can outlast any fixed window) and while it loads it. A hit and an
eviction exclude each other (a lock file), so a copy is either locked before the evictor looks
at it again, or gone before the hit, which then fetches it anew. A copy used in the last
``in_use`` seconds (15 minutes) is not evicted either, as a margin. The folder may therefore hold
more than its bound while more than that is in use; the copy just fetched is kept even when it
alone is larger than the bound. A fetch that meets a full disk or quota (the bound does not see
free space) evicts every copy no process holds, the margin ignored, and is tried once more.

A fetch writes a temporary file, syncs it to disk, and renames it into place (a rename may reach
the disk before the data: after a crash of the host, the name would hold nothing and be served
for ever): a process that dies while fetching leaves no copy, only a temporary file, which
eviction deletes once it is an hour old (a live fetch of a large blob may take minutes).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from selfie_lora.disk_space import QUOTA_ADVICE, full_disk_words, is_full_error, is_quota_error
from selfie_lora.errors import StorageError, StorageFullError
from selfie_lora.services.layout import TEMPORARY_PREFIX
from selfie_lora.services.private_files import fsync_dir

logger = logging.getLogger(__name__)

# The layout refuses keys with a segment so named: no blob is ever taken for a temporary file.
TMP_PREFIX = TEMPORARY_PREFIX
LOCK_NAME = ".lock"
# A copy used this recently is kept even when no process holds it any more: a margin for a
# process that may reopen it soon.
IN_USE_SECONDS = 15 * 60
# A temporary file this old belongs to a fetcher (or, in the file-system store, a writer) that
# died.
STALE_FETCH_SECONDS = 60 * 60


class BlobCache:
    def __init__(self, root: Path, *, max_bytes: int, in_use: float = IN_USE_SECONDS) -> None:
        if max_bytes <= 0:
            raise ValueError("a blob cache needs a positive size bound")
        self.root = root
        self.max_bytes = max_bytes
        self.in_use = in_use

    @contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def copy(self, key: str, fetch: Callable[[BinaryIO], object]) -> Iterator[Path]:
        """The copy of ``key`` (a checked relative path), fetched with ``fetch(file)`` when this
        machine has none; marked used, and never evicted until the context ends."""
        target = self.root / key
        try:
            pin = self._hit(target)
            if pin is None:
                pin = self._fetch_making_room(target, fetch)
        except OSError as exc:
            # This machine's disk (full, read-only), not the store: a StorageError all the same,
            # so a generation answers the storage error, not a 500 with a raw OSError. A full
            # disk or quota is StorageFullError (507 storage_full), as every other full-disk
            # write: no retry "in a moment" helps until the operator frees space.
            if is_full_error(exc):
                ran_out, advice = _out_of_room(exc)
                raise StorageFullError(
                    f"the blob cache in {self.root} cannot hold {key!r}: "
                    f"{full_disk_words(self.root, exc)}: {exc.strerror or exc}: {ran_out} "
                    f"even without the copies no process holds; {advice}",
                    quota=is_quota_error(exc)) from exc
            raise StorageError(f"the blob cache in {self.root} cannot hold {key!r}: "
                               f"{exc.strerror or exc}") from exc
        try:
            yield target
        finally:
            os.close(pin)  # releases the shared lock: the copy may be evicted from now on

    def forget(self, key: str) -> bool:
        """Removes the copy of ``key`` (found damaged: fetched once, it would be served for
        ever, whatever the store holds now), so the next ``copy`` fetches it again; whether
        there was one. Removed even while held: a process holding it keeps its open file, and
        the copy is wrong for everyone."""
        target = self.root / key
        with self._locked(fcntl.LOCK_EX):
            try:
                target.unlink()
            except FileNotFoundError:
                return False
        logger.warning("blob cache %s: the damaged copy of %s removed", self.root, key)
        return True

    def drop(self, key: str) -> bool:
        """Removes the copy of ``key``, whose blob the store deleted (a user's erasure promises
        no copy is left on any machine); whether it went. A copy a process holds stays (a
        generation loading it from its path would fail): ``drop_missing`` at the next
        collection removes it, and a copy whose fetch began before the deletion and lands
        after this too."""
        target = self.root / key
        with self._locked(fcntl.LOCK_EX):
            try:
                if _held(target):
                    return False
                target.unlink()
            except FileNotFoundError:
                return False
        return True

    def drop_missing(self, stored: Callable[[str], bool]) -> int:
        """Removes the copies whose key ``stored(key)`` says the store no longer holds (deleted
        by another machine, or while a process here held the copy); how many. One look per
        copy, outside the folder lock: the folder holds a few copies, and a look is a request.
        A copy whose blob is written again after its look went only needs fetching again."""
        removed = 0
        for _mtime, path, _size in self._entries(time.time())[0]:
            key = path.relative_to(self.root).as_posix()
            if not stored(key) and self.drop(key):
                removed += 1
        if removed:
            logger.info("blob cache %s: %d copies of blobs the store deleted removed",
                        self.root, removed)
        return removed

    def _hit(self, target: Path) -> int | None:
        with self._locked(fcntl.LOCK_SH):
            return _hold(target)

    def _fetch_making_room(self, target: Path, fetch: Callable[[BinaryIO], object]) -> int:
        """``_fetch``; on a full disk, once more after the copies no process holds are evicted.
        The bound does not see free space: the same disk holds the base models and the work
        folders, and a disk filled before the folder reaches its bound would otherwise fail
        every fetch until someone cleared the folder by hand."""
        try:
            return self._fetch(target, fetch)
        except OSError as exc:
            if not is_full_error(exc):  # a quota (EDQUOT) frees as a full disk does
                raise
            removed = self.evict(keep=target, down_to=0)
            logger.warning("blob cache %s: %s; %d copies no process holds removed to make room "
                           "for %s", self.root, _out_of_room(exc)[0], removed, target.name)
            if not removed:
                raise
        return self._fetch(target, fetch)

    def _fetch(self, target: Path, fetch: Callable[[BinaryIO], object]) -> int:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                fetch(fh)
                fh.flush()
                os.fsync(fh.fileno())  # the bytes reach the disk before the name does
            with self._locked(fcntl.LOCK_EX):
                # Another process may have fetched it meanwhile: its copy stays, since it may
                # hold it (a name, once given, keeps its file until the file is evicted).
                pin = _hold(target)
                if pin is None:
                    os.replace(tmp, target)
                    fsync_dir(target.parent)
                    pin = _hold(target)
                    assert pin is not None  # nobody evicts under our exclusive lock
        finally:
            Path(tmp).unlink(missing_ok=True)
        try:
            self.evict(keep=target)
        except BaseException:
            os.close(pin)
            raise
        return pin

    def _entries(self, now: float) -> tuple[list[tuple[float, Path, int]], int]:
        entries: list[tuple[float, Path, int]] = []
        total = 0
        for folder, _dirs, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # evicted or renamed by another process meanwhile
                if name.startswith(TMP_PREFIX):
                    remove_if_stale(path, stat.st_mtime, now=now, left_by="a blob cache fetch")
                    continue
                if name == LOCK_NAME and Path(folder) == self.root:
                    continue
                entries.append((stat.st_mtime, path, stat.st_size))
                total += stat.st_size
        return entries, total

    def evict(self, *, keep: Path | None = None, down_to: int | None = None) -> int:
        """Delete the least recently used copies until the folder holds at most ``max_bytes``
        (never ``keep``, a copy a process holds, nor one used in the last ``in_use`` seconds);
        how many went. ``down_to``: that many bytes instead, and recently used copies nobody
        holds go too (a full disk: such a copy is only fetched again when asked for)."""
        bound = self.max_bytes if down_to is None else down_to
        in_use = self.in_use if down_to is None else 0
        now = time.time()
        entries, total = self._entries(now)
        if total <= bound:
            return 0
        removed = 0
        with self._locked(fcntl.LOCK_EX):
            for _mtime, path, size in sorted(entries):
                if total <= bound:
                    break
                if path == keep:
                    continue
                try:
                    # Looked at again under the lock: a hit since the walk marked it used.
                    if path.stat().st_mtime >= now - in_use or _held(path):
                        continue
                    path.unlink()
                except FileNotFoundError:
                    pass  # another process evicted it
                else:
                    removed += 1
                total -= size
        if down_to is None and total > self.max_bytes:
            logger.warning("blob cache %s holds %.1f GB, more than its bound of %.1f GB: the rest "
                           "is in use or was used in the last %d minutes", self.root, total / 1e9,
                           self.max_bytes / 1e9, self.in_use // 60)
        elif removed:
            logger.info("blob cache %s: %d least recently used copies removed", self.root,
                        removed)
        return removed


def _out_of_room(exc: OSError) -> tuple[str, str]:
    """What ran out, and what the operator can do: a quota (EDQUOT) is raised, or files it
    counts deleted, where a full disk needs space freed (``df`` shows room under a quota)."""
    if is_quota_error(exc):
        return ("the quota of this account is used up",
                f"{QUOTA_ADVICE} on this machine, or lower SELFIE_LORA_BLOB_CACHE_GB")
    return ("the disk is full",
            "lower SELFIE_LORA_BLOB_CACHE_GB or free disk space on this machine")


def remove_if_stale(path: Path, mtime: float, *, now: float, left_by: str) -> bool:
    """Deletes ``path``, a temporary file (``TMP_PREFIX``), once it was last written
    ``STALE_FETCH_SECONDS`` ago: every write of a live writer makes it young again, so one that
    old belongs to a writer that died (``left_by`` says which kind, for the log). Whether it
    went."""
    if mtime >= now - STALE_FETCH_SECONDS:
        return False
    path.unlink(missing_ok=True)
    logger.info("removed %s, left by %s that died", path, left_by)
    return True


def _hold(path: Path) -> int | None:
    """A descriptor of ``path`` holding a shared lock on it, the copy marked used; None when
    there is no copy. Called under the folder lock, so it never waits: the evictor locks a copy
    only under the exclusive folder lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def held(path: Path) -> bool:
    """Whether a process holds ``path`` locked (``BlobCache.copy``): asked under the exclusive
    folder lock, so no hit can take it between this answer and the unlink that follows."""
    try:
        # Open for writing where it can be: NFSv4 grants an exclusive flock (a POSIX lock
        # there) only on such a file, and answers EBADF on one open read-only.
        fd = os.open(path, os.O_RDWR)
    except (IsADirectoryError, PermissionError):
        fd = os.open(path, os.O_RDONLY)  # a folder, or read-only to us
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


_held = held  # BlobCache's name for it (its tests replace it)


__all__ = ["IN_USE_SECONDS", "STALE_FETCH_SECONDS", "TMP_PREFIX", "BlobCache", "fsync_dir",
           "remove_if_stale"]
