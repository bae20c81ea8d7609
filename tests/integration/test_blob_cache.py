"""The bounded folder of copies of remote blobs (``adapters.storage.cache``) and the object
storage's ``local_copy`` on it."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pytest

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.storage import cache as cache_module
from selfie_lora.adapters.storage.cache import TMP_PREFIX, BlobCache
from selfie_lora.domain.entities import Model, Version
from selfie_lora.errors import StorageError, StorageFullError
from selfie_lora.services.generation import GenerationService
from selfie_lora.services.ports import BlobStream, GenerationJob
from tests.support.backends import database_url, fresh_engine
from tests.support.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]


class Remote:
    """What the copies are fetched from: bytes by key, and a count of fetches."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.fetches: list[str] = []

    def fetch(self, key: str) -> Callable[[BinaryIO], None]:
        def write(fh: BinaryIO) -> None:
            self.fetches.append(key)
            fh.write(self.blobs[key])
        return write


def fetched(cache: BlobCache, remote: Remote, key: str) -> Path:
    """The copy of ``key``, held only while it is handed out (as a caller that is done with it
    at once)."""
    with cache.copy(key, remote.fetch(key)) as path:
        return path


def age(path: Path, seconds: float) -> None:
    """Marks ``path`` as last used ``seconds`` ago."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def copies(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def test_a_copy_is_fetched_once_and_each_use_marks_it_used(tmp_path: Path) -> None:
    remote = Remote({"weights/a.safetensors": b"a" * 10})
    cache = BlobCache(tmp_path, max_bytes=1000)
    path = fetched(cache, remote, "weights/a.safetensors")
    assert path.read_bytes() == b"a" * 10
    age(path, 3600)
    assert fetched(cache, remote, "weights/a.safetensors") == path
    assert remote.fetches == ["weights/a.safetensors"]
    assert time.time() - path.stat().st_mtime < 60  # used now, not an hour ago


def test_the_least_recently_used_copies_go_first_until_the_folder_is_within_its_bound(
        tmp_path: Path) -> None:
    remote = Remote({f"weights/{n}": n.encode() * 100 for n in "abcde"})
    cache = BlobCache(tmp_path, max_bytes=350, in_use=60)
    # Used last: b (fetched second) before c before a.
    for name, used_ago in (("a", 200), ("b", 400), ("c", 300)):
        age(fetched(cache, remote, f"weights/{name}"), used_ago)
    assert copies(tmp_path) == {"weights/a", "weights/b", "weights/c"}  # 300 bytes: all stay

    fetched(cache, remote, "weights/d")  # 400 bytes: b, the least recent, goes
    assert copies(tmp_path) == {"weights/a", "weights/c", "weights/d"}
    fetched(cache, remote, "weights/e")  # then c
    assert copies(tmp_path) == {"weights/a", "weights/d", "weights/e"}
    # What went is fetched again when asked for.
    assert fetched(cache, remote, "weights/b").read_bytes() == b"b" * 100
    assert remote.fetches == ["weights/a", "weights/b", "weights/c", "weights/d", "weights/e",
                              "weights/b"]


def test_copies_used_recently_are_kept_even_over_the_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    remote = Remote({f"weights/{n}": n.encode() * 100 for n in "abc"})
    cache = BlobCache(tmp_path, max_bytes=150, in_use=600)
    age(fetched(cache, remote, "weights/a"), 3600)
    age(fetched(cache, remote, "weights/b"), 10)  # another process may open it
    with caplog.at_level(logging.WARNING, logger="selfie_lora.adapters.storage.cache"):
        fetched(cache, remote, "weights/c")
    assert copies(tmp_path) == {"weights/b", "weights/c"}
    assert "more than its bound" in caplog.text


def test_the_copy_just_fetched_stays_even_when_it_alone_is_over_the_bound(
        tmp_path: Path) -> None:
    remote = Remote({"weights/small": b"s" * 10, "weights/big": b"b" * 500})
    cache = BlobCache(tmp_path, max_bytes=100, in_use=0)
    age(fetched(cache, remote, "weights/small"), 60)
    assert fetched(cache, remote, "weights/big").read_bytes() == b"b" * 500
    assert copies(tmp_path) == {"weights/big"}


def test_a_failed_fetch_leaves_no_copy_and_no_temporary_file(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=1000)

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half")
        raise StorageError("object storage could not read 'weights/a'")

    with pytest.raises(StorageError), cache.copy("weights/a", broken):
        pass
    assert not any(p.is_file() for p in (tmp_path / "weights").iterdir())


def test_a_disk_too_full_for_the_copy_is_a_storage_error(tmp_path: Path) -> None:
    # A generation's weights copied to a full disk raised a raw OSError (an internal error).
    from tests.integration.test_blob_store_contract import files_limited_to

    cache = BlobCache(tmp_path, max_bytes=10**6)
    remote = Remote({"weights/a": b"w" * 300_000})
    with files_limited_to(100_000), pytest.raises(StorageError, match="cannot hold 'weights/a'"), \
            cache.copy("weights/a", remote.fetch("weights/a")):
        pass
    assert not any(p.is_file() for p in (tmp_path / "weights").iterdir())


class SmallDisk(Remote):
    """A remote whose fetches write to a disk of ``capacity`` bytes that the cache's copies
    share: a fetch that does not fit fails as a full disk does (ENOSPC)."""

    def __init__(self, blobs: dict[str, bytes], *, root: Path, capacity: int,
                 code: int = errno.ENOSPC) -> None:
        super().__init__(blobs)
        self.root = root
        self.capacity = capacity
        self.code = code  # ENOSPC, or EDQUOT for a quota

    def fetch(self, key: str) -> Callable[[BinaryIO], None]:
        def write(fh: BinaryIO) -> None:
            self.fetches.append(key)
            used = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
            if used + len(self.blobs[key]) > self.capacity:
                raise OSError(self.code, os.strerror(self.code))
            fh.write(self.blobs[key])
        return write


def test_a_disk_full_before_the_bound_evicts_the_copies_nobody_holds_and_fetches_again(
        tmp_path: Path) -> None:
    # The review's 3 MiB disk under a 20 GB bound: two copies 3 days old stayed, and every
    # fetch of another version failed with 'No space left on device' until cleared by hand.
    disk = SmallDisk({f"weights/{n}": n.encode() * 100 for n in "abcd"}, root=tmp_path,
                     capacity=250)
    cache = BlobCache(tmp_path, max_bytes=10**9)
    age(fetched(cache, disk, "weights/a"), 3 * 86400)
    with cache.copy("weights/b", disk.fetch("weights/b")) as held:
        age(held, 3 * 86400)
        path = fetched(cache, disk, "weights/c")  # old code: StorageError, no space
        assert path.read_bytes() == b"c" * 100
        assert copies(tmp_path) == {"weights/b", "weights/c"}  # b is held: it stays
    assert disk.fetches == ["weights/a", "weights/b", "weights/c", "weights/c"]

    # Still no room with every copy nobody holds gone: the operator is told what to do.
    with cache.copy("weights/b", disk.fetch("weights/b")), \
            cache.copy("weights/c", disk.fetch("weights/c")), \
            pytest.raises(StorageFullError, match="lower SELFIE_LORA_BLOB_CACHE_GB or free disk"), \
            cache.copy("weights/d", disk.fetch("weights/d")):
        pass
    assert copies(tmp_path) == {"weights/b", "weights/c"}
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))  # copies() skips dot-files


def test_a_full_quota_evicts_as_a_full_disk_does_then_is_storage_full(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Old code: EDQUOT evicted nothing (the fetch failed with copies nobody held still there)
    # and was a plain StorageError, answered 500 "please retry in a moment". Then it said "the
    # disk holding ... is full (23.1 GB free)": statvfs does not see a quota, so the operator
    # found room with df and was not told to raise the quota.
    disk = SmallDisk({f"weights/{n}": n.encode() * 100 for n in "abc"}, root=tmp_path,
                     capacity=150, code=errno.EDQUOT)
    cache = BlobCache(tmp_path, max_bytes=10**9)
    age(fetched(cache, disk, "weights/a"), 3 * 86400)
    assert fetched(cache, disk, "weights/b").read_bytes() == b"b" * 100
    assert copies(tmp_path) == {"weights/b"}
    quota = f"the quota of this account on the disk holding {tmp_path} is used up (the disk "
    with caplog.at_level(logging.WARNING, logger="selfie_lora.adapters.storage.cache"), \
            cache.copy("weights/b", disk.fetch("weights/b")), \
            pytest.raises(StorageFullError, match=re.escape(quota)) as caught, \
            cache.copy("weights/c", disk.fetch("weights/c")):
        pass
    assert "Disk quota exceeded" in caught.value.message
    assert "is full" not in caught.value.message
    assert ("raise the quota or delete files it counts on this machine, or lower "
            "SELFIE_LORA_BLOB_CACHE_GB") in caught.value.message
    assert "the quota of this account is used up; 0 copies" in caplog.text
    assert "the disk is full" not in caplog.text
    # The held copy survives the failed retry, and its partial write is gone (copies() skips
    # dot-files, so the temporary prefix is looked for on its own).
    assert copies(tmp_path) == {"weights/b"}
    assert (tmp_path / "weights" / "b").read_bytes() == b"b" * 100
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))


def test_a_fetcher_killed_midway_leaves_a_temporary_file_that_goes_once_it_is_stale(
        tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from selfie_lora.adapters.storage.cache import BlobCache\n"
        "def fetch(fh):\n"
        "    fh.write(b'half of it'); fh.flush()\n"
        "    os._exit(9)  # killed in the middle of the download\n"
        "with BlobCache(Path(sys.argv[1]), max_bytes=1000).copy('weights/a', fetch):\n"
        "    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    died = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, timeout=60,
                          check=False)
    assert died.returncode == 9
    assert not (tmp_path / "weights" / "a").exists()
    [left] = list((tmp_path / "weights").glob(f"{TMP_PREFIX}*"))

    remote = Remote({"weights/a": b"the whole blob", "weights/b": b"x" * 2000})
    cache = BlobCache(tmp_path, max_bytes=1000, in_use=0)
    assert fetched(cache, remote, "weights/a").read_bytes() == b"the whole blob"
    assert left.exists()  # an hour's grace: it could be a live download of a large blob
    age(left, 2 * 3600)
    cache.evict()
    assert not left.exists()
    assert remote.fetches == ["weights/a"]


def test_a_hit_and_an_eviction_exclude_each_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evictor has found an old copy that nobody holds and is about to remove it when
    another thread asks for that copy: the hit waits for the eviction and fetches the copy anew,
    so the path it hands out opens. Without the lock, the hit would hand out the path just
    before the unlink, every time."""
    remote = Remote({"weights/mine": b"m" * 100, "weights/new": b"n" * 100})
    cache = BlobCache(tmp_path, max_bytes=150, in_use=300)
    age(fetched(cache, remote, "weights/mine"), 3600)
    handed_out = threading.Event()
    evicted = threading.Event()
    read: list[bytes | BaseException] = []

    def user() -> None:
        try:
            with cache.copy("weights/mine", remote.fetch("weights/mine")) as path:
                handed_out.set()
                evicted.wait(30)
                read.append(path.read_bytes())
        except BaseException as exc:
            read.append(exc)

    users: list[threading.Thread] = []
    held = cache_module._held

    def held_then_let_a_hit_in(path: Path) -> bool:
        # Between the evictor's last look at the copy and its unlink: the hit gets its chance.
        answer = held(path)
        if path.name == "mine" and not answer and not users:
            users.append(threading.Thread(target=user))
            users[0].start()
            handed_out.wait(1)  # long enough for a hit that nothing stops; this one waits
        return answer

    monkeypatch.setattr(cache_module, "_held", held_then_let_a_hit_in)
    try:
        fetched(cache, remote, "weights/new")  # the folder is over its bound: "mine" goes
    finally:
        evicted.set()
        for thread in users:
            thread.join(30)
    assert len(users) == 1  # the evictor did come to "mine"
    assert read == [b"m" * 100]
    assert remote.fetches == ["weights/mine", "weights/new", "weights/mine"]


