"""The developer's shell does not configure the tests: its SELFIE_LORA_* settings (and the AWS,
Replicate and proxy variables that selfie-lora reads) are out of the environment of every test
and of every process a test starts (tests/conftest.py's pytest_configure,
tests.support.environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import AliasChoices

from selfie_lora.config import Settings
from tests.support.environment import TEST_KNOBS, is_outside_setting, outside_settings
from tests.support.processes import ROOT

# What a developer's shell may well hold: each would send the tests elsewhere (a database, a
# bucket, the paid trainer, another HOME) or fail them.
SHELL = {
    "SELFIE_LORA_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x",
    "SELFIE_LORA_QUEUE_URL": "redis://127.0.0.1:1/0",
    "SELFIE_LORA_STORAGE_URL": "s3://nope",
    "SELFIE_LORA_HOME": "/nonexistent",
    "SELFIE_LORA_TRAINER": "replicate",
    "SELFIE_LORA_MIN_PHOTOS": "40",
    "REPLICATE_API_TOKEN": "r8_from_the_shell",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
    "AWS_ACCESS_KEY_ID": "from-the-shell",
    "AWS_SESSION_TOKEN": "from-the-shell",
    "FORWARDED_ALLOW_IPS": "*",
    "PROMETHEUS_MULTIPROC_DIR": "/nonexistent-metrics",
    # pydantic-settings reads the environment whatever the case: lower-case names configure
    # Settings as well (kept by old code, which compared the case).
    "selfie_lora_database_url": "postgresql+psycopg://nobody@127.0.0.1:1/y",
    "selfie_lora_min_photos": "41",
    "replicate_api_token": "r8_lower_case_from_the_shell",
}


def _names_in_a_child() -> list[str]:
    child = subprocess.run(
        [sys.executable, "-c", "import json, os; print(json.dumps(sorted(os.environ)))"],
        capture_output=True, text=True, timeout=60, check=True)
    names: list[str] = json.loads(child.stdout)
    return names


def test_no_setting_of_the_shell_reaches_a_test_or_a_process_it_starts(
        shared_model_cache: Path) -> None:
    # The one setting the run sets itself: its shared folder of built models.
    assert outside_settings(os.environ) == ["SELFIE_LORA_CACHE_DIR"]
    assert os.environ["SELFIE_LORA_CACHE_DIR"] == str(shared_model_cache)
    assert outside_settings(_names_in_a_child()) == ["SELFIE_LORA_CACHE_DIR"]
    settings = Settings()
    assert (settings.home, settings.database_url, settings.queue_url, settings.storage_url,
            settings.storage_endpoint, settings.trainer, settings.replicate_api_token,
            settings.min_photos) == (Path(".selfie-lora"), None, None, None, None, "local",
                                     None, 5)


@pytest.mark.slow  # a pytest of its own: ~9 s
def test_a_shell_with_settings_of_its_own_runs_the_tests_as_a_bare_shell(tmp_path: Path) -> None:
    """The test above, run by a pytest started from a shell that holds SHELL."""
    env = {**os.environ, **SHELL,
           "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "src")))}
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--basetemp", str(tmp_path / "run"),
         f"{Path(__file__).relative_to(ROOT)}::"
         "test_no_setting_of_the_shell_reaches_a_test_or_a_process_it_starts"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    assert "1 passed" in ran.stdout


@pytest.mark.parametrize("name", sorted(SHELL))
def test_each_variable_that_configures_selfie_lora_is_an_outside_setting(name: str) -> None:
    assert is_outside_setting(name)


def test_the_tests_own_variables_are_kept() -> None:
    kept = ["SELFIE_LORA_TEST_POSTGRES_URL", "SELFIE_LORA_TEST_REDIS_URL",
            "SELFIE_LORA_TEST_CHROMIUM", *TEST_KNOBS, "HOME", "PATH", "HYPOTHESIS_PROFILE"]
    assert outside_settings(kept) == []
    # No knob is a setting's own variable: removing the settings must not keep one.
    settings = {f"SELFIE_LORA_{name.upper()}" for name in Settings.model_fields}
    assert not settings & TEST_KNOBS


def test_every_variable_a_setting_is_read_under_is_an_outside_setting() -> None:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"SELFIE_LORA_{name.upper()}")
        if isinstance(field.validation_alias, AliasChoices):
            names.update(alias for alias in field.validation_alias.choices
                         if isinstance(alias, str))
    assert {"REPLICATE_API_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_SECRET_ACCESS_KEY",
            "FORWARDED_ALLOW_IPS", "SELFIE_LORA_DATABASE_URL"} <= names
    assert [name for name in sorted(names) if not is_outside_setting(name)] == []
