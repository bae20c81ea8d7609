"""``selfie-lora gc`` stopped mid-collection: a SIGTERM (``timeout``, a cron or systemd limit,
``docker stop``) ends it as Ctrl-C does, its lease released, and a collector killed outright
(``kill -9``) on this machine does not block the next one until its lease lapses: the next
``gc`` sees that its process is gone and takes the lease over."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from selfie_lora.config import Settings
from selfie_lora.services.common import utcnow
from selfie_lora.wiring import build_services
from tests.e2e.conftest import clean_env, run_cli, selfie_lora_exe

pytestmark = pytest.mark.slow
ORPHANS = 20_000


def plant_orphans(home: Path) -> Path:
    """A generation folder of ``ORPHANS`` old blobs no row names: a collection long enough to
    be stopped midway."""
    folder = home / "blobs" / "generations" / str(uuid.uuid4())
    folder.mkdir(parents=True)
    when = (utcnow() - timedelta(days=3)).timestamp()
    for i in range(ORPHANS):
        path = folder / f"{i}.png"
        path.write_bytes(b"")
        os.utime(path, (when, when))
    return folder


def stopped_midway(home: Path, env: dict[str, str], sig: signal.Signals) -> tuple[int, str]:
    """``selfie-lora gc`` sent ``sig`` once it has deleted some of the orphans: its exit status
    and stderr."""
    folder = plant_orphans(home)
    gc = subprocess.Popen([selfie_lora_exe(), "gc"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and gc.poll() is None:
            if len(os.listdir(folder)) < ORPHANS - 200:
                break
            time.sleep(0.02)
        assert gc.poll() is None, "gc ended before it could be stopped"
        gc.send_signal(sig)
        _, err = gc.communicate(timeout=60)
    finally:
        if gc.poll() is None:
            gc.kill()
            gc.wait(timeout=30)
    left = len(os.listdir(folder))
    assert 0 < left < ORPHANS, left  # stopped midway
    return gc.returncode, err


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    build_services(Settings(home=home), trainers={}, generators={}).close()  # migrated, empty
    return home


def lease_owner(home: Path) -> str | None:
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        job = services.repo.get_job("gc")
        return job.owner if job is not None else None
    finally:
        services.close()


def test_a_sigterm_ends_gc_as_ctrl_c_does_and_releases_its_lease(home: Path) -> None:
    env = clean_env(home)
    status, err = stopped_midway(home, env, signal.SIGTERM)
    assert status == 143, err  # old code: -15, killed on the spot
    assert "interrupted: what was deleted stays deleted; run gc again" in err
    assert "Traceback" not in err
    assert lease_owner(home) is None  # released (old code: held for 10 minutes)
    again = run_cli(["gc"], env)
    assert again.returncode == 0, again.stdout + again.stderr  # old code: 1, 'is running'
    assert "orphans      deleted" in again.stdout


def test_the_next_gc_takes_over_from_a_collector_killed_on_this_machine(home: Path) -> None:
    env = clean_env(home)
    status, _ = stopped_midway(home, env, signal.SIGKILL)
    assert status == -signal.SIGKILL
    dead = lease_owner(home)
    assert dead is not None  # nothing could release it
    again = run_cli(["gc"], env)
    assert again.returncode == 0, again.stdout + again.stderr  # old code: 1, 'is running by'
    assert "orphans      deleted" in again.stdout
    assert f"taking the lease over from {dead}, whose process is gone" in again.stderr
    assert lease_owner(home) is None
