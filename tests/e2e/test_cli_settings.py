"""Invalid settings, or a database that cannot be reached, end any command with one line per
problem naming the variable and exit status 1 (2 for check, whose 1 means 'not trainable'):
never pydantic's or sqlalchemy's traceback, and never a setting's value (the settings hold API
tokens and storage keys). check needs no database at all (test_cli_check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "r8_SUPERSECRET_abc123"
AWS_SECRET = "aws_SECRET_xyz789"


def run_cli(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SELFIE_LORA_", "REPLICATE_", "AWS_"))}
    clean.update(SELFIE_LORA_HOME=str(home), REPLICATE_API_TOKEN=SECRET,
                 AWS_SECRET_ACCESS_KEY=AWS_SECRET, SELFIE_LORA_SECRET_KEY="sk_SECRET_key_42" + "k" * 24)
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", "from selfie_lora.cli import main; main()", *args],
        env=clean, capture_output=True, text=True, timeout=120, check=False)


SETTINGS = [
    ({"SELFIE_LORA_STORAGE_URL": "http://x"}, "SELFIE_LORA_STORAGE_URL"),
    ({"SELFIE_LORA_TRAINER": "foo"}, "SELFIE_LORA_TRAINER"),
    ({"SELFIE_LORA_LEASE_SECONDS": "5"}, "SELFIE_LORA_LEASE_SECONDS"),
]
DATABASE_DOWN = ({"SELFIE_LORA_DATABASE_URL": "postgresql+psycopg://u:pw_SECRET_db@127.0.0.1:1/db"},
                 "SELFIE_LORA_DATABASE_URL")


@pytest.mark.parametrize(("env", "variable", "command", "status"), [
    *[(env, variable, ["check", "."], 2) for env, variable in SETTINGS],  # 1: not trainable
    *[(env, variable, command, 1) for env, variable in [*SETTINGS, DATABASE_DOWN]
      for command in (["worker"], ["serve", "--no-worker"])],
])
def test_a_bad_setting_is_one_line_without_secrets(
        tmp_path: Path, env: dict[str, str], variable: str, command: list[str],
        status: int) -> None:
    result = run_cli(tmp_path, env, *command)
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert variable in output
    assert "Traceback" not in output
    for secret in (SECRET, AWS_SECRET, "sk_SECRET_key_42", "pw_SECRET_db"):
        assert secret not in output
    assert len(output.strip().splitlines()) == 1, output
