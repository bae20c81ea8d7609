"""bench/checks_eval.py's scoring judges each pair of photos once for all the different-person
sets (each person's photos with every stranger in turn), and leaves the judgement as it was."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.dataset.checks import duplicates

pytest.importorskip("imagehash", reason="the photo checks need the 'faces' extra")

ROOT = Path(__file__).resolve().parents[2]


def test_each_pair_is_judged_once_and_the_judge_is_put_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import checks_eval
    finally:
        sys.path.remove(str(ROOT / "bench"))
    judged: list[tuple[object, object]] = []

    def judge(a: object, b: object, *, policy: object, cache: Any = None) -> str | None:
        judged.append((a, b))
        return "a copy" if a is first else None

    monkeypatch.setattr(duplicates, "pair_duplicate", judge)
    first, second, third = object(), object(), object()
    policy = checks_eval.POLICY
    with checks_eval._pairs_judged_once():
        answers = [duplicates.pair_duplicate(a, b, policy=policy, cache={})  # type: ignore[arg-type]
                   for a, b in ((first, second), (second, third), (first, second),
                                (second, first), (second, third))]
    assert answers == ["a copy", None, "a copy", None, None]
    # Once per ordered pair: "how b copies a" need not be "how a copies b".
    assert judged == [(first, second), (second, third), (second, first)]
    assert duplicates.pair_duplicate is judge
