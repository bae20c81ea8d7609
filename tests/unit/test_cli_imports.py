"""What the ``selfie-lora`` command loads before it knows what it will do. Every command (and the
hundreds the tests start) paid for sqlalchemy and httpx, which selfie_lora.config imported for
two of its validators: about 0.45 of the 1.1 CPU-seconds ``selfie-lora --help`` took. Run in
fresh interpreters: this one has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfie_lora.config import REPLICATE_API_URL, Settings, _http_url

# None of these is needed to print the help or to read the settings; a module-level import of
# one of them (in cli, config, console, logs, errors, the domain) would load it for every command.
HEAVY = ("sqlalchemy", "httpx", "alembic", "huey", "numpy", "PIL", "torch", "diffusers",
         "selfie_lora.wiring", "selfie_lora.adapters")

REPORT = """
import json, sys
heavy = {heavy!r}
try:
    {body}
finally:
    sys.stderr.write("LOADED " + json.dumps([m for m in heavy if m in sys.modules]) + "\\n")
"""


def _loaded(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_LORA_")}
    env["SELFIE_LORA_HOME"] = str(tmp_path / "home")
    code = REPORT.format(heavy=HEAVY, body=body)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("LOADED ")]
    assert len(lines) == 1, done.stderr
    loaded: list[str] = json.loads(lines[0].removeprefix("LOADED "))
    return done, loaded


def test_importing_the_command_line_loads_no_database_network_or_image_library(
        tmp_path: Path) -> None:
    done, loaded = _loaded(tmp_path, "import selfie_lora.cli")
    assert done.returncode == 0, done.stderr
    assert loaded == []


def test_reading_the_settings_loads_neither_sqlalchemy_nor_httpx(tmp_path: Path) -> None:
    done, loaded = _loaded(tmp_path, "from selfie_lora.config import get_settings; get_settings()")
    assert done.returncode == 0, done.stderr
    assert loaded == []


@pytest.mark.parametrize("args", [["--help"], ["users", "--help"], ["users", "create", "--help"]])
def test_a_help_loads_none_of_them(tmp_path: Path, args: list[str]) -> None:
    # users --help runs the top group's callback first, which reads the settings.
    body = (f"sys.argv = ['selfie-lora', *{args!r}]\n"
            "    from selfie_lora.__main__ import main\n"
            "    try:\n"
            "        main()\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code in (0, None), exc.code")
    done, loaded = _loaded(tmp_path, body)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert loaded == []
    assert not (tmp_path / "home").exists()  # a help makes no HOME


def test_the_default_replicate_address_is_one_the_check_accepts(tmp_path: Path) -> None:
    # The validator skips its httpx check for the default (no httpx at each start): the default
    # must be what the check accepts, and any other value is still checked.
    assert _http_url(REPLICATE_API_URL, form="x").host == "api.replicate.com"
    assert Settings(home=tmp_path).replicate_base_url == REPLICATE_API_URL
    with pytest.raises(ValueError, match="must be Replicate's API address"):
        Settings(home=tmp_path, replicate_base_url="api.replicate.com")
