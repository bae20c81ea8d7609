"""A training's checkpoints in the blob store, on the file system and on S3-compatible object
storage (the scale path, where the next attempt may run on another machine): only the newest is
kept, it reads back whole, it moves to the training that resumes a canceled one, and it goes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.errors import StorageError, StorageFullError
from selfie_lora.services import private_files
from selfie_lora.services.checkpoints import TrainingCheckpoints
from selfie_lora.services.layout import checkpoint_key, checkpoint_prefix
from selfie_lora.services.ports import BlobStream
from tests.support.s3 import S3Server


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "fs":
        return FileSystemBlobStore(tmp_path / "blobs")
    server: S3Server = request.getfixturevalue("s3_server")
    return server.store(server.new_location(), tmp_path / "cache")


def _keys(store: Any, training_id: str) -> list[str]:
    return sorted(info.key for info in store.list(checkpoint_prefix(training_id)))


def test_the_newest_checkpoint_is_kept_read_back_moved_and_dropped(store: Any,
                                                                    tmp_path: Path) -> None:
    checkpoints = TrainingCheckpoints(store)
    assert checkpoints.latest("t1") is None
    assert checkpoints.fetch("t1", tmp_path / "none.ckpt") is None
    for step in (10, 20):
        written = tmp_path / f"step-{step}.ckpt"
        written.write_bytes(bytes([step]) * (3 * 1024 * 1024 + step))  # several parts on S3
        checkpoints.keep("t1", written, step=step)
    checkpoints.keep("t2", written, step=10)  # another training's stay apart
    assert _keys(store, "t1") == [checkpoint_key("t1", 20)]

    fetched = checkpoints.fetch("t1", tmp_path / "resume" / "resume.ckpt")
    assert fetched is not None
    assert fetched.step == 20
    assert (tmp_path / "resume" / "resume.ckpt").read_bytes() == written.read_bytes()

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    moved = checkpoints.copy("t1", "t3", scratch=scratch)
    assert moved is not None
    assert moved.key == checkpoint_key("t3", 20)
    assert store.get(moved.key) == written.read_bytes()
    assert list(scratch.iterdir()) == []  # the staged copy is gone
    assert checkpoints.copy("nothing", "t4", scratch=scratch) is None

    checkpoints.drop("t1")
    assert _keys(store, "t1") == []
    assert _keys(store, "t2") == [checkpoint_key("t2", 10)]


def test_a_run_that_started_over_replaces_the_later_checkpoint_it_could_not_use(
        store: Any, tmp_path: Path) -> None:
    # Attempt 1 stored step 30; attempt 2 found it unfit, started over and stores step 10: the
    # stale step 30 must not stay the newest, or every later attempt starts over from it again.
    checkpoints = TrainingCheckpoints(store)
    unfit, good = tmp_path / "unfit.ckpt", tmp_path / "good.ckpt"
    unfit.write_bytes(b"made for another run")
    good.write_bytes(b"the run that started over")
    checkpoints.keep("t1", unfit, step=30)
    checkpoints.keep("t1", good, step=10)
    assert _keys(store, "t1") == [checkpoint_key("t1", 10)]
    fetched = checkpoints.fetch("t1", tmp_path / "resume.ckpt")
    assert fetched is not None
    assert fetched.step == 10
    assert (tmp_path / "resume.ckpt").read_bytes() == good.read_bytes()


class _WatchedStore:
    """The store, with a record of the blob streams it opened and those closed since."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.opened: list[str] = []
        self.closed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open(self, key: str) -> BlobStream:
        stream = self._store.open(key)

        def chunks() -> Iterator[bytes]:
            try:
                yield from stream.chunks
            finally:
                self.closed.append(key)

        self.opened.append(key)
        return BlobStream(size=stream.size, chunks=chunks())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_checkpoint_that_cannot_be_written_here_is_a_storage_error(
        store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk on the worker: a StorageError (the worker steps away, the next attempt
    resumes), not a raw OSError (failed as an internal error); and the blob's stream is
    closed at once, not whenever the error's traceback goes."""
    written = tmp_path / "step-10.ckpt"
    written.write_bytes(b"\1" * (3 * 1024 * 1024))
    watched = _WatchedStore(store)
    checkpoints = TrainingCheckpoints(watched)
    checkpoints.keep("t1", written, step=10)

    def on_a_full_disk(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        # The fetch stages the file 0600 (mkstemp) and renames it into place: its writes go
        # to /dev/full instead (every write: ENOSPC). Never /dev/full as the target itself,
        # which the rename would replace with a plain file.
        os.close(fd)
        return open("/dev/full", mode, *args, **kwargs)

    monkeypatch.setattr(private_files.os, "fdopen", on_a_full_disk)
    into = tmp_path / "fetched" / "resume.ckpt"
    with pytest.raises(StorageError, match=r"cannot be written to .*resume\.ckpt") as raised:
        checkpoints.fetch("t1", into)
    assert not into.exists()
    assert [p.name for p in into.parent.iterdir()] == []  # the staged file went too
    assert raised.value.__traceback__ is not None  # still held, and the stream with it
    # A full disk, waited out uncounted (old code: a plain StorageError, counted as an attempt)
    assert isinstance(raised.value, StorageFullError)
    assert not raised.value.quota
    assert watched.opened == [checkpoint_key("t1", 10)]
    assert watched.closed == watched.opened


class Overtaken:
    """The store, but the first ``open`` of a checkpoint finds it just replaced by a newer one
    (an earlier attempt, late with its lease, kept a checkpoint and deleted the one listed)."""

    def __init__(self, store: Any, newer: Path, *, step: int) -> None:
        self._store = store
        self._newer = newer
        self._step = step
        self.overtaken = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open(self, key: str) -> BlobStream:
        if not self.overtaken:
            self.overtaken = True
            TrainingCheckpoints(self._store).keep("t1", self._newer, step=self._step)
        stream: BlobStream = self._store.open(key)
        return stream


def test_a_checkpoint_replaced_while_it_is_fetched_gives_the_newer_one(store: Any,
                                                                       tmp_path: Path) -> None:
    # The listed checkpoint was gone at the open: BlobMissingError failed the training (and with
    # it every checkpoint), though a newer one was there to continue from.
    older, newer = tmp_path / "older.ckpt", tmp_path / "newer.ckpt"
    older.write_bytes(b"step 10")
    newer.write_bytes(b"step 20")
    TrainingCheckpoints(store).keep("t1", older, step=10)
    racing = Overtaken(store, newer, step=20)
    fetched = TrainingCheckpoints(racing).fetch("t1", tmp_path / "resume.ckpt")
    assert racing.overtaken
    assert fetched is not None
    assert fetched.step == 20
    assert (tmp_path / "resume.ckpt").read_bytes() == b"step 20"
