"""The blob store on every adapter: the local file system and S3-compatible object storage (an
S3 server on loopback). One contract: atomic writes, put-if-absent for content-addressed keys,
streamed reads, listings for the garbage collector, cached local copies, presigned URLs."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfie_lora.adapters.storage import s3 as s3_module
from selfie_lora.adapters.storage.cache import STALE_FETCH_SECONDS
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.errors import BlobMissingError, BlobStoreUnreachableError, StorageError
from selfie_lora.services.layout import is_valid_key
from tests.support.s3 import S3Server

KINDS = ["fs", "s3"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "fs":
        return FileSystemBlobStore(tmp_path / "blobs")
    server: S3Server = request.getfixturevalue("s3_server")
    return server.store(server.new_location(), tmp_path / "cache")


def test_a_blob_reads_back_as_written(store: Any) -> None:
    assert store.put("photos/a.jpg", b"hello") is True
    assert store.exists("photos/a.jpg")
    assert store.get("photos/a.jpg") == b"hello"
    assert store.put("photos/a.jpg", b"again") is True  # a plain put replaces
    assert store.get("photos/a.jpg") == b"again"


def test_a_missing_blob_is_a_blob_missing_error(store: Any) -> None:
    # Not only a StorageError: a worker steps away from an unreachable store, not from a photo
    # that is gone.
    assert not store.exists("photos/none.jpg")
    with pytest.raises(BlobMissingError, match="missing"):
        store.get("photos/none.jpg")
    with pytest.raises(BlobMissingError, match="missing"):
        store.open("photos/none.jpg")  # at once, not when the answer is half sent
    with pytest.raises(BlobMissingError, match="missing"), \
            store.local_copy("weights/none.safetensors"):
        pass


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "a//b", "", "a b", "a/./b/..",
                                 "photos/./a.jpg", "samples/.", ".", "photos/.tmp-a.jpg"])
def test_keys_that_could_escape_are_refused(store: Any, key: str) -> None:
    with pytest.raises(StorageError, match="invalid blob key"):
        store.put(key, b"x")


def test_put_if_absent_never_rewrites(store: Any) -> None:
    assert store.put("weights/w.safetensors", b"first", if_absent=True) is True
    assert store.put("weights/w.safetensors", b"second", if_absent=True) is False
    assert store.get("weights/w.safetensors") == b"first"


def test_of_racing_put_if_absent_writers_exactly_one_wins(store: Any) -> None:
    results: dict[int, bool] = {}
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        results[i] = store.put("photos/race.jpg", f"writer {i}".encode(), if_absent=True)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, wrote in results.items() if wrote]
    assert len(winners) == 1
    assert store.get("photos/race.jpg") == f"writer {winners[0]}".encode()


def test_a_large_file_streams_in_and_out(store: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Small parts, so a few MB take the multipart path on object storage.
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 1024 * 1024)
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part
    data = os.urandom(11 * 1024 * 1024 + 17)
    source = tmp_path / "big.safetensors"
    source.write_bytes(data)
    assert store.put_file("weights/big.safetensors", source, if_absent=True) is True
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"y" * (2 * 1024 * 1024))
    assert store.put_file("weights/big.safetensors", other, if_absent=True) is False
    stream = store.open("weights/big.safetensors")
    assert stream.size == len(data)
    chunks = list(stream.chunks)
    assert len(chunks) > 1  # streamed, not one buffer
    assert b"".join(chunks) == data


def date_back(store: Any, key: str, request: pytest.FixtureRequest, days: int = 30) -> datetime:
    """Makes a stored blob ``days`` old (a store's clock cannot be set; the test's can)."""
    when = datetime.now(UTC) - timedelta(days=days)
    if isinstance(store, FileSystemBlobStore):
        os.utime(store.root / key, (when.timestamp(), when.timestamp()))
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        server.set_modified(f"s3://{store.location.bucket}/{store.location.prefix}", key, when)
    return when


def test_modified_says_when_a_blob_was_written(store: Any,
                                               request: pytest.FixtureRequest) -> None:
    assert store.modified("photos/none.jpg") is None
    before = datetime.now(UTC) - timedelta(minutes=1)
    store.put("photos/a.jpg", b"a")
    modified = store.modified("photos/a.jpg")
    assert modified is not None
    assert modified.tzinfo is not None
    assert before <= modified <= datetime.now(UTC) + timedelta(minutes=1)
    old = date_back(store, "photos/a.jpg", request)
    assert abs(store.modified("photos/a.jpg") - old) < timedelta(seconds=2)
    assert {b.key: b.modified for b in store.list("photos")} == {
        "photos/a.jpg": store.modified("photos/a.jpg")}


@pytest.mark.parametrize("how", ["put", "put_file", "large put_file"])
def test_put_if_absent_makes_a_blob_it_finds_fresh_and_keeps_its_bytes(
        store: Any, how: str, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The garbage collector spares young blobs: a writer about to refer to a blob it found
    # stored needs it spared as if just written.
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 1024 * 1024)
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part
    data = os.urandom(6 * 1024 * 1024 + 5) if how == "large put_file" else b"first"
    key = "weights/w.safetensors"
    assert store.put(key, data) is True
    date_back(store, key, request)
    before = datetime.now(UTC) - timedelta(minutes=1)
    if how == "put":
        assert store.put(key, b"second", if_absent=True) is False
    else:
        source = tmp_path / "other"
        source.write_bytes(b"y" * len(data))
        assert store.put_file(key, source, if_absent=True) is False
    assert store.get(key) == data
    modified = store.modified(key)
    assert modified is not None
    assert modified >= before


def test_listing_finds_every_blob_under_a_prefix_and_nothing_else(store: Any) -> None:
    store.put("generations/g1/0.png", b"0")
    store.put("generations/g1/1.png", b"11")
    store.put("generations/g2/0.png", b"222")
    store.put("generationsx/0.png", b"not under generations/")
    store.put("photos/p.jpg", b"p")
    found = {b.key: b.size for b in store.list("generations")}
    assert found == {"generations/g1/0.png": 1, "generations/g1/1.png": 2,
                     "generations/g2/0.png": 3}
    assert {b.key for b in store.list("generations/g1")} == {"generations/g1/0.png",
                                                             "generations/g1/1.png"}
    assert list(store.list("nothing")) == []
    assert all(b.modified.tzinfo is not None for b in store.list("generations"))


def test_object_storage_lists_past_keys_obstore_cannot_name(s3_server: S3Server,
                                                            tmp_path: Path) -> None:
    """A key with an empty segment ("photos//x.jpg", which another tool can put) made obstore
    refuse the whole listing, so every garbage collection failed. The listing now names such a
    key (one no store takes: the collector keeps it and says so) and goes on past it."""
    location = s3_server.new_location()
    store = s3_server.store(location, tmp_path / "cache")
    for key in ("generations/abc//0.png", "generations/a\x01/0.png", "photos//x.jpg"):
        s3_server.put_raw(location, key)
    for key in ("generations/abc/0", "generations/abc/1.png", "generations/zz/0.png",
                "photos/0", "photos/p.jpg"):
        store.put(key, b"ok")
    listed = {b.key for b in store.list("generations")}
    assert {"generations/abc//0.png", "generations/a\x01/0.png"} <= listed
    assert {"generations/abc/0", "generations/abc/1.png", "generations/zz/0.png"} <= listed
    assert {b.key for b in store.list("photos")} == {"photos//x.jpg", "photos/0", "photos/p.jpg"}
    assert not any(is_valid_key(k) for k in listed - {"generations/abc/0",
                                                        "generations/abc/1.png",
                                                        "generations/zz/0.png"})


@pytest.mark.parametrize(("key", "resume"), [
    ("photos//x.jpg", "photos/0"),  # nothing but "photos//..." lies between the two
    ("generations/abc//0.png", "generations/abc/0"),
    ("photos/a//", "photos/a/0"),
    ("photos/../x", "photos/..0"),
    ("photos/a\x01b/c", "photos/a "),
    ("photos/a\x7f", "photos/a\x80"),
    ("photos/fine.jpg", None),
])
def test_a_listing_resumes_just_past_the_keys_sharing_a_bad_part(key: str,
                                                                  resume: str | None) -> None:
    assert s3_module._resume_after(key) == resume


def test_delete_removes_and_tolerates_a_missing_blob(store: Any) -> None:
    store.put("generations/g/0.png", b"x")
    store.delete("generations/g/0.png")
    assert not store.exists("generations/g/0.png")
    assert list(store.list("generations")) == []
    store.delete("generations/g/0.png")  # again: nothing to do, no error


@pytest.mark.parametrize("key", ["generations/g", "generations/g/0.png/more"])
def test_a_key_above_or_below_a_blob_is_no_blob(store: Any, key: str) -> None:
    # On the file system "generations/g" is a folder and "generations/g/0.png/more" lies under a
    # file; object storage has no folders. Both are a missing blob, on either store (the file
    # system answered IsADirectoryError and a folder's date).
    store.put("generations/g/0.png", b"g")
    assert not store.exists(key)
    assert store.modified(key) is None
    with pytest.raises(StorageError, match="missing"):
        store.get(key)
    with pytest.raises(StorageError, match="missing"):
        store.open(key)
    with pytest.raises(StorageError, match="missing"), store.local_copy(key):
        pass
    store.delete(key)  # a missing blob: nothing to do
    assert store.get("generations/g/0.png") == b"g"
    # The layout never makes such a key, so a write either stores it (object storage) or is
    # refused as a StorageError (the file system cannot), never another error.
    for if_absent in (False, True):
        with suppress(StorageError):
            store.put(key, b"x", if_absent=if_absent)
    assert store.get("generations/g/0.png") == b"g"


def test_leftovers_of_killed_writes_go_once_an_hour_old(store: Any, tmp_path: Path) -> None:
    store.put("checkpoints/t1/step-00000001.ckpt", b"stored")
    if not isinstance(store, FileSystemBlobStore):
        # Object storage leaves incomplete multipart uploads to the bucket's lifecycle rule.
        assert store.remove_leftovers() == 0
        return
    # What a write killed midway leaves (the temporary file a killed put_file was filling).
    dead = store.root / "checkpoints" / "t2" / ".tmp-dead"
    live = store.root / "checkpoints" / "t1" / ".tmp-live"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    old = time.time() - STALE_FETCH_SECONDS - 60
    os.utime(dead, (old, old))
    assert store.remove_leftovers() == 1
    assert not dead.parent.exists()  # its folder held nothing else
    assert live.exists()  # a write that is still going on
    assert store.get("checkpoints/t1/step-00000001.ckpt") == b"stored"


def test_a_local_copy_holds_the_bytes(store: Any) -> None:
    store.put("weights/w.safetensors", b"weights")
    with store.local_copy("weights/w.safetensors") as path:
        assert path.read_bytes() == b"weights"
    with store.local_copy("weights/w.safetensors") as again:
        assert again == path  # fetched once


def machines(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """One store as two machines see it: the same blobs, each machine its own cached copies."""
    if kind == "fs":
        return FileSystemBlobStore(tmp_path / "blobs"), FileSystemBlobStore(tmp_path / "blobs")
    server: S3Server = request.getfixturevalue("s3_server")
    location = server.new_location()
    return server.store(location, tmp_path / "here"), server.store(location, tmp_path / "there")


def test_a_deleted_blob_leaves_no_copy_on_any_machine(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # A user's erasure deletes their weights "in storage": a cached copy, on the machine that
    # deletes or on any other, is a copy all the same.
    here, there = machines(kind, tmp_path, request)
    here.put("weights/w.safetensors", b"weights")
    here.put("weights/kept.safetensors", b"kept")
    with here.local_copy("weights/w.safetensors") as mine, \
            there.local_copy("weights/w.safetensors") as theirs, \
            there.local_copy("weights/kept.safetensors") as kept:
        assert mine.read_bytes() == theirs.read_bytes() == b"weights"
    here.delete("weights/w.safetensors")
    assert not mine.exists()  # the deleting machine's own, at once
    assert here.forget_deleted_local_copies() == 0
    # Every other machine's at its next collection; a blob still stored keeps its copy.
    assert there.forget_deleted_local_copies() == (1 if kind == "s3" else 0)
    assert not theirs.exists()
    assert kept.read_bytes() == b"kept"
    assert there.forget_deleted_local_copies() == 0
    with pytest.raises(BlobMissingError, match="missing"), \
            there.local_copy("weights/w.safetensors"):
        pass


@pytest.mark.parametrize("filename", [None, "lora-v2.safetensors"])
def test_download_urls_serve_the_blob_where_the_store_has_them(
        store: Any, kind: str, filename: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """With a ``filename``, the storage's answer names the file the browser saves: a presigned
    download was saved under the object's name (``<sha256>.safetensors``), the API's 307's
    Content-Disposition lost on the way (a browser names a file by the answer it saves)."""
    from datetime import timedelta

    store.put("weights/w.safetensors", b"signed bytes")
    url = store.download_url("weights/w.safetensors", expires=timedelta(minutes=5),
                             filename=filename)
    if kind == "fs":
        assert url is None  # the service streams files itself
        return
    assert url is not None
    assert "X-Amz-Signature=" in url
    # Signed again, with the name, only once the URL's own signature came out the same with the
    # secret: the query canonicalised as obstore's signer does it.
    assert ("response-content-disposition=" in url) == (filename is not None)
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200
    assert answer.content == b"signed bytes"
    assert answer.headers.get("content-disposition") == (
        None if filename is None else f'attachment; filename="{filename}"')  # old code: none
    assert "presigned downloads" not in caplog.text


def test_a_download_url_is_signed_again_only_with_the_secret_it_was_signed_with(
        s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The secret read from the environment, as obstore reads it, names the file too; a secret
    that did not make the URL's signature (the credentials an instance role's) leaves the URL
    as obstore signed it, its file unnamed, and says so once, never a URL the storage refuses."""
    from selfie_lora.adapters.storage.s3 import S3BlobStore
    from tests.support.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    store = S3BlobStore(url=s3_server.new_location(), cache_dir=tmp_path / "cache",
                        endpoint=s3_server.endpoint, region=REGION, access_key_id=ACCESS_KEY_ID)
    store.put("weights/w.safetensors", b"bytes")
    url = store.download_url("weights/w.safetensors", expires=timedelta(minutes=5),
                             filename="lora-v1.safetensors")
    assert url is not None
    assert httpx.get(url, timeout=10).headers.get("content-disposition") == (
        'attachment; filename="lora-v1.safetensors"')
    plain = store.download_url("weights/w.safetensors", expires=timedelta(minutes=5))
    assert plain is not None
    extra = {"response-content-disposition": "attachment"}
    assert isinstance(s3_module._signed_with(plain, extra, secret=SECRET_ACCESS_KEY), str)
    for other in ("another-secret", None, ""):
        assert isinstance(s3_module._signed_with(plain, extra, secret=other), s3_module._Unsigned)
    # The keys obstore signs with are not the ones this process knows (an instance role's,
    # which obstore fetches and keeps to itself): as if the environment's were another's.
    store._signing_secret = "not-the-one"
    for _ in range(2):
        url = store.download_url("weights/w.safetensors", expires=timedelta(minutes=5),
                                 filename="lora-v1.safetensors")
        assert url is not None
        assert "response-content-disposition" not in url
    assert caplog.text.count("presigned downloads are saved under the stored object") == 1


