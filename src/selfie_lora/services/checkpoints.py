"""A training's checkpoints in the blob store: what lets a local training continue on any machine.

A worker's work dir is local to its machine and removed at every attempt, and on the scale path
the next attempt may run on another machine; so the newest checkpoint a trainer writes is kept in
the blob store under the training's keys (``layout.checkpoint_key``), and the next attempt of the
training, or the training that resumes a canceled one, starts from it. Only the one stored last is
kept: each blob write is atomic, so the other one is deleted only once the new one is whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from selfie_lora.disk_space import full_disk_words, is_full_error, is_quota_error
from selfie_lora.errors import BlobMissingError, StorageError, StorageFullError, describe
from selfie_lora.logs import training_context
from selfie_lora.services.layout import checkpoint_key, checkpoint_prefix, checkpoint_step
from selfie_lora.services.ports import BlobStore
from selfie_lora.services.private_files import private_folders, private_replacement

logger = logging.getLogger(__name__)

# Looks again this many times when the newest checkpoint is deleted as it is fetched (each
# time another, newer one took its place); then the error stands.
_FETCH_TRIES = 3


@dataclass(frozen=True)
class StoredCheckpoint:
    key: str
    step: int


class TrainingCheckpoints:
    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    def _stored(self, training_id: str) -> list[StoredCheckpoint]:
        found = []
        for info in self._blobs.list(checkpoint_prefix(training_id)):
            step = checkpoint_step(info.key)
            if step is not None:
                found.append(StoredCheckpoint(key=info.key, step=step))
        return sorted(found, key=lambda c: c.step)

    def latest(self, training_id: str) -> StoredCheckpoint | None:
        stored = self._stored(training_id)
        return stored[-1] if stored else None

    def keep(self, training_id: str, path: Path, *, step: int,
             still_held: Callable[[], None] | None = None) -> None:
        """Store the checkpoint file at ``path`` as the training's newest; every other one goes.

        Those of later steps too: an attempt that started over (its checkpoint was unreadable or
        made for another run) stores lower steps than the one it found, and a stale later one
        left behind would stay "latest", so every later attempt would fetch it and start over
        again until the run got past its step. ``still_held`` raises, once the new one is stored
        and before any goes, when the worker no longer holds the training: one stopped (SIGSTOP,
        a long pause) during the upload past its lease would delete the newer checkpoint of the
        attempt that took over from it."""
        key = checkpoint_key(training_id, step)
        self._blobs.put_file(key, path)
        if still_held is not None:
            still_held()
        for other in self._stored(training_id):
            if other.step != step:
                self._blobs.delete(other.key)
        # Routine: the log keeps a line per change of state, the progress shows the steps.
        logger.debug("training %s: checkpoint at step %d stored", training_id, step)

    def fetch(self, training_id: str, into: Path) -> StoredCheckpoint | None:
        """Copy the newest checkpoint to the file ``into``; None when there is none."""
        for _ in range(_FETCH_TRIES):
            try:
                return self._fetch_newest(training_id, into)
            except BlobMissingError:
                # Listed, then gone: an earlier attempt of this training (late, not yet told it
                # lost the lease) stored a newer one and deleted this. The newer one is what to
                # continue from; failing the training for it would throw all of them away.
                logger.info("training %s: its newest checkpoint went while it was fetched; "
                            "looking again", training_id)
        return self._fetch_newest(training_id, into)

    def _fetch_newest(self, training_id: str, into: Path) -> StoredCheckpoint | None:
        newest = self.latest(training_id)
        if newest is None:
            return None
        try:
            private_folders(into.parent)
            # The stream is closed however the copy ends: a write that fails would otherwise
            # leave the blob's file (or S3 response) open for as long as the error's traceback
            # keeps the stream alive.
            with private_replacement(into) as fh, closing(self._blobs.open(newest.key)) as stream:
                for chunk in stream.chunks:
                    fh.write(chunk)
        except OSError as exc:
            # This machine's disk (full, read-only), not the store: a StorageError all the same,
            # so the worker steps away from the training instead of failing it as an internal
            # error, and the next attempt (on a machine with room, or once there is) resumes it.
            said = f"checkpoint {newest.key!r} cannot be written to {into}"
            if is_full_error(exc):
                # A full disk (or a quota, said as one) is waited out uncounted, as the other
                # writes of a training are: a plain StorageError spent its attempts and failed it.
                raise StorageFullError(f"{said}: {full_disk_words(into.parent, exc)}: "
                                       f"{exc.strerror or exc}",
                                       quota=is_quota_error(exc)) from exc
            raise StorageError(f"{said}: {exc.strerror or exc}") from exc
        return newest

    def copy(self, source_id: str, target_id: str, *, scratch: Path) -> StoredCheckpoint | None:
        """The newest checkpoint of ``source_id`` stored as ``target_id``'s (through a file in
        ``scratch``: a checkpoint of a real FLUX LoRA with its optimizer state is ~0.3 GB),
        ``scratch`` made if missing: a full disk or a used-up quota refusing it or the file is a
        ``StorageFullError`` saying which (``fetch``)."""
        staged = scratch / f"{target_id}.ckpt"
        try:
            newest = self.fetch(source_id, staged)
            if newest is None:
                return None
            self._blobs.put_file(checkpoint_key(target_id, newest.step), staged)
            return StoredCheckpoint(key=checkpoint_key(target_id, newest.step), step=newest.step)
        finally:
            staged.unlink(missing_ok=True)

    def drop(self, training_id: str) -> None:
        """Delete every checkpoint of the training (best effort: a leftover is only space)."""
        try:
            for stored in self._stored(training_id):
                self._blobs.delete(stored.key)
        except Exception as exc:
            with training_context(training_id):  # the collector runs outside any training
                # The storage's error in its one line; a traceback only for what was not one.
                logger.warning("training %s: could not delete its checkpoints: %s", training_id,
                               exc.message if isinstance(exc, StorageError) else describe(exc),
                               exc_info=not isinstance(exc, StorageError))
