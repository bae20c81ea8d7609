"""How a ``selfie-lora`` command ends: one that loaded torch freezes what it holds before the
interpreter's last garbage collections, which walked every torch, diffusers, peft and
transformers object (~1.3 s of CPU) just before the process ended anyway; one that did not
leaves the collector as it is. In a process of its own: a frozen object is never freed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import atexit, gc, sys, types
if {torch!r}:
    sys.modules["torch"] = types.ModuleType("torch")  # loaded, as train or generate loads it
atexit.register(lambda: sys.stderr.write(f"FROZEN {{gc.get_freeze_count()}}\\n"))
sys.argv = ["selfie-lora", "--help"]
from selfie_lora.__main__ import main
main()
"""


@pytest.mark.parametrize(("torch", "dev"), [(True, False), (False, False), (True, True)])
def test_a_command_that_loaded_torch_skips_the_last_collections(tmp_path: Path, torch: bool,
                                                                  dev: bool) -> None:
    """Not under ``python -X dev``: a developer there wants the last ResourceWarnings and the
    finalizers of objects in cycles, which the freeze skips."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_LORA_")}
    env["SELFIE_LORA_HOME"] = str(tmp_path / "home")
    flags = ["-X", "dev"] if dev else []
    done = subprocess.run([sys.executable, *flags, "-c", PROBE.format(torch=torch)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout  # the command ran as before
    frozen = [int(line.split()[1]) for line in done.stderr.splitlines()
              if line.startswith("FROZEN ")]
    assert len(frozen) == 1, done.stderr
    if torch and not dev:
        assert frozen[0] > 1000  # the modules and everything they built
    else:
        assert frozen[0] == 0
