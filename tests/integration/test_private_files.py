"""What HOME holds is its owner's alone: the SQLite database (every password hash, the hashes of
sessions and API keys) and the queue were created with the process's umask, 0644 with the
usual 022, beside a secret_key and blobs made 0600 (found in the security review: another local
account read every user's Argon2id hash)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from selfie_lora import wiring
from selfie_lora.config import Settings
from selfie_lora.errors import ConfigError
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


@dataclass
class Modes:
    """A ``CheckpointStore`` and ``SampleStore`` that keep each file's mode as it is handed over
    (the file may go once ``save`` returns)."""

    seen: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path, *, step: int) -> None:
        self.seen[f"{path.parent.name}/{path.name}"] = mode(path)


@pytest.mark.slow
def test_a_training_s_lora_samples_and_checkpoints_are_private_in_a_home_made_0755(
        tmp_path: Path, shared_model_cache: Path) -> None:
    """systemd's ``StateDirectory=`` makes HOME 0755 before the service starts, and a HOME that
    is there keeps its mode: the work folders were then 0755 and lora.safetensors and the
    samples 0644, so any local account read a running training's LoRA and the pictures of a
    face (security2 review workperm.sh). Now every file under work/ is 0600, every folder 0700,
    whatever the umask (022 here) and HOME's mode."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from selfie_lora.adapters.flux.trainer import LocalTrainer
    from selfie_lora.services.training import _attempt_folder
    from tests.integration.test_local_backend import RECIPE, FakeSink, _job

    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    # The folder the training service makes for an attempt, as it makes it.
    work_dir = _attempt_folder(home / "work" / "tr_1", 1)
    kept_checkpoints, kept_samples = Modes(), Modes()
    recipe = replace(RECIPE, steps=8, sample_every=4, checkpoint_every=4)
    job = replace(_job(tmp_path, recipe), work_dir=work_dir, checkpoints=kept_checkpoints,
                  samples=kept_samples)
    trainer = LocalTrainer(base_model="tiny", cache_dir=shared_model_cache, isolation="inline",
                           device="cpu", num_threads=1, progress_interval_s=0.0)
    result = trainer.train(job, sink=FakeSink())

    assert result.weights_path == work_dir / "lora.safetensors"
    assert kept_samples.seen
    assert set(kept_samples.seen.values()) == {0o600}, kept_samples.seen
    assert kept_checkpoints.seen
    assert set(kept_checkpoints.seen.values()) == {0o600}, kept_checkpoints.seen
    files = {p.relative_to(home).as_posix(): oct(mode(p))
             for p in (home / "work").rglob("*") if p.is_file()}
    folders = {p.relative_to(home).as_posix(): oct(mode(p))
               for p in [home / "work", *(home / "work").rglob("*")] if p.is_dir()}
    assert "work/tr_1/attempt-1/lora.safetensors" in files
    assert any("/samples/" in name for name in files), files
    assert files == dict.fromkeys(files, "0o600")
    assert {"work", "work/tr_1", "work/tr_1/attempt-1", "work/tr_1/attempt-1/samples"} <= set(
        folders), folders
    assert folders == dict.fromkeys(folders, "0o700")
    assert mode(home) == 0o755  # an existing folder may be the operator's own


def test_an_existing_secret_key_readable_by_others_is_made_private_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A HOME/secret_key left 0644 (copied in, or made by hand) was used as it was, while the
    database beside it was made 0600 when opened: any local account could read the key that
    signs every session cookie (sec review hardening 3). Now it is made 0600, said once."""
    settings = Settings(home=tmp_path / "home", database_url=None, queue_url=None)
    settings.home.mkdir(mode=0o700)
    key = settings.home / "secret_key"
    key.write_text("k" * 64, encoding="ascii")
    key.chmod(0o644)
    with caplog.at_level("WARNING"):
        assert session_secret(settings) == "k" * 64
        assert session_secret(settings) == "k" * 64
    assert mode(key) == 0o600  # old code: 0o644
    said = [r.getMessage() for r in caplog.records if "secret_key" in r.getMessage()]
    assert len(said) == 1, said


def test_an_empty_secret_key_file_is_refused(tmp_path: Path) -> None:
    """An empty HOME/secret_key signed every cookie with an empty key."""
    settings = Settings(home=tmp_path / "home", database_url=None, queue_url=None)
    settings.home.mkdir(mode=0o700)
    (settings.home / "secret_key").write_text("\n", encoding="ascii")
    with pytest.raises(ConfigError, match="secret_key"):
        session_secret(settings)


def _start_killed_making_the_key(home: Path) -> Path:
    """What a start SIGKILLed between writing its candidate key and linking it leaves in HOME:
    a real process, killed at that point, its pid reaped (no process any more)."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from selfie_lora.config import Settings
        from selfie_lora import wiring
        os.link = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        print(os.getpid(), flush=True)
        wiring.session_secret(Settings(home=Path({str(home)!r}), database_url=None,
                                       queue_url=None))
    """)
    src = str(Path(wiring.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == -9, done.stderr
    leftover = home / f".secret_key.{done.stdout.strip()}.tmp"
    assert leftover.is_file()
    assert not (home / "secret_key").exists()
    return leftover


def test_a_key_candidate_a_killed_start_left_is_removed_once_an_hour_old(tmp_path: Path) -> None:
    """The candidate key of a start killed before it linked it stayed in HOME for good: every
    later start has another pid, and finds the key made (found in review: task-sweep)."""
    settings = Settings(home=tmp_path / "home", database_url=None, queue_url=None)
    settings.home.mkdir(mode=0o700)
    young = _start_killed_making_the_key(settings.home)
    old = settings.home / ".secret_key.1.tmp"
    old.write_text("x" * 64, encoding="ascii")
    hour_ago = time.time() - 3600 - 60
    os.utime(old, (hour_ago, hour_ago))

    key = session_secret(settings)  # this start makes the key: each start sweeps, made or found
    assert not old.exists()  # old code: still there
    assert young.is_file()  # a minute old at most: kept (a live start's lives for microseconds)
    os.utime(young, (hour_ago, hour_ago))
    assert session_secret(settings) == key  # a later start, the key found
    assert not young.exists()
    assert sorted(p.name for p in settings.home.iterdir()) == ["secret_key"]
