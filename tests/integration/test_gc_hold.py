"""The erase hold (``services.gc._Hold``): the copies an account's deletion keeps aside in
HOME/work while it deletes content-keyed blobs. Found in review: the directory fsync that puts
a copy's name on disk could say ENOSPC (NFS, thin provisioning) outside the full-disk mapping,
a raw OSError (a 500, the deletion parked 24 h)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.errors import StorageFullError
from selfie_lora.services import gc as gc_module
from selfie_lora.services.gc import _Hold


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
