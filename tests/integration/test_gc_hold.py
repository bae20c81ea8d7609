"""The erase hold (``services.gc._Hold``): the copies an account's deletion keeps aside in
HOME/work while it deletes content-keyed blobs. Found in review: the directory fsync that puts
a copy's name on disk could say ENOSPC (NFS, thin provisioning) outside the full-disk mapping,
a raw OSError (a 500, the deletion parked 24 h); and a failure after the hold's lock file was
opened (its lock, rename or fsync) left that descriptor open, so this process's own leaked lock
then kept its settler off the hold for as long as the process lived."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.errors import StorageFullError
from selfie_lora.services import gc as gc_module
from selfie_lora.services.gc import HOLD_PREFIX, _Hold


def _open_under(folder: Path) -> list[str]:
    """The paths under ``folder`` this process holds a descriptor of."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own)
        if target.startswith(str(folder)):
            found.append(target)
    return found


def test_a_hold_s_copy_whose_name_finds_the_disk_full_says_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    blobs = FileSystemBlobStore(tmp_path / "blobs")
    blobs.put("photos/ab/abc.jpg", b"a photo")
    hold = _Hold.create(work)
    fsync_dir = gc_module.fsync_dir

    def no_room(folder: Path) -> None:
        if folder == hold.folder:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync_dir(folder)

    monkeypatch.setattr(gc_module, "fsync_dir", no_room)
    try:
        with pytest.raises(StorageFullError) as caught:  # old code: OSError
            hold.keep("photos/ab/abc.jpg", blobs)
    finally:
        hold.release()
    assert "is full" in caught.value.message
    assert "No space left on device" in caught.value.message


@pytest.mark.parametrize("step", ["flock", "fsync_dir"])
def test_a_hold_that_cannot_be_made_leaves_no_lock_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    work = tmp_path / "work"

    def fails(*_args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if step == "flock":
        monkeypatch.setattr(gc_module.fcntl, "flock", fails)
    else:
        monkeypatch.setattr(gc_module, "fsync_dir", fails)
    with pytest.raises(OSError, match="Input/output error"):
        _Hold.create(work)
    monkeypatch.undo()
    assert list(work.glob(f"*{HOLD_PREFIX}*"))  # a stale work folder for the sweep to remove
    assert _open_under(work) == []  # old code: its .lock still open
