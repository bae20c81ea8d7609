"""An S3 endpoint that accepts connections and never answers (a dead proxy, a security group
dropping packets): with obstore's defaults each storage call held its thread for about 180 s (10
retries within 3 minutes), and a server's start waited that out twice (the command's bind, then
the app's). The timeouts and the retries now come from the settings, and a failed bind is
decided once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.adapters.storage.s3 import S3BlobStore
from selfie_lora.errors import StorageError
from selfie_lora.services.layout import DEPLOYMENT_KEY
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import build_services, default_blob_store
from tests.conftest import make_settings, one_person_analyzer


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """An endpoint that takes every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    taken: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                taken.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in taken:
            conn.close()
        server.close()


def test_the_storage_settings_reach_the_store(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, storage_url="s3://bucket/prefix",
                             storage_endpoint="http://127.0.0.1:9", storage_connect_timeout=2,
                             storage_timeout=7, storage_retry_timeout=4, storage_max_retries=1)
    store = default_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    options = store._store.client_options or {}
    assert options.get("connect_timeout") == "2s"
    assert options.get("timeout") == "7s"
    retry = store._store.retry_config or {}
    assert retry.get("retry_timeout") == timedelta(seconds=4)
    assert retry.get("max_retries") == 1  # old code: no retry config (obstore's 10, 3 minutes)


def test_a_hung_endpoint_fails_a_call_within_the_configured_time(
        tmp_path: Path, hung_endpoint: str) -> None:
    settings = make_settings(tmp_path, storage_url="s3://bucket/prefix",
                             storage_endpoint=hung_endpoint, storage_access_key_id="k",
                             storage_secret_access_key="s", storage_region="us-east-1",
                             storage_timeout=1, storage_retry_timeout=0, storage_max_retries=0)
    store = default_blob_store(settings)
    started = time.monotonic()
    with pytest.raises(StorageError):
        store.check()  # what /readyz asks
    assert time.monotonic() - started < 10  # old code: about 180 s


class UnreachableStore(FileSystemBlobStore):
    """Blobs on disk, but the deployment marker cannot be read: the storage is away."""

    reads = 0

    def get(self, key: str) -> bytes:
        if key == DEPLOYMENT_KEY:
            self.reads += 1
            raise StorageError(f"blob {key!r} cannot be read: the storage is unreachable")
        return super().get(key)


def test_a_bind_that_met_an_unreachable_storage_is_not_tried_again(tmp_path: Path) -> None:
    # 'selfie-lora serve' binds before it builds the app, and the app's startup binds again:
    # on a hung endpoint each waited the storage's full timeouts (365 s before it listened).
    settings = make_settings(tmp_path)
    blobs = UnreachableStore(settings.blob_dir)
    svc = build_services(settings, trainers={"local": FakeTrainer()}, blobs=blobs,
                         face_analyzer=one_person_analyzer(), generators={"local": FakeGenerator()})
    try:
        assert svc.operations.bind_deployment() is None
        assert svc.operations.bind_deployment() is None
    finally:
        svc.close()
    assert blobs.reads == 1  # old code: 2


@pytest.mark.parametrize(("retry_timeout", "max_retries"), [(2, 10), (30, 2)],
                         ids=["retry-timeout-bounds", "max-retries-bounds"])
def test_a_hung_endpoint_fails_a_call_within_the_bound_readme_states(
        tmp_path: Path, hung_endpoint: str, retry_timeout: int, max_retries: int) -> None:
    """README: at most about the smaller of RETRY_TIMEOUT + TIMEOUT and (MAX_RETRIES + 1) x
    TIMEOUT, plus the short waits between tries. It said 'about SELFIE_LORA_STORAGE_TIMEOUT',
    which holds only when the retry time is shorter than one try (the defaults, 15 s and 30 s);
    with TIMEOUT lowered under it a call took up to 4 x TIMEOUT (adapters review: 12.5 s for 3)."""
    timeout = 1
    store = S3BlobStore(url="s3://bucket/prefix", cache_dir=tmp_path, endpoint=hung_endpoint,
                        region="us-east-1", access_key_id="k", secret_access_key="s",
                        timeout=timeout, retry_timeout=retry_timeout, max_retries=max_retries)
    bound = min(retry_timeout + timeout, (max_retries + 1) * timeout)
    started = time.monotonic()
    with pytest.raises(StorageError):
        store.exists("photos/a.jpg")
    took = time.monotonic() - started
    assert took > 1.5 * timeout  # more than one TIMEOUT: the retries run
    assert took < bound + 1.5, took  # the waits between tries: 0.1 s, doubling
