"""``selfie-lora gc [--dry-run] [-v]``: the summary per kind (counts and bytes), the keys with
``-v``; a dry run deletes nothing, a real run deletes and says the same; a collection already
running is refused."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

from typer.testing import CliRunner

from selfie_lora.cli import app
from selfie_lora.config import Settings
from selfie_lora.services.common import utcnow
from selfie_lora.wiring import build_services


def plant(home: Path, key: str, data: bytes, *, days_old: float) -> Path:
    path = home / "blobs" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    when = (utcnow() - timedelta(days=days_old)).timestamp()
    os.utime(path, (when, when))
    return path


def test_a_dry_run_lists_and_keeps_then_a_run_deletes(home: Path) -> None:
    build_services(Settings(home=home), trainers={}, generators={}).close()  # migrated, empty
    old = plant(home, f"generations/{uuid.uuid4()}/0.png", b"x" * 2048, days_old=3)
    young = plant(home, f"generations/{uuid.uuid4()}/0.png", b"y", days_old=0)
    stale = home / "work" / str(uuid.uuid4())
    stale.mkdir(parents=True)
    (stale / "lora.safetensors").write_bytes(b"z" * 100)
    when = (utcnow() - timedelta(days=3)).timestamp()
    for path in (stale / "lora.safetensors", stale):
        os.utime(path, (when, when))
    runner = CliRunner()

    dry = runner.invoke(app, ["gc", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "garbage collection (dry run: nothing deleted):" in dry.output
    assert "orphans      would delete 1 blob(s), 2.0 KiB" in dry.output
    assert "work folders would delete 1 folder(s), 100 B" in dry.output
    assert "datasets     would delete 0 row(s), 0 blob(s), 0 B" in dry.output
    assert old.relative_to(home / "blobs").as_posix() not in dry.output  # keys only with -v
    assert old.exists()
    assert stale.exists()

    listed = runner.invoke(app, ["gc", "--dry-run", "-v"])
    assert listed.exit_code == 0, listed.output
    assert f"would delete orphans: {old.relative_to(home / 'blobs').as_posix()} (2.0 KiB)" in (
        listed.output)
    assert f"would delete work folders: work/{stale.name} (100 B)" in listed.output
    assert young.relative_to(home / "blobs").as_posix() not in listed.output
    assert old.exists()

    done = runner.invoke(app, ["gc"])
    assert done.exit_code == 0, done.output
    assert "orphans      deleted 1 blob(s), 2.0 KiB" in done.output
    assert not old.exists()
    assert not stale.exists()
    assert young.exists()

    again = runner.invoke(app, ["gc", "--dry-run"])
    assert "total        would delete 0 row(s), 0 blob(s) or folder(s), 0 B" in again.output


def test_a_collection_already_running_is_refused(home: Path) -> None:
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        now = utcnow()
        assert services.repo.claim_job("gc", owner="host/w0", now=now,
                                       expires_at=now + timedelta(minutes=10))
    finally:
        services.close()
    result = CliRunner().invoke(app, ["gc"])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "another garbage collection is running by host/w0 until " in said
    assert "UTC unless it renews its lease (if that collector was killed, its lease lapses " \
        "then); try again when it has ended" in said
    assert CliRunner().invoke(app, ["gc", "--dry-run"]).exit_code == 0  # a dry run needs none