def test_a_copy_held_is_never_evicted_however_long_ago_it_was_used(tmp_path: Path) -> None:
    remote = Remote({f"weights/{n}": n.encode() * 100 for n in ("mine", "other", "new")})
    cache = BlobCache(tmp_path, max_bytes=150, in_use=300)
    with cache.copy("weights/mine", remote.fetch("weights/mine")) as path:
        # Held longer than the in-use window (a generation queued behind long ones), while
        # another request's fetch puts the folder over its bound.
        age(path, 3600)
        fetched(cache, remote, "weights/other")
        assert path.read_bytes() == b"mine" * 100
    # Let go, it is the least recently used copy, and the next fetch removes it.
    fetched(cache, remote, "weights/new")
    assert copies(tmp_path) == {"weights/other", "weights/new"}


class QueuedGenerator:
    """A local generator whose turn comes only after ``meanwhile(weights_path)`` (the
    generations queued ahead of it), then loads the weights."""

    backend = "local"

    def __init__(self, meanwhile: Callable[[Path], None]) -> None:
        self.meanwhile = meanwhile
        self.loaded: list[bytes] = []

    def generate(self, job: GenerationJob) -> list[bytes]:
        assert job.weights_path is not None
        self.meanwhile(job.weights_path)
        self.loaded.append(job.weights_path.read_bytes())
        return [b"png"]


