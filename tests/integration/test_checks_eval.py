"""The photo checks against the README's figures, on the labelled real photos.

bench/checks_eval.py measures precision and recall per check on ``../shared/photos/people``
(where CI has it; users do not) and exits 1 when any falls below the README's table: a threshold
change that makes a check worse fails here. The table it prints is shown in the test output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEOPLE = Path(os.environ.get("SELFIE_LORA_PEOPLE_PHOTOS",
                             ROOT.parent / "shared" / "photos" / "people"))

pytest.importorskip("dlib", reason="the photo checks need the 'faces' extra")
pytest.importorskip("cv2", reason="the photo checks need the 'faces' extra")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PEOPLE / "labels.csv").is_file(),
                       reason=f"no labelled photos at {PEOPLE} (CI has them in ../shared)"),
]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "checks_eval.py"), "--people", str(PEOPLE), *args],
        capture_output=True, text=True, timeout=560, cwd=ROOT, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_every_check_is_at_least_as_good_as_the_readme_says(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = _bench("--models", "5", "--check-readme", str(ROOT / "README.md"))
    with capsys.disabled():
        print("\n" + result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| near_duplicate |" in result.stdout
    assert "ROC AUC" in result.stdout
