"""A training's sample images in the blob store: what its progress shows while it trains.

The local trainer makes one every ``recipe.sample_every`` steps (``adapters/flux/samples.py``)
and hands it over through ``TrainingJob.samples``; each is kept under the training's keys, one
key per step (``layout.sample_key``), so a step made again after a restart or a take-over
replaces its image and never adds a second one. They stay as long as the training's row does:
the garbage collector places them by their key (``layout.owner_of``) and deletes those of a
training that no longer exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from selfie_lora.errors import NotFoundError
from selfie_lora.logs import training_context
from selfie_lora.services.layout import sample_key, sample_prefix, sample_step
from selfie_lora.services.ports import BlobStore

logger = logging.getLogger(__name__)


class TrainingSamples:
    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    def steps(self, training_id: str) -> list[int]:
        """The steps the training has a sample of, in order."""
        found = (sample_step(info.key) for info in self._blobs.list(sample_prefix(training_id)))
        return sorted(step for step in found if step is not None)

    def keep(self, training_id: str, path: Path, *, step: int) -> None:
        self._blobs.put_file(sample_key(training_id, step), path)
        logger.debug("training %s: sample at step %d stored", training_id, step)

    def image(self, training_id: str, step: int) -> bytes:
        """The JPEG of ``step``; ``NotFoundError`` when the training has none at that step."""
        if step not in self.steps(training_id):
            raise NotFoundError(f"this training has no sample at step {step}")
        return self._blobs.get(sample_key(training_id, step))

    def copy(self, source_id: str, target_id: str, *, up_to: int) -> int:
        """Store ``source_id``'s samples up to step ``up_to`` as ``target_id``'s (a resumed
        training shows the samples of the steps it did not train again). Returns how many."""
        steps = [step for step in self.steps(source_id) if step <= up_to]
        for step in steps:
            self._blobs.put(sample_key(target_id, step),
                            self._blobs.get(sample_key(source_id, step)))
        return len(steps)

    def drop(self, training_id: str) -> None:
        """Delete every sample of the training (best effort: a leftover is an orphan that the
        garbage collector deletes)."""
        try:
            for step in self.steps(training_id):
                self._blobs.delete(sample_key(training_id, step))
        except Exception:
            with training_context(training_id):  # the collector runs outside any training
                logger.warning("training %s: could not delete its samples", training_id,
                               exc_info=True)
