"""Ctrl-C in the first second of a command, while Python loads the command line's modules
(typer, rich, pydantic, httpx: most of a second on a busy machine), is what it is later: a short
line and exit status 130, not a traceback into importlib and a process killed by SIGINT."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# SIGINT sent by the process to itself when it first imports ``module``: where a Ctrl-C
# pressed that early lands, every time (a timed one lands anywhere on a busy machine).
INTERRUPT_AT = """
import importlib.abc, os, signal, sys
class InterruptAt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, InterruptAt())
from {entry_module} import {entry_function}
sys.exit({entry_function}())
"""


def entry_point() -> tuple[str, str]:
    """The ``selfie-lora`` script's module and function, as pip writes the script from them."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["selfie-lora"].split(":")
    return module, function


@pytest.mark.parametrize("module", ["typer", "rich.table", "pydantic_settings"])
def test_ctrl_c_while_the_command_loads_is_one_line_and_130(tmp_path: Path, module: str) -> None:
    entry_module, entry_function = entry_point()
    code = INTERRUPT_AT.format(module=module, entry_module=entry_module,
                               entry_function=entry_function)
    env = {**os.environ, "SELFIE_LORA_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code, "users", "list"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip() == "interrupted before the command started: nothing was done"
    assert done.stdout == ""
    assert not (tmp_path / "home").exists()
