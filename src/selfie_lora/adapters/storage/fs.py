"""A ``BlobStore`` on the local file system (the embedded default)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from selfie_lora.adapters.storage.cache import TMP_PREFIX, fsync_dir, remove_if_stale
from selfie_lora.disk_space import (
    LOW_SPACE_BYTES,
    free_bytes,
    full_disk_words,
    is_full_error,
    is_quota_error,
    shown,
)
from selfie_lora.errors import BlobMissingError, StorageError, StorageFullError
from selfie_lora.services.layout import is_valid_key
from selfie_lora.services.ports import BlobInfo, BlobStream

CHUNK = 1024 * 1024
# What a read of a key that names no file meets: nothing there, a folder (a key that is a prefix
# of other keys: "generations/g"), or a blob where a folder would be ("a.png/b"). Object storage
# has no folders, so on S3 all three are a missing blob; here too.
NOT_A_BLOB = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
FillFn = Callable[[BinaryIO], object]


def check_key(key: str) -> str:
    # The layout's rule, so that both stores refuse the same keys and the garbage collector
    # knows which listed keys they would refuse.
    if not is_valid_key(key):
        raise StorageError(f"invalid blob key {key!r}")
    return key


def _write_error(key: str, exc: OSError, *, root: Path) -> StorageError:
    if is_full_error(exc):
        # An outage the operator ends by freeing space: said as one, naming the disk.
        return StorageFullError(f"blob {key!r} cannot be written: {full_disk_words(root, exc)}: "
                                f"{exc.strerror or exc}", quota=is_quota_error(exc))
    return StorageError(f"blob {key!r} cannot be written: {exc.strerror or exc}")


def _read_error(key: str, exc: OSError) -> StorageError:
    return StorageError(f"blob {key!r} cannot be read: {exc.strerror or exc}")


class _Chunks:
    """A file's bytes in chunks; closed at the end, on an error, or by ``close`` (also before
    the first chunk: a generator closed unstarted would leave the file open, as a HEAD or a
    416 answer of a download does)."""

    def __init__(self, key: str, fh: BinaryIO, *, length: int | None = None) -> None:
        self._key = key
        self._fh = fh
        self._left = length  # None: to the end of the file

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = self._fh.read(CHUNK if self._left is None else min(CHUNK, self._left))
        except OSError as exc:  # a disk error midway: the answer is cut, as on object storage
            self.close()
            raise _read_error(self._key, exc) from exc
        except ValueError:  # read after close
            raise StopIteration from None
        if not chunk:
            self.close()
            raise StopIteration
        if self._left is not None:
            self._left -= len(chunk)
        return chunk

    def close(self) -> None:
        self._fh.close()


def _refresh(path: Path) -> bool:
    """Make the file at ``path`` fresh (the garbage collector spares young blobs: a writer that
    found its blob there refers to it again); False when there is none."""
    if not path.is_file():
        return False
    try:
        os.utime(path)
    except FileNotFoundError:  # deleted since
        return False
    return True


def _missing_folders(folder: Path, *, root: Path) -> list[Path]:
    """The folders of ``folder``'s path below ``root`` that do not exist yet, deepest first."""
    missing: list[Path] = []
    while folder != root and folder.is_relative_to(root) and not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


class FileSystemBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, fill: FillFn, *, if_absent: bool) -> bool:
        path = self._path(key)
        try:
            if if_absent and _refresh(path):
                return False
            made = _missing_folders(path.parent, root=self.root)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename (or link): a reader never sees half a file, a crash never
            # leaves one.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
        except OSError as exc:
            raise _write_error(key, exc, root=self.root) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                # The bytes reach the disk before the name does: after a power cut a blob is
                # whole or absent, never an empty file under its name (weights are written
                # only if absent, so an empty one would never be written again).
                os.fsync(fh.fileno())
            if not if_absent:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic create-if-absent: the first writer wins
                except FileExistsError:
                    if _refresh(path):
                        return False
                    os.replace(tmp, path)  # deleted since: this write is the blob again
            fsync_dir(path.parent)  # and the name itself survives a power cut
            # So do the folders this write made (generations/<id>/ at its first picture): each
            # one's name is in its parent, which the sync above does not cover, and a row
            # committed after this write must not outlive its blob's folder.
            for folder in made:
                fsync_dir(folder.parent)
            return True
        except OSError as exc:
            # A full disk, a quota, a folder where the blob belongs: the services expect
            # StorageError (a lost sample costs a picture), not an OSError that fails the job.
            raise _write_error(key, exc, root=self.root) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return self._write(key, lambda fh: fh.write(data), if_absent=if_absent)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> bool:
        def copy(fh: BinaryIO) -> None:
            with path.open("rb") as src:
                shutil.copyfileobj(src, fh, CHUNK)

        return self._write(key, copy, if_absent=if_absent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except NOT_A_BLOB:
            raise BlobMissingError(f"blob {key!r} is missing") from None
        except OSError as exc:
            raise _read_error(key, exc) from exc

    def open(self, key: str, *, start: int = 0, end: int | None = None) -> BlobStream:
        try:
            fh = self._path(key).open("rb")
        except NOT_A_BLOB:
            raise BlobMissingError(f"blob {key!r} is missing") from None
        except OSError as exc:
            raise _read_error(key, exc) from exc
        try:
            size = os.fstat(fh.fileno()).st_size
            if start:
                fh.seek(start)
        except OSError as exc:
            fh.close()
            raise _read_error(key, exc) from exc
        length = None if end is None else max(0, end - start)
        return BlobStream(size=size, chunks=_Chunks(key, fh, length=length))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def modified(self, key: str) -> datetime | None:
        try:
            stat = self._path(key).stat()
        except NOT_A_BLOB:
            return None
        except OSError as exc:
            raise _read_error(key, exc) from exc
        if not S_ISREG(stat.st_mode):
            return None  # a folder
        return datetime.fromtimestamp(stat.st_mtime, UTC)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except NOT_A_BLOB:  # a folder: no blob by that key, nothing to delete
            return
        except OSError as exc:
            raise StorageError(f"blob {key!r} cannot be deleted: {exc.strerror or exc}") from exc
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Empty folders left behind (a generation's, a dataset's) go, up to the root."""
        while folder != self.root:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    def remove_leftovers(self) -> int:
        """Temporary files of writes killed midway (a checkpoint's can weigh a GB) go once they
        are an hour old, as the blob cache's do: a live write keeps its file young."""
        removed = 0
        now = time.time()
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    continue
                path = Path(folder) / name
                try:
                    if remove_if_stale(path, path.stat().st_mtime, now=now,
                                       left_by="a blob write"):
                        removed += 1
                        self._prune(path.parent)
                except FileNotFoundError:
                    continue  # its write finished meanwhile
                except OSError as exc:
                    raise StorageError(f"{path} cannot be removed: {exc.strerror}") from exc
        return removed

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        top = self._path(prefix)
        if not top.is_dir():
            return
        for folder, _dirs, files in os.walk(top):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue  # a write in progress (or one a crash left: not a blob)
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                yield BlobInfo(key=path.relative_to(self.root).as_posix(), size=stat.st_size,
                               modified=datetime.fromtimestamp(stat.st_mtime, UTC))

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        # The blob itself: nothing evicts it.
        path = self._path(key)
        if not path.is_file():
            raise BlobMissingError(f"blob {key!r} is missing")
        yield path

    def forget_local_copy(self, key: str) -> bool:  # noqa: ARG002
        return False  # no copy: a damaged file here is the blob itself

    def forget_deleted_local_copies(self) -> int:
        return 0  # no copies: a deleted blob's file is gone with it

    def download_url(self, key: str, *, expires: timedelta,  # noqa: ARG002
                     filename: str | None = None) -> str | None:  # noqa: ARG002
        # Files on this machine have no URL of their own: the service streams them.
        return None

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"the blob folder {self.root} is not writable")
        # Writable but full answers every upload and generation with a 507: a load balancer
        # and the operator hear it here, before the users do.
        free = free_bytes(self.root)
        if free is not None and free < LOW_SPACE_BYTES:
            raise StorageFullError(f"the disk holding the blob folder {self.root} is full "
                                   f"({shown(free)} free, under the {shown(LOW_SPACE_BYTES)} "
                                   "a ready server keeps)")