def test_weights_handed_to_a_generation_stay_until_it_has_loaded_them(
        s3_server: S3Server, tmp_path: Path) -> None:
    location = s3_server.new_location()
    s3_server.store(location, tmp_path / "writer").put("weights/v1.safetensors", b"1" * 1000)
    store = s3_server.store(location, tmp_path / "cache", cache_max_bytes=1500)
    # Another version's copy, just used by another process: an eviction cannot take it, so the
    # folder, over its bound, can only shrink by the copy of v1.
    other = tmp_path / "cache" / "weights" / "v2.safetensors"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"2" * 1000)

    def queued(weights: Path) -> None:
        age(weights, 3600)  # the queue ahead outlasted the in-use window
        BlobCache(tmp_path / "cache", max_bytes=1500).evict()  # another process's fetch

    generator = QueuedGenerator(queued)
    engine = fresh_engine(database_url("sqlite", tmp_path))
    try:
        upgrade(engine)
        service = GenerationService(repo=SqlRepository(engine), blobs=store,
                                    generators={"local": generator})
        now = datetime.now(UTC)
        model = Model(id="m1", user_id="u1", backend="local", trigger_word="TOK",
                      destination="", trainer_version="local-tiny-v1", lora_scale=1.0,
                      lora_scale_is_custom=False, active_version_id="v1", created_at=now)
        version = Version(id="v1", model_id="m1", number=1, training_id="t1",
                          trainer_version="local-tiny-v1", weights_key="weights/v1.safetensors",
                          weights_sha256="", weights_method="fake", remote_version=None,
                          version_mismatch=False, created_at=now)
        rendered = service.render(model=model, version=version, prompt="a portrait", seed=1)
    finally:
        engine.dispose()
    assert rendered.images == [b"png"]
    assert generator.loaded == [b"1" * 1000]


