"""The temporary folder of a tiny FLUX build killed before its rename is removed by the next build
or load, and a live build's never is (``adapters.flux.tiny.sweep_dead_builds``).

No torch here: the build is a fake that writes what ``save_pretrained`` writes first; the leftover
is made by a real process that is killed while it writes it, as the OOM killer would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfie_lora.adapters.flux import tiny
from selfie_lora.services.owners import process_space

HOUR = 60 * 60
# How ``tiny_pipeline_dir`` names a build's temporary folder:
# ``.tiny-flux-v1.tmp-<pid>-<process space>-<random>``.
PREFIX = f".{tiny.TINY_CACHE_NAME}.tmp-"
# The tree this test imports, for the process it starts (not an installed copy of another tree).
SRC = str(Path(tiny.__file__).resolve().parents[3])


def _killed_build(cache_dir: Path) -> Path:
    """The folder a build leaves when SIGKILLed while it saves: ``tiny_pipeline_dir`` run in a
    process (its name, its lock) whose fake build writes a file and is killed, as the OOM killer
    would kill it in ``save_pretrained``; reaped, so its pid is no process any more."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from selfie_lora.adapters.flux import tiny

        class Dying:
            def save_pretrained(self, path):
                (Path(path) / "vae").mkdir(parents=True, exist_ok=True)
                (Path(path) / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
                    b"half" * 4096)
                print(path, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        tiny.build_tiny_pipeline = Dying
        tiny.tiny_pipeline_dir(Path({str(cache_dir)!r}))
    """)
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == -9, done.stderr
    folder = Path(done.stdout.strip())
    assert folder.is_dir()
    assert folder.parent == cache_dir
    assert folder.name.startswith(PREFIX)
    return folder


def _dead_pid() -> int:
    """A pid no process has now (a reaped child's)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout)


def _live_leftover(cache_dir: Path, *, pid: int) -> Path:
    folder = cache_dir / f"{PREFIX}{pid}-{process_space()}-12345678"  # this space's
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    return folder


def _age(folder: Path, seconds: float) -> None:
    when = time.time() - seconds
    for parent, _dirs, files in os.walk(folder):
        for path in (Path(parent), *(Path(parent) / name for name in files)):
            os.utime(path, (when, when))


def _built(cache_dir: Path) -> Path:
    """The tiny model as a complete cache holds it (for the load path: nothing to build)."""
    target = cache_dir / tiny.TINY_CACHE_NAME
    target.mkdir(parents=True)
    (target / "model_index.json").write_text("{}")
    return target


class _FakeBuild:
    """Saves what a pipeline's ``save_pretrained`` saves first; ``during`` runs while it saves."""

    def __init__(self, during: object = None) -> None:
        self.during = during
        self.saved_to: Path | None = None

    def save_pretrained(self, path: str) -> None:
        self.saved_to = Path(path)
        self.saved_to.mkdir(parents=True, exist_ok=True)  # as diffusers does: exist_ok
        (self.saved_to / "model_index.json").write_text("{}")
        if callable(self.during):
            self.during(self.saved_to)


def test_a_killed_builds_folder_is_removed_at_the_next_load(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    left = _killed_build(cache_dir)
    target = _built(cache_dir)

    assert tiny.tiny_pipeline_dir(cache_dir) == target
    assert not left.exists()
    assert sorted(p.name for p in cache_dir.iterdir()) == [tiny.TINY_CACHE_NAME]


def test_a_killed_builds_folder_is_removed_at_the_next_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    left = _killed_build(cache_dir)
    monkeypatch.setattr(tiny, "build_tiny_pipeline", _FakeBuild)

    target = tiny.tiny_pipeline_dir(cache_dir)
    assert (target / "model_index.json").is_file()
    assert not left.exists()
    assert sorted(p.name for p in cache_dir.iterdir()) == [tiny.TINY_CACHE_NAME]


def test_a_folder_whose_pid_runs_is_kept_until_an_hour_passed(tmp_path: Path) -> None:
    """This process's pid (or one taken again since the build died): kept while young; once
    nothing in it changed for an hour, no build of seconds can be writing it."""
    cache_dir = tmp_path / "cache"
    _built(cache_dir)
    mine = _live_leftover(cache_dir, pid=os.getpid())

    tiny.tiny_pipeline_dir(cache_dir)
    assert mine.is_dir()
    _age(mine, HOUR - 60)
    assert tiny.sweep_dead_builds(cache_dir) == 0
    assert mine.is_dir()

    _age(mine, HOUR + 60)
    tiny.tiny_pipeline_dir(cache_dir)
    assert not mine.exists()


def test_a_live_build_keeps_its_folder_through_any_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build in progress holds its folder locked: another process sweeping meanwhile, its clock
    two hours ahead (so that the age says stale and only the lock can keep the folder), leaves
    it, and the build renames it into place whole."""
    cache_dir = tmp_path / "cache"
    swept: list[str] = []

    def sweep_from_another_process(folder: Path) -> None:
        code = ("import sys; from pathlib import Path; from selfie_lora.adapters.flux import tiny;"
                f"print(tiny.sweep_dead_builds(Path({str(cache_dir)!r}), now={time.time() + 2 * HOUR}))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=False, env={**os.environ, "PYTHONPATH": SRC})
        assert done.returncode == 0, done.stderr
        swept.append(done.stdout.strip())
        assert folder.is_dir()

    build = _FakeBuild(during=sweep_from_another_process)
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda: build)

    target = tiny.tiny_pipeline_dir(cache_dir)
    assert swept == ["0"]
    assert build.saved_to is not None
    assert build.saved_to.name.startswith(PREFIX)
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in cache_dir.iterdir()) == [tiny.TINY_CACHE_NAME]


def test_what_is_not_a_builds_folder_is_left_alone(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _built(cache_dir)
    others = [cache_dir / f"{PREFIX}notapid-1", cache_dir / "models--x--y",
              cache_dir / f"{PREFIX}0-1"]
    for folder in others:
        folder.mkdir()
        _age(folder, 2 * HOUR)
    link = cache_dir / f"{PREFIX}999999999-1"
    link.symlink_to(others[1])

    assert tiny.sweep_dead_builds(cache_dir) == 0
    assert all(folder.is_dir() for folder in others)
    assert link.is_symlink()


def test_a_missing_cache_folder_sweeps_nothing(tmp_path: Path) -> None:
    assert tiny.sweep_dead_builds(tmp_path / "none") == 0


@pytest.mark.parametrize("locks", ["work", "fail"])
def test_a_build_of_another_machine_or_container_is_kept_until_an_hour_quiet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: str) -> None:
    """A cache shared with another machine (NFS mounted nolock or local_lock=flock: flock there
    locks only on each machine) or another container (another pid namespace): the pid in a
    folder's name is the builder's there, and a process of that pid here says nothing of it;
    the folder of a build running there was removed here mid-save (found in review:
    read-report3). Named for another process space, it goes only once nothing in it changed for
    an hour; "fail": a file system whose flock answers an error (EBADF), where only the name and
    the age can decide."""
    import errno
    import fcntl

    cache_dir = tmp_path / "cache"
    _built(cache_dir)
    theirs = cache_dir / f"{PREFIX}{_dead_pid()}-0fa5e1ce-12345678"  # another space's build
    (theirs / "vae").mkdir(parents=True)
    (theirs / "model_index.json").write_text("{}")
    if locks == "fail":
        def no_locks(_fd: int, _operation: int) -> None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

        monkeypatch.setattr(fcntl, "flock", no_locks)

    assert tiny.sweep_dead_builds(cache_dir) == 0  # old code: 1, removed mid-build
    assert (theirs / "model_index.json").is_file()
    _age(theirs, HOUR - 60)
    assert tiny.sweep_dead_builds(cache_dir) == 0
    assert theirs.is_dir()

    _age(theirs, 2 * HOUR)
    assert tiny.sweep_dead_builds(cache_dir) == 1
    assert not theirs.exists()


@pytest.mark.parametrize("name", ["{pid}-12345678", "{pid}-unknown-12345678"])
def test_an_older_builds_folder_is_judged_by_its_age_as_before(tmp_path: Path, name: str) -> None:
    """The names earlier releases gave a build's folder, ``<pid>-<random>`` (before the process
    space) and ``<pid>-unknown-<random>`` (the space unknown), still read as a build's (their
    scratch mark without a space): a dead pid of this machine is not trusted in them, so such a
    folder is kept while young and removed once quiet for an hour, as before."""
    cache_dir = tmp_path / "cache"
    _built(cache_dir)
    older = cache_dir / (PREFIX + name.format(pid=_dead_pid()))
    (older / "vae").mkdir(parents=True)

    assert tiny.sweep_dead_builds(cache_dir) == 0
    assert older.is_dir()
    _age(older, 2 * HOUR)
    assert tiny.sweep_dead_builds(cache_dir) == 1
    assert not older.exists()


def test_a_build_that_cannot_tell_its_space_names_its_folder_as_older_builds_did(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a process space (not Linux) the folder is ``<pid>-<random>``: the same mark as a
    backup's scratch, which another process never judges by its pid."""
    from selfie_lora.services import owners

    monkeypatch.setattr(owners, "process_space", lambda: "")
    build = _FakeBuild()
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda: build)
    tiny.tiny_pipeline_dir(tmp_path / "cache")
    assert build.saved_to is not None
    pid, random = build.saved_to.name.removeprefix(PREFIX).split("-")
    assert pid == str(os.getpid())
    assert len(random) == 8


def test_a_name_with_a_digit_int_cannot_read_is_left_alone_not_an_error(tmp_path: Path) -> None:
    """"²" is a digit to str.isdigit but not to int(): a folder named so under the build prefix
    (planted, or a foreign tool's) made every load of the tiny model fail with ValueError."""
    cache_dir = tmp_path / "cache"
    target = _built(cache_dir)
    odd = cache_dir / f"{PREFIX}²-12345678"
    odd.mkdir()
    _age(odd, 2 * HOUR)

    assert tiny.tiny_pipeline_dir(cache_dir) == target
    assert odd.is_dir()
