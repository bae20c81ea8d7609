"""How ``selfie-lora serve`` tunes its process: the garbage collector of a serving process
leaves what was built at start-up alone and collects the youngest objects less often (in a
process of its own: a frozen object is never freed)."""

from __future__ import annotations

import json
import subprocess
import sys

from selfie_lora.api.server import GC_YOUNGEST_THRESHOLD

PROBE = """
import gc, json
from selfie_lora.api.server import settle_garbage_collector
before = gc.get_freeze_count()
settle_garbage_collector()
print(json.dumps({"before": before, "after": gc.get_freeze_count(),
                  "threshold": gc.get_threshold()}))
"""


def test_the_objects_built_at_start_up_are_frozen_and_young_ones_collected_less_often() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0
    assert seen["after"] > 1000  # the modules and everything they built
    assert seen["threshold"][0] == GC_YOUNGEST_THRESHOLD > 700  # Python's default
