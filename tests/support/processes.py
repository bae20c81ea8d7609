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


def services_script(*, trainer: str = "FakeTrainer()", settings: str = "intake_workers=1",
                    imports: str = "") -> str:
    """The first lines of a ``run_killed`` script: the services built on fakes in the folder
    ``sys.argv[1]``, as ``svc``, with ``os`` and ``sys`` imported. ``trainer``: the local
    trainer's expression; ``settings``: more keywords of ``make_settings``; ``imports``: more
    import lines (each ending in a newline)."""
    more = f", {settings}" if settings else ""
    return (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer\n"
        "from selfie_lora.wiring import build_services\n"
        "from tests.conftest import make_settings, one_person_analyzer\n"
        f"{imports}"
        f"svc = build_services(make_settings(Path(sys.argv[1]){more}),\n"
        f"                     trainers={{'local': {trainer}}},\n"
        "                     face_analyzer=one_person_analyzer(),\n"
        "                     generators={'local': FakeGenerator()})\n"
    )
