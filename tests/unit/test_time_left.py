"""The time a running training has left, from its current attempt's pace: not the model's load,
nor the steps a resumed training inherited (review localtrain finding 2: a 40-step run read
"about 18 min 01 s left" at step 1 for 18 s of steps; a resume at 750/1000 after a 3 min load
read about 1 min for 8 min of steps)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.domain.progress import mark_pace, time_left
from selfie_lora.domain.recipes import get_recipe

T0 = datetime(2026, 12, 5, 6, 0, tzinfo=UTC)


def _running(*, attempt: int = 1) -> Training:
    return Training(id="t", model_id="m", dataset_id="d", backend="local",
                    status=TrainingStatus.PROCESSING, is_retraining=False, trigger_word="tok",
                    destination="local/tok", trainer_version="local-flux-v2",
                    recipe=get_recipe("local-tiny-v1"), preserved={}, created_at=T0,
                    started_at=T0, total_steps=1000, attempt=attempt)


def _report(t: Training, step: int, at: datetime) -> Training:
    """What the worker's progress report does to the row."""
    return dataclasses.replace(t, step=step, metrics=mark_pace(t, step=step, at=at))


def test_the_pace_starts_at_the_attempts_first_report_not_at_the_start() -> None:
    # Resumed at 750 after a 3 minute load, then 2 s a step.
    loaded = T0 + timedelta(minutes=3)
    t = _report(_running(), 750, loaded)
    assert time_left(t, now=loaded) is None
    t = _report(t, 751, loaded + timedelta(seconds=2))
    assert time_left(t, now=loaded + timedelta(seconds=2)) is None  # one step: nothing to go on
    t = _report(t, 760, loaded + timedelta(seconds=20))
    assert time_left(t, now=loaded + timedelta(seconds=20)) == 2.0 * 240
    # The first report stays the attempt's, whatever comes after.
    assert t.metrics["pace"] == {"attempt": 1, "step": 750, "at": loaded.isoformat()}


def test_a_new_attempt_starts_its_own_pace() -> None:
    t = _report(_report(_running(), 0, T0), 100, T0 + timedelta(seconds=100))
    assert time_left(t, now=T0 + timedelta(seconds=100)) == 900.0
    # Taken over: the next attempt's pace only once it reported two steps of its own.
    t = dataclasses.replace(t, attempt=2)
    assert time_left(t, now=T0 + timedelta(minutes=10)) is None
    later = T0 + timedelta(minutes=10)
    t = _report(t, 80, later)
    t = _report(t, 90, later + timedelta(seconds=5))
    assert time_left(t, now=later + timedelta(seconds=5)) == 0.5 * 910


def test_no_estimate_for_an_ended_training() -> None:
    t = _report(_report(_running(), 0, T0), 10, T0 + timedelta(seconds=10))
    assert time_left(dataclasses.replace(t, status=TrainingStatus.CANCELED),
                     now=T0 + timedelta(seconds=10)) is None


def test_a_replicate_run_s_queue_boot_and_load_at_step_0_do_not_count() -> None:
    """Replicate's first poll reports step 0 as the run is created; 4 min starting and 2 min
    processing before the bar are polled at step 0, then 1.5 s a step (review daydiff2 finding
    2: at step 23 the page said about 283 min left for 24 real)."""
    t = _running()
    for second in range(0, 361, 5):  # polls at step 0 until the steps move
        t = _report(t, 0, T0 + timedelta(seconds=second))
    for step, second in ((24, 396), (160, 600)):
        now = T0 + timedelta(seconds=second)
        t = _report(t, step, now)
        left = time_left(t, now=now)
        assert left is not None
        assert left == (1000 - step) * 1.5  # old code: about 283 min at step 23
    assert t.metrics["pace"] == {"attempt": 1, "step": 0,
                                 "at": (T0 + timedelta(seconds=360)).isoformat()}
