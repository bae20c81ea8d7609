"""The one reading of Replicate's ``aborted`` status, shared by the trainer and the generator."""

from __future__ import annotations

import pytest
from replicate.prediction import Prediction
from replicate.training import Training

from selfie_lora.adapters.replicate.statuses import ABORTED, ENDED, STATUSES, validated

BASE = {"id": "r1", "model": "acme/m", "version": "v1", "input": {}, "logs": "",
        "created_at": "2026-01-01T00:00:00Z", "urls": {}}


@pytest.mark.parametrize("model", [Training, Prediction])
def test_an_aborted_run_is_read_with_its_own_status(model: type[Training | Prediction]) -> None:
    run = validated(model, {**BASE, "status": "aborted", "error": None})
    assert isinstance(run, model)
    assert run.status == ABORTED  # the client's own validation refuses it
    assert validated(model, {**BASE, "status": "processing"}).status == "processing"
    assert ABORTED in ENDED
    assert ENDED < STATUSES
