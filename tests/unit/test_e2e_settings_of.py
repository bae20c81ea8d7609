"""The end-to-end helpers' settings are those of the processes they start, not the test run's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfie_lora.config import DATABASE_FILE
from tests.e2e.conftest import clean_env, outside_env, settings_of


def test_settings_of_reads_only_the_env_it_is_given(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own settings in the test run's environment must not reach the in-process
    users (they were written into ``SELFIE_LORA_DATABASE_URL``'s database, not the HOME's that
    the ``serve`` started with ``env`` reads)."""
    monkeypatch.setenv("SELFIE_LORA_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.setenv("SELFIE_LORA_SIGNUP", "true")
    home = tmp_path / "home"
    env = clean_env(home, SELFIE_LORA_QUEUE_URL="")
    before = dict(os.environ)

    settings = settings_of(env)

    assert settings.database_url is None
    assert settings.effective_database_url == f"sqlite:///{(home / DATABASE_FILE).resolve()}"
    assert settings.home == home
    assert settings.min_photos == 3
    assert settings.signup is False
    # Empty is unset, as for the process.
    assert settings.queue_url is None
    assert dict(os.environ) == before


def test_started_processes_keep_only_the_runs_shared_model_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's one folder of built models reaches the processes that tests start (each built
    the tiny FLUX into its own HOME before, ~1 s of CPU), no other selfie-lora setting does; a
    test of a cold cache drops it too."""
    monkeypatch.setenv("SELFIE_LORA_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SELFIE_LORA_SIGNUP", "true")
    home = tmp_path / "home"

    env = clean_env(home)
    assert env["SELFIE_LORA_CACHE_DIR"] == str(tmp_path / "models")
    assert "SELFIE_LORA_SIGNUP" not in env
    assert settings_of(env).model_cache_dir == tmp_path / "models"
    assert outside_env()["SELFIE_LORA_CACHE_DIR"] == str(tmp_path / "models")
    assert not any(k.startswith("SELFIE_LORA_") and k != "SELFIE_LORA_CACHE_DIR"
                   for k in outside_env())

    cold = clean_env(home, cold_cache=True)
    assert "SELFIE_LORA_CACHE_DIR" not in cold
    assert settings_of(cold).model_cache_dir == home / "cache"
    assert not any(k.startswith("SELFIE_LORA_") for k in outside_env(cold_cache=True))
