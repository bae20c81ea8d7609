"""bench/checks_eval.py's comparison with the README's table (the photos themselves are
evaluated in tests/integration/test_checks_eval.py, where CI has them)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_worse_readme_floor_is_noticed(tmp_path: Path) -> None:
    """A README claiming more than a check measures is reported, naming the check and the
    figure; the table's other columns and rows in other sections are ignored."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import checks_eval
    finally:
        sys.path.remove(str(ROOT / "bench"))
    readme = tmp_path / "README.md"
    readme.write_text(
        f"| blurry | 9/9 | 0.1 | 0.1 |\n{checks_eval.MARKER}\n"
        "| check | cases (+/-) | precision | recall | rejected negatives |\n|---|---|---|---|---|\n"
        "| blurry | 45/225 | 0.900 | 1.000 | 0 |\n| smooth_skin | 45/225 | 1.000 | 0.500 | 0 |\n"
        f"{checks_eval.MARKER}\n")
    floors = checks_eval.readme_floor(readme)
    assert floors == {"blurry": (0.9, 1.0), "smooth_skin": (1.0, 0.5)}
    rows = {"blurry": checks_eval.Row("blurry", positives=45, negatives=225, tp=45, fp=3),
            "smooth_skin": checks_eval.Row("smooth_skin", positives=45, negatives=225, tp=26,
                                           fp=11)}
    assert checks_eval.regressions(rows, floors) == [
        "smooth_skin: precision 0.703 < 1.000 in the README"]
    # A check the README does not list is a gap, not a pass.
    rows["near_duplicate"] = checks_eval.Row("near_duplicate", positives=1, negatives=1, tp=1)
    assert checks_eval.regressions(rows, floors)[-1] == "the README's table lacks near_duplicate"
