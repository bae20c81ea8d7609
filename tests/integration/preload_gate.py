"""A module a test puts first in a training fork server's preload (test_training_forkserver):
importing it waits until the file that ``PRELOAD_GATE`` names exists (two minutes at most), so
the test can end the service before the server's own preload module starts."""

import os
import time
from pathlib import Path

_gate = Path(os.environ["PRELOAD_GATE"])
_deadline = time.monotonic() + 120
while not _gate.exists() and time.monotonic() < _deadline:
    time.sleep(0.02)
