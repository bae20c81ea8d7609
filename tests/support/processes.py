"""A child Python process on this checkout that dies at a point its script chooses
(``os._exit``: nothing after it runs, no ``finally``, no ``atexit``), as a server killed there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_killed(script: str, *args: str, exit_code: int = 9) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``args`` (``sys.argv[1:]``) and check that it died with
    ``exit_code``; its output comes back for the test to read."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "src")))}
    died = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                          timeout=300, check=False, capture_output=True, text=True)
    assert died.returncode == exit_code, died.stderr[-2000:]
    return died
