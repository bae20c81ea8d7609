"""``selfie-lora gc [--dry-run] [--list]``: the summary per kind (counts and bytes), the keys with
``--list``; a dry run deletes nothing, a real run deletes and says the same; a collection already
running is refused."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

from typer.testing import CliRunner

from selfie_lora.cli import app
from selfie_lora.config import Settings
from selfie_lora.domain.entities import WebSession
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
    assert old.relative_to(home / "blobs").as_posix() not in dry.output  # keys only with --list
    assert old.exists()
    assert stale.exists()

    listed = runner.invoke(app, ["gc", "--dry-run", "--list"])
    assert listed.exit_code == 0, listed.output
    assert f"would delete orphans: {old.relative_to(home / 'blobs').as_posix()} (2.0 KiB)" in (
        listed.output)
    # Its name before --list, still taken (hidden): a script's `gc -v` lists the same.
    for old_name in ("-v", "--verbose"):
        assert runner.invoke(app, ["gc", "--dry-run", old_name]).output == listed.output
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


def test_a_collection_forgets_sign_in_records_past_the_window_and_expired_sessions(
        home: Path) -> None:
    """Failed sign-ins (client addresses, names as typed), sign-up attempts and expired
    sessions were never deleted: nothing but a test called ``forget_expired``. A collection,
    the command's and the workers' alike, deletes what counts for no limit and keeps the rest."""
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        now = utcnow()
        window = services.settings.sign_in_policy.window
        user, _key = services.users.create(name="ann")
        repo = services.repo
        old = now - timedelta(days=3)
        repo.add_sign_in_failure(["client:10.9.2.1", "name:my password"], at=old)
        repo.add_sign_in_failure(["signup:10.9.2.1"], at=old)
        repo.add_sign_in_failure(["client:10.9.2.2", "signup:10.9.2.2"],
                                 at=now - window + timedelta(minutes=2))  # still counted
        for sid, expires in (("expired", now - timedelta(days=1)),
                             ("live", now + timedelta(days=1))):
            repo.add_session(WebSession(id=sid, user_id=user.id, csrf_token="c",
                                        created_at=now - timedelta(days=3), expires_at=expires))
    finally:
        services.close()

    done = CliRunner().invoke(app, ["gc"])
    assert done.exit_code == 0, done.output
    assert ("sign-ins     forgot 4 expired session(s) and sign-in or sign-up record(s) older "
            "than the rate limit's window") in done.output

    # A worker's, due again at once (the command's collection just ran).
    services = build_services(Settings(home=home, gc_interval_hours=1e-9), trainers={},
                              generators={})
    try:
        repo = services.repo
        long_ago = utcnow() - timedelta(days=30)
        for key in ("client:10.9.2.1", "name:my password", "signup:10.9.2.1"):
            assert list(repo.sign_in_failures(key, since=long_ago)) == [], key
        for key in ("client:10.9.2.2", "signup:10.9.2.2"):
            assert len(repo.sign_in_failures(key, since=long_ago)) == 1, key
        assert repo.get_session("expired") is None
        assert repo.get_session("live") is not None
        # The workers' periodic collection runs the same: a new old failure goes too.
        repo.add_sign_in_failure(["client:10.9.2.3"], at=old)
        summary = services.gc.run_due()
        assert summary is not None
        assert summary.sign_in_rows == 1
        assert list(repo.sign_in_failures("client:10.9.2.3", since=long_ago)) == []
    finally:
        services.close()
