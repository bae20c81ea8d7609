"""A training's loss curve, as the page draws it: a bounded list of (step, loss) points; and
the time a running training has left, from its current attempt's pace."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from selfie_lora.domain.entities import Training

# The key of ``Training.metrics`` that holds, while it runs, the current attempt's first report:
# {"attempt", "step", "at"}. The trainer's own metrics replace it when the training succeeds.
PACE_KEY = "pace"
# Steps of the current attempt it takes to estimate the time left.
PACE_MIN_STEPS = 2

MAX_POINTS = 200


def add_loss_point(curve: tuple[tuple[int, float], ...], *, step: int, loss: float,
                   max_points: int = MAX_POINTS) -> tuple[tuple[int, float], ...]:
    """``curve`` with the loss at ``step`` added. A step at or before the last one (a resumed
    or repeated report) and a loss that is not a finite number change nothing. Past
    ``max_points`` every other point is dropped (the first and the newest are kept), so a long
    training's curve keeps its shape in a bounded row."""
    if not math.isfinite(loss) or (curve and step <= curve[-1][0]):
        return curve
    points = (*curve, (step, float(loss)))
    if len(points) > max_points:
        points = (*points[:-1:2], points[-1])
    return points


def mark_pace(t: Training, *, step: int, at: datetime) -> dict[str, Any]:
    """``t.metrics`` with ``step`` at ``at`` recorded as its attempt's first report, unless that
    attempt already has one at another step. While the reports stay at the first one's step, the
    newest of them is kept: the pace starts at the last report before the steps move, so neither
    the load (the local trainer's step 0 after it, a Replicate run's polls at step 0 through its
    queue, boot and weights download) nor the steps an earlier attempt (or a canceled training
    this one resumes) made count in the pace."""
    pace = t.metrics.get(PACE_KEY)
    if (isinstance(pace, dict) and pace.get("attempt") == t.attempt
            and pace.get("step") != step):
        return t.metrics
    return {**t.metrics, PACE_KEY: {"attempt": t.attempt, "step": step, "at": at.isoformat()}}


def time_left(t: Training, *, now: datetime) -> float | None:
    """Seconds the running training ``t`` has left at its current attempt's pace: the time since
    its first report over the steps made since. None when it ended, or its attempt has made
    fewer than ``PACE_MIN_STEPS`` steps (nothing to go on yet)."""
    pace = t.metrics.get(PACE_KEY)
    if (t.status.is_terminal or not isinstance(pace, dict) or pace.get("attempt") != t.attempt
            or t.total_steps <= t.step):
        return None
    try:
        first, since = int(pace["step"]), datetime.fromisoformat(str(pace["at"]))
    except (KeyError, TypeError, ValueError):
        return None
    done = t.step - first
    if done < PACE_MIN_STEPS:
        return None
    return max(0.0, (now - since).total_seconds()) / done * (t.total_steps - t.step)
