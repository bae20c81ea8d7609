"""What the command line tells a user, where the words depend on the training's state."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from selfie_lora.cli import handed_back_message
from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.domain.recipes import get_recipe

_TRAINING = Training(
    id="t1", model_id="m1", dataset_id="d1", backend="local", status=TrainingStatus.PROCESSING,
    is_retraining=False, trigger_word="abc12d", destination="local/x",
    trainer_version="local-tiny-v2", recipe=get_recipe("local-tiny-v2"), preserved={},
    created_at=datetime(2026, 1, 1, tzinfo=UTC), step=20, total_steps=40,
)


def test_a_training_handed_back_mid_way_continues_from_its_checkpoint() -> None:
    message = handed_back_message(_TRAINING)
    assert "at step 20/40, its checkpoints kept" in message
    assert "continues it from its last checkpoint" in message


def test_a_training_whose_child_finished_while_handed_back_is_only_scored() -> None:
    done = dataclasses.replace(_TRAINING, step=40, version_id="v1")
    message = handed_back_message(done)
    assert "its version stored, to be scored" in message
    assert "checkpoint" not in message