def _botocore_signer() -> Callable[..., str]:
    """What X-Amz-Signature botocore's presigner (S3SigV4QueryAuth) gives a URL's request: its
    own canonical query, host and path rules, not this code's. botocore comes with moto, the
    tests' storage (a dev dependency only; the service itself never imports it): skipped
    where it is not installed."""
    auth = pytest.importorskip("botocore.auth")
    awsrequest = pytest.importorskip("botocore.awsrequest")
    credentials = pytest.importorskip("botocore.credentials")

    def signature(url: str, *, access_key_id: str, secret: str, token: str | None) -> str:
        parts = urlsplit(url)
        params = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)
                  if name != "X-Amz-Signature"]
        fields = dict(params)
        _key_id, _day, region, service, _end = fields["X-Amz-Credential"].rsplit("/", 4)
        signer = auth.S3SigV4QueryAuth(
            credentials.Credentials(access_key_id, secret, token), service, region)
        request = awsrequest.AWSRequest(method="GET", url=urlunsplit(parts._replace(query="")),
                                        params=params)
        request.context["timestamp"] = fields["X-Amz-Date"]
        return str(signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request))

    return signature


@pytest.mark.parametrize("filename", ["lora-v2.safetensors", 'we"ird name;é.safetensors'])
@pytest.mark.parametrize("style", ["path", "virtual-hosted", "session-token"])
def test_a_named_download_url_is_signed_as_botocore_signs_it(
        request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        style: str, filename: str) -> None:
    """moto takes any signature: the name's parameter signed wrongly would still be served
    here, and refused (403) by AWS, MinIO or R2. botocore, the reference signer, must come to
    the same signature. Path-style on the tests' server (an IP, a port) is fetched too;
    virtual-hosted (bucket.s3.us-east-1.amazonaws.com) and a session token are signed only."""
    from selfie_lora.adapters.storage.s3 import S3BlobStore
    from selfie_lora.domain.disposition import content_disposition
    from tests.support.s3 import ACCESS_KEY_ID, BUCKET, REGION, SECRET_ACCESS_KEY

    botocore_signature = _botocore_signer()
    token = None
    server: S3Server | None = None
    location = f"s3://{BUCKET}/pre fix+x%25é~"
    if style == "path":
        server = request.getfixturevalue("s3_server")
        location = f"{server.new_location()}/pre fix+x%25é~"
    elif style == "virtual-hosted":
        monkeypatch.setenv("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true")
    else:
        token = "IQoJb3Jp+Z2luX2VjE/abc==x y%"
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    store = S3BlobStore(url=location, cache_dir=tmp_path / "cache",
                        endpoint=server.endpoint if server else None, region=REGION,
                        access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY)
    if server is not None:
        store.put("weights/w.safetensors", b"signed bytes")
    url = store.download_url("weights/w.safetensors", expires=timedelta(minutes=5),
                             filename=filename)
    assert url is not None
    assert "response-content-disposition=" in url
    assert ("X-Amz-Security-Token=" in url) == (token is not None)
    signed = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    assert signed == botocore_signature(url, access_key_id=ACCESS_KEY_ID,
                                        secret=SECRET_ACCESS_KEY, token=token)
    if server is not None:
        answer = httpx.get(url, timeout=10)
        assert answer.content == b"signed bytes"
        assert answer.headers["content-disposition"] == content_disposition(filename)


