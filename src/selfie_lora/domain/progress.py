"""A training's loss curve, as the page draws it: a bounded list of (step, loss) points."""

from __future__ import annotations

import math

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
