"""The end-to-end helpers' settings are those of the processes they start, not the test run's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfie_lora.config import DATABASE_FILE
from tests.e2e.conftest import clean_env, settings_of


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