@contextmanager
def files_limited_to(size: int) -> Iterator[None]:
    """This process cannot write a file past ``size`` bytes (``write`` fails with EFBIG, as on a
    full disk: an OSError midway through a write), without root or a small file system."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("how", ["put", "put_file", "put if absent"])
def test_a_file_system_that_refuses_a_write_is_a_storage_error(tmp_path: Path, how: str) -> None:
    # The services catch StorageError (a sample lost to a full disk costs a picture, not the
    # training); an OSError escaping the store failed the whole job as an internal error.
    store = FileSystemBlobStore(tmp_path / "blobs")
    store.put("photos/a.jpg", b"before")
    source = tmp_path / "big.jpg"
    source.write_bytes(os.urandom(300_000))
    data = source.read_bytes()
    writes: dict[str, Callable[[], object]] = {
        "put": lambda: store.put("photos/a.jpg", data),
        "put_file": lambda: store.put_file("photos/a.jpg", source),
        "put if absent": lambda: store.put("photos/b.jpg", data, if_absent=True),
    }
    with files_limited_to(100_000), pytest.raises(StorageError, match="cannot be written"):
        writes[how]()
    assert store.get("photos/a.jpg") == b"before"  # the old blob, whole
    # No new blob, no temporary file left behind.
    assert sorted(p.name for p in (tmp_path / "blobs" / "photos").iterdir()) == ["a.jpg"]


@pytest.mark.parametrize("if_absent", [False, True])
def test_a_file_system_blob_reaches_the_disk_before_its_name_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, if_absent: bool
) -> None:
    """After a power cut a blob is whole or absent: its bytes are synced while it has no name
    yet, then its folder, which holds the name. (Weights are written only if absent: an empty
    file left under their name would never be written again.)"""
    store = FileSystemBlobStore(tmp_path / "blobs")
    target = tmp_path / "blobs" / "weights" / "w.safetensors"
    synced: list[tuple[bool, bool]] = []  # (a folder?, the name there yet?) at each fsync
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    (tmp_path / "blobs" / "weights").mkdir()
    store.put("weights/w.safetensors", b"lora", if_absent=if_absent)
    assert synced == [(False, False), (True, True)]


# Old code: only the blob's own folder was synced, so the name of a folder the write made
# (generations/<id>/) could be lost in a power cut while the row committed after it survived.
@pytest.mark.parametrize("if_absent", [False, True])
def test_a_file_system_blob_in_new_folders_has_each_folder_s_name_synced_up_to_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, if_absent: bool
) -> None:
    root = tmp_path / "blobs"
    store = FileSystemBlobStore(root)
    store.put("generations/other/0.png", b"png")  # generations/ exists from now on
    synced: list[Path] = []  # the folders synced, in order
    real_fsync = os.fsync
    folders = {p.stat().st_ino: p for p in (root, root / "generations")}

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            for path in (root / "generations" / "g", root / "samples" / "t", root / "samples"):
                if path.exists():
                    folders.setdefault(path.stat().st_ino, path)
            synced.append(folders[os.fstat(fd).st_ino])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store.put("generations/g/0.png", b"png", if_absent=if_absent)  # a new folder in an old one
    assert synced == [root / "generations" / "g", root / "generations"]
    synced.clear()
    store.put("generations/g/1.png", b"png", if_absent=if_absent)  # the folder is there now
    assert synced == [root / "generations" / "g"]
    synced.clear()
    store.put("samples/t/10.jpg", b"jpg", if_absent=if_absent)  # two new folders
    assert synced == [root / "samples" / "t", root / "samples", root]


def test_a_store_that_answers_passes_its_check(store: Any) -> None:
    store.check()


def test_object_storage_without_its_bucket_fails_its_check(s3_server: S3Server,
                                                           tmp_path: Path) -> None:
    missing = s3_server.store("s3://no-such-bucket-here/x", tmp_path)
    with pytest.raises(StorageError, match="has no bucket 'no-such-bucket-here'"):
        missing.check()
    with pytest.raises(StorageError, match="has no bucket 'no-such-bucket-here'"):
        missing.put("photos/a.jpg", b"a")
    # A read answers 404 as for a missing blob: still the settings' fault, said as such.
    for read in (missing.get, missing.open):
        with pytest.raises(StorageError, match="has no bucket 'no-such-bucket-here'") as caught:
            read("photos/a.jpg")
        assert not isinstance(caught.value, BlobMissingError)
    # A HEAD's 404 says nothing of the bucket: checked once with a LIST (old code: False, and
    # activating a version answered 409 weights_missing for weights that were fine).
    with pytest.raises(StorageError, match="has no bucket 'no-such-bucket-here'"):
        missing.exists("weights/a.safetensors")
    with pytest.raises(StorageError, match="has no bucket 'no-such-bucket-here'"):
        missing.modified("weights/a.safetensors")


def test_object_storage_with_its_bucket_says_a_missing_blob_is_missing(
        s3_server: S3Server, tmp_path: Path) -> None:
    present = s3_server.store(s3_server.new_location(), tmp_path)
    assert not present.exists("weights/a.safetensors")
    assert present.modified("weights/a.safetensors") is None
    present.put("weights/a.safetensors", b"w")
    assert present.exists("weights/a.safetensors")


def test_object_storage_out_of_reach_is_no_missing_blob(tmp_path: Path) -> None:
    from selfie_lora.adapters.storage.s3 import S3BlobStore

    # Port 9 (discard): nothing listens there.
    away = S3BlobStore(url="s3://bucket/x", cache_dir=tmp_path, endpoint="http://127.0.0.1:9",
                       region="us-east-1", access_key_id="a", secret_access_key="b")
    with pytest.raises(StorageError, match="could not read") as caught:
        away.get("photos/a.jpg")
    assert not isinstance(caught.value, BlobMissingError)
    # An outage, which a training waits out without spending its attempts (old code: a plain
    # StorageError, counted like a refused key).
    assert isinstance(caught.value, BlobStoreUnreachableError)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096),
       key=st.from_regex(r"[a-z0-9_.-]{1,12}(/[a-z0-9_-]{1,8}){0,3}", fullmatch=True)
       .filter(lambda k: all(part not in {".", ".."} for part in k.split("/"))))
def test_any_bytes_under_any_valid_key_read_back(store: Any, data: bytes, key: str) -> None:
    # A prefix per example: on a file system "a/b" and "a/b/c" cannot both be blobs (the layout
    # never makes such pairs), so the examples must not meet.
    full = f"h/{uuid.uuid4().hex}/{key}"
    store.put(full, data)
    assert store.get(full) == data
    assert b"".join(store.open(full).chunks) == data


UPLOADER = """
import re, sys
from pathlib import Path
from selfie_lora.adapters.storage.s3 import S3BlobStore