def test_a_download_cut_short_is_refused_and_leaves_no_copy(
        s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    location = s3_server.new_location()
    s3_server.store(location, tmp_path / "writer").put("weights/a.safetensors", b"a" * 1000)
    store = s3_server.store(location, tmp_path / "cache")
    real_open = store.open

    def cut_short(key: str) -> BlobStream:
        # The answer ends early without an error (a proxy, a reset taken for the end).
        stream = real_open(key)
        return BlobStream(size=stream.size, chunks=iter([b"".join(stream.chunks)[:600]]))

    monkeypatch.setattr(store, "open", cut_short)
    with pytest.raises(StorageError, match=r"sent 600 bytes of .*, which holds 1000"), \
            store.local_copy("weights/a.safetensors"):
        pass
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [".lock"]
    monkeypatch.undo()
    with store.local_copy("weights/a.safetensors") as path:
        assert path.read_bytes() == b"a" * 1000


def test_a_copy_in_use_when_its_blob_is_deleted_goes_once_released(
        s3_server: S3Server, tmp_path: Path) -> None:
    location = s3_server.new_location()
    store = s3_server.store(location, tmp_path / "cache")
    store.put("weights/a.safetensors", b"a" * 1000)
    with store.local_copy("weights/a.safetensors") as path:
        store.delete("weights/a.safetensors")
        # A generation loads it from its path: it stays while held.
        assert path.read_bytes() == b"a" * 1000
        assert store.forget_deleted_local_copies() == 0
    assert store.forget_deleted_local_copies() == 1
    assert copies(tmp_path / "cache") == set()


def test_a_copy_fetched_while_its_blob_is_deleted_goes_at_the_next_sweep(
        tmp_path: Path) -> None:
    # The fetch began before the deletion and lands after the deleter dropped the copy.
    cache = BlobCache(tmp_path, max_bytes=10**6)
    remote = Remote({"weights/b.safetensors": b"b"})
    stored = {"weights/a.safetensors", "weights/b.safetensors"}

    def fetch_across_the_deletion(fh: BinaryIO) -> None:
        fh.write(b"a")
        stored.discard("weights/a.safetensors")
        assert cache.drop("weights/a.safetensors") is False  # nothing there yet

    with cache.copy("weights/a.safetensors", fetch_across_the_deletion):
        pass
    fetched(cache, remote, "weights/b.safetensors")
    assert cache.drop_missing(stored.__contains__) == 1
    assert copies(tmp_path) == {"weights/b.safetensors"}


def test_a_cache_needs_a_positive_bound(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        BlobCache(tmp_path, max_bytes=0)


def test_object_storage_keeps_its_local_copies_within_the_bound(
        s3_server: S3Server, tmp_path: Path) -> None:
    location = s3_server.new_location()
    writer = s3_server.store(location, tmp_path / "writer")
    for name in "abc":
        writer.put(f"weights/{name}.safetensors", name.encode() * 1000)
    store = s3_server.store(location, tmp_path / "cache", cache_max_bytes=2500)
    store._cache.in_use = 0  # no other process here: every copy but the newest may go
    with store.local_copy("weights/a.safetensors") as first:
        assert first.read_bytes() == b"a" * 1000
    age(first, 60)
    with store.local_copy("weights/b.safetensors"):
        pass
    with store.local_copy("weights/c.safetensors") as third:
        age(third, 0)
    assert copies(tmp_path / "cache") == {"weights/b.safetensors", "weights/c.safetensors"}
    with pytest.raises(StorageError, match="missing"), \
            store.local_copy("weights/none.safetensors"):
        pass
    assert copies(tmp_path / "cache") == {"weights/b.safetensors", "weights/c.safetensors"}


def test_the_bound_is_a_setting(s3_server: S3Server, tmp_path: Path) -> None:
    from selfie_lora.wiring import default_blob_store
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, **s3_server.settings(s3_server.new_location()),
                             blob_cache_gb=0.5)
    store = default_blob_store(settings)
    assert store._cache.max_bytes == 500_000_000  # type: ignore[attr-defined]
    assert store._cache.root == settings.home / "blob-cache"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="greater than 0"):
        make_settings(tmp_path, blob_cache_gb=0)
