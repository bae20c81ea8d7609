"""The bounded folder of copies of remote blobs (``adapters.storage.cache``) and the object
storage's ``local_path`` on it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from selfie_lora.adapters.storage.cache import TMP_PREFIX, BlobCache
from selfie_lora.errors import StorageError
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
    path = cache.path("weights/a.safetensors", remote.fetch("weights/a.safetensors"))
    assert path.read_bytes() == b"a" * 10
    age(path, 3600)
    assert cache.path("weights/a.safetensors", remote.fetch("weights/a.safetensors")) == path
    assert remote.fetches == ["weights/a.safetensors"]
    assert time.time() - path.stat().st_mtime < 60  # used now, not an hour ago


def test_the_least_recently_used_copies_go_first_until_the_folder_is_within_its_bound(
        tmp_path: Path) -> None:
    remote = Remote({f"weights/{n}": n.encode() * 100 for n in "abcde"})
    cache = BlobCache(tmp_path, max_bytes=350, in_use=60)
    # Used last: b (fetched second) before c before a.
    for name, used_ago in (("a", 200), ("b", 400), ("c", 300)):
        age(cache.path(f"weights/{name}", remote.fetch(f"weights/{name}")), used_ago)
    assert copies(tmp_path) == {"weights/a", "weights/b", "weights/c"}  # 300 bytes: all stay

    cache.path("weights/d", remote.fetch("weights/d"))  # 400 bytes: b, the least recent, goes
    assert copies(tmp_path) == {"weights/a", "weights/c", "weights/d"}
    cache.path("weights/e", remote.fetch("weights/e"))  # then c
    assert copies(tmp_path) == {"weights/a", "weights/d", "weights/e"}
    # What went is fetched again when asked for.
    assert cache.path("weights/b", remote.fetch("weights/b")).read_bytes() == b"b" * 100
    assert remote.fetches == ["weights/a", "weights/b", "weights/c", "weights/d", "weights/e",
                              "weights/b"]


def test_copies_used_recently_are_kept_even_over_the_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    remote = Remote({f"weights/{n}": n.encode() * 100 for n in "abc"})
    cache = BlobCache(tmp_path, max_bytes=150, in_use=600)
    age(cache.path("weights/a", remote.fetch("weights/a")), 3600)
    age(cache.path("weights/b", remote.fetch("weights/b")), 10)  # another process may open it
    with caplog.at_level(logging.WARNING, logger="selfie_lora.adapters.storage.cache"):
        cache.path("weights/c", remote.fetch("weights/c"))
    assert copies(tmp_path) == {"weights/b", "weights/c"}
    assert "more than its bound" in caplog.text


def test_the_copy_just_fetched_stays_even_when_it_alone_is_over_the_bound(
        tmp_path: Path) -> None:
    remote = Remote({"weights/small": b"s" * 10, "weights/big": b"b" * 500})
    cache = BlobCache(tmp_path, max_bytes=100, in_use=0)
    age(cache.path("weights/small", remote.fetch("weights/small")), 60)
    assert cache.path("weights/big", remote.fetch("weights/big")).read_bytes() == b"b" * 500
    assert copies(tmp_path) == {"weights/big"}


def test_a_failed_fetch_leaves_no_copy_and_no_temporary_file(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=1000)

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half")
        raise StorageError("object storage could not read 'weights/a'")

    with pytest.raises(StorageError):
        cache.path("weights/a", broken)
    assert not any(p.is_file() for p in (tmp_path / "weights").iterdir())


def test_a_fetcher_killed_midway_leaves_a_temporary_file_that_goes_once_it_is_stale(
        tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from selfie_lora.adapters.storage.cache import BlobCache\n"
        "def fetch(fh):\n"
        "    fh.write(b'half of it'); fh.flush()\n"
        "    os._exit(9)  # killed in the middle of the download\n"
        "BlobCache(Path(sys.argv[1]), max_bytes=1000).path('weights/a', fetch)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    died = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, timeout=60,
                          check=False)
    assert died.returncode == 9
    assert not (tmp_path / "weights" / "a").exists()
    [left] = list((tmp_path / "weights").glob(f"{TMP_PREFIX}*"))

    remote = Remote({"weights/a": b"the whole blob", "weights/b": b"x" * 2000})
    cache = BlobCache(tmp_path, max_bytes=1000, in_use=0)
    assert cache.path("weights/a", remote.fetch("weights/a")).read_bytes() == b"the whole blob"
    assert left.exists()  # an hour's grace: it could be a live download of a large blob
    age(left, 2 * 3600)
    cache.evict()
    assert not left.exists()
    assert remote.fetches == ["weights/a"]


def test_a_path_handed_out_is_never_evicted_before_it_is_opened(tmp_path: Path) -> None:
    """One thread keeps asking for an old copy and opening it, another keeps fetching new
    blobs into a folder too small for both: every path handed out opens."""
    remote = Remote({"weights/mine": b"m" * 100,
                     **{f"weights/new{i}": b"n" * 100 for i in range(200)}})
    cache = BlobCache(tmp_path, max_bytes=150, in_use=300)
    failures: list[BaseException] = []
    done = threading.Event()

    def user() -> None:
        try:
            while not done.is_set():
                path = cache.path("weights/mine", remote.fetch("weights/mine"))
                assert path.read_bytes() == b"m" * 100
                age(path, 3600)  # as if last used long ago: the evictor may take it now
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=user)
    thread.start()
    try:
        for i in range(200):
            path = cache.path(f"weights/new{i}", remote.fetch(f"weights/new{i}"))
            age(path, 3600)
    finally:
        done.set()
        thread.join(30)
    assert failures == []
    assert remote.fetches.count("weights/mine") > 1  # it was evicted, and fetched again


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
    first = store.local_path("weights/a.safetensors")
    assert first.read_bytes() == b"a" * 1000
    age(first, 60)
    store.local_path("weights/b.safetensors")
    age(store.local_path("weights/c.safetensors"), 0)
    assert copies(tmp_path / "cache") == {"weights/b.safetensors", "weights/c.safetensors"}
    with pytest.raises(StorageError, match="missing"):
        store.local_path("weights/none.safetensors")
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