def kib(field):
    # /proc, not getrusage: ru_maxrss survives exec, so a child would report pytest's own peak.
    status = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\\s+(\\d+) kB", status).group(1))

store = S3BlobStore(url=sys.argv[1], cache_dir=Path(sys.argv[2]), endpoint=sys.argv[3],
                    region="us-east-1", access_key_id="testing", secret_access_key="testing-secret")
store.put("photos/warm-up.jpg", b"x")  # the client's own memory, before the measure
before = kib("VmRSS")
store.put_file("weights/huge.safetensors", Path(sys.argv[4]))
print((kib("VmHWM") - before) // 1024)
"""


def test_a_large_upload_to_object_storage_is_never_whole_in_memory(
        s3_server: S3Server, tmp_path: Path) -> None:
    size_mb = 128
    source = tmp_path / "huge.safetensors"
    with source.open("wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(1024 * 1024))
    location = s3_server.new_location()
    run = subprocess.run(
        [sys.executable, "-c", UPLOADER, location, str(tmp_path / "c"), s3_server.endpoint,
         str(source)], capture_output=True, text=True, timeout=300, check=True)
    grew_mb = int(run.stdout.strip().splitlines()[-1])
    # Parts in flight (4 x 8 MB) and buffers, far below the file's size.
    assert grew_mb < size_mb / 2, f"the upload process grew by {grew_mb} MB"
    stored = s3_server.store(location, tmp_path / "c2").open("weights/huge.safetensors")
    assert stored.size == size_mb * 1024 * 1024


@contextmanager
def s3_answering(status: int, code: str) -> Iterator[str]:
    """An endpoint that answers every request with one S3 error, as AWS words it (an XML
    declaration, a newline, then the <Error>)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>It said &quot;{code}&quot;\nat length.</Message>"
            "<RequestId>r1</RequestId></Error>").encode()

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            if length := int(self.headers.get("content-length") or 0):
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("content-type", "application/xml")
            self.send_header("content-length", "0" if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = answer  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("status", "code", "hint"), [
    (403, "InvalidAccessKeyId", "check AWS_ACCESS_KEY_ID"),
    (403, "SignatureDoesNotMatch", "check AWS_SECRET_ACCESS_KEY"),
    (403, "AccessDenied", "the keys may not do this"),
    (403, "RequestTimeTooSkewed", "this machine's clock is off"),
    (503, "SlowDown", "throttled"),
])
def test_an_object_storage_error_keeps_s3_s_code_and_message_in_one_line(
        tmp_path: Path, status: int, code: str, hint: str) -> None:
    from selfie_lora.adapters.storage.s3 import S3BlobStore

    with s3_answering(status, code) as endpoint:
        store = S3BlobStore(url="s3://selfie-test/p", cache_dir=tmp_path, endpoint=endpoint,
                            region="us-east-1", access_key_id="a", secret_access_key="b",
                            retry_timeout=1, max_retries=1)
        calls: list[Callable[[], object]] = [
            store.check, lambda: store.get("photos/a.jpg"), lambda: store.put("photos/a.jpg", b"x"),
            lambda: list(store.list("photos")), lambda: store.delete("photos/a.jpg")]
        for call in calls:
            with pytest.raises(StorageError) as caught:
                call()
            said = str(caught.value)
            assert "\n" not in said
            # Old code: '... 403 Forbidden: <?xml version="1.0" encoding="UTF-8"?>', no code.
            assert f"{status} {code}: It said \"{code}\" at length. ({hint}" in said, said
            assert "<?xml" not in said
            # A 5xx is the storage away (waited out), a 403 a setting to fix (not waited for).
            assert isinstance(caught.value, BlobStoreUnreachableError) == (status >= 500), said


