"""The loss curve stays bounded, in step order, and keeps its first and newest points."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.progress import add_loss_point

reports = st.lists(st.tuples(st.integers(0, 5000),
                             st.floats(allow_nan=True, allow_infinity=True)), max_size=600)


@given(reports=reports, max_points=st.integers(3, 50))
def test_bounded_ordered_and_keeps_the_ends(reports: list[tuple[int, float]],
                                            max_points: int) -> None:
    curve: tuple[tuple[int, float], ...] = ()
    accepted: list[tuple[int, float]] = []
    for step, loss in reports:
        before = curve
        curve = add_loss_point(curve, step=step, loss=loss, max_points=max_points)
        if curve != before:
            accepted.append((step, loss))
            assert curve[-1] == (step, loss)  # the newest report is always shown
        assert len(curve) <= max_points
        assert [s for s, _ in curve] == sorted({s for s, _ in curve})  # strictly increasing
        assert all(math.isfinite(v) for _, v in curve)
    if accepted:
        assert curve[0] == accepted[0]


def test_a_repeated_or_earlier_step_changes_nothing() -> None:
    curve = add_loss_point((), step=5, loss=0.5)
    assert add_loss_point(curve, step=5, loss=0.1) == curve
    assert add_loss_point(curve, step=3, loss=0.1) == curve
    assert add_loss_point(curve, step=6, loss=float("nan")) == curve
