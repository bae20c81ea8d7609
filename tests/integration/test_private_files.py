"""What HOME holds is its owner's alone: the SQLite database (every password hash, the hashes of
sessions and API keys) and the queue were created with the process's umask, 0644 with the
usual 022, beside a secret_key and blobs made 0600 (found in the security review: another local
account read every user's Argon2id hash)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfie_lora.config import Settings
from selfie_lora.wiring import build_services, open_database, session_secret, using_home
from tests.conftest import make_settings


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(home: Path) -> list[Path]:
    return [home / name for name in ("selfie-lora.db", "selfie-lora.db-wal", "selfie-lora.db-shm",
                                     "queue.db", "secret_key")]


def test_a_new_home_and_its_databases_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "new-home", database_url=None, queue_url=None)
    open_database(settings)
    services = build_services(settings, migrate=False)
    try:
        session_secret(settings)
        services.users.create(name="ann", password="a long password")  # the WAL written to
        assert mode(settings.home) == 0o700
        for path in database_files(settings.home):
            assert path.exists(), path
            assert mode(path) == 0o600, (path.name, oct(mode(path)))
    finally:
        services.close()


def test_a_home_made_by_a_start_s_lock_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """serve, worker, train and resume take HOME's lock (``wiring.using_home``) before they open
    the database, so the lock's folder is the one that makes a missing HOME: 0700 as well, not
    the umask's 0755 (daydiff3 review: a new worker's HOME was 0755)."""
    settings = Settings(home=tmp_path / "new-home", database_url=None, queue_url=None)
    previous = os.umask(0o022)
    try:
        with using_home(settings):
            assert mode(settings.home) == 0o700
    finally:
        os.umask(previous)


def test_an_existing_install_s_databases_are_made_private_when_opened(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # a database copied in, as an earlier release left it
    settings.home.chmod(0o755)
    for name in ("selfie-lora.db", "queue.db"):
        (settings.home / name).touch()
        (settings.home / name).chmod(0o644)
    services = build_services(settings)
    try:
        services.users.create(name="ann", password="a long password")
        for path in database_files(settings.home)[:4]:
            assert mode(path) == 0o600, (path.name, oct(mode(path)))
        assert mode(settings.home) == 0o755  # an existing folder may be the operator's own
    finally:
        services.close()