def test_a_missing_bucket_is_named_by_every_call(s3_server: S3Server, tmp_path: Path) -> None:
    missing = s3_server.store("s3://no-such-bucket-here/x", tmp_path)
    calls: list[Callable[[], object]] = [
        missing.check, lambda: missing.put("photos/a.jpg", b"a"),
        lambda: missing.put("photos/a.jpg", b"a", if_absent=True),
        lambda: list(missing.list("photos")), lambda: missing.delete("photos/a.jpg")]
    big = tmp_path / "big.bin"
    big.write_bytes(b"w" * (s3_module.MULTIPART_THRESHOLD + 1))
    calls.append(lambda: missing.put_file("weights/w.safetensors", big))
    calls.append(lambda: missing.put_file("weights/w.safetensors", big, if_absent=True))
    for call in calls:
        # Old code: put 'could not write ...: FileNotFoundError: Object at location ... not
        # found', list/check '404 Not Found: <?xml ...?>', delete nothing at all.
        # And what to do: make the bucket, or fix the setting (old code: only "check
        # SELFIE_LORA_STORAGE_URL", though the setting may be right and the bucket not made).
        with pytest.raises(StorageError, match=r"has no bucket 'no-such-bucket-here': create it, "
                                               r"or set SELFIE_LORA_STORAGE_URL to the bucket "
                                               r"meant$"):
            call()


@pytest.mark.parametrize(("start", "end"), [
    (0, 1), (10, None), (-100, 0), (1, 0), (1024 * 1024 - 1, 1024 * 1024 + 1), (0, None)])
def test_a_range_reads_back_those_bytes_and_says_the_whole_size(
        store: Any, tmp_path: Path, start: int, end: int | None) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "w.safetensors"
    source.write_bytes(data)
    store.put_file("weights/w.safetensors", source)
    # Negative numbers count from the end (0: the end itself).
    first = start if start >= 0 else len(data) + start
    last = None if end is None else (end if end > 0 else len(data) + end)
    # Old code: open() took no range.
    stream = store.open("weights/w.safetensors", start=first, end=last)
    assert stream.size == len(data)  # the whole blob's: a Content-Range needs it
    assert b"".join(stream.chunks) == data[first:last]


def test_a_range_of_an_object_pulls_only_that_range_from_the_bucket(
        s3_server: S3Server, tmp_path: Path) -> None:
    from tests.support.counting_proxy import counting_proxy

    location = s3_server.new_location()
    data = os.urandom(16 * 1024 * 1024)
    source = tmp_path / "w.safetensors"
    source.write_bytes(data)
    s3_server.store(location, tmp_path / "writer").put_file("weights/w.safetensors", source)
    with counting_proxy(s3_server.endpoint) as proxy:
        from selfie_lora.adapters.storage.s3 import S3BlobStore

        store = S3BlobStore(url=location, cache_dir=tmp_path / "reader",
                            endpoint=proxy.endpoint, region="us-east-1",
                            access_key_id="testing", secret_access_key="testing-secret")
        stream = store.open("weights/w.safetensors", start=len(data) - 100, end=len(data))
        assert b"".join(stream.chunks) == data[-100:]
        # Old code: every byte before the range came from the bucket (16 MiB).
        assert proxy.received < 64 * 1024, proxy.received
