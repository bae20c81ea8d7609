"""An S3 server on loopback for the object-storage tests: moto's server mode, in this process
(MinIO is not installable here). Servers and workers that tests start reach it over HTTP like
any S3 endpoint."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

BUCKET = "selfie-test"
# moto accepts any keys; real ones are never needed.
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def new_location(self) -> str:
        """A fresh ``s3://`` URL (its own prefix in the test bucket)."""
        return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"

    def env(self, url: str) -> dict[str, str]:
        """The environment a process needs to use ``url`` (the usual AWS variables)."""
        return {"SELFIE_LORA_STORAGE_URL": url, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}

    def settings(self, url: str) -> dict[str, Any]:
        """The same as ``Settings`` keyword arguments."""
        return {"storage_url": url, "storage_endpoint": self.endpoint, "storage_region": REGION,
                "storage_access_key_id": ACCESS_KEY_ID,
                "storage_secret_access_key": SECRET_ACCESS_KEY}

    def store(self, url: str, cache_dir: Path, **options: Any) -> Any:
        from selfie_lora.adapters.storage.s3 import S3BlobStore

        return S3BlobStore(url=url, cache_dir=cache_dir, endpoint=self.endpoint, region=REGION,
                           access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY,
                           **options)

    def put_raw(self, url: str, key: str, data: bytes = b"") -> None:
        """An object put as another tool would, by a plain HTTP PUT (moto answers any
        signature): under a key our stores refuse to write (``photos//x.jpg``)."""
        import httpx

        prefix = urlsplit(url).path.strip("/")
        path = quote(f"{prefix}/{key}" if prefix else key, safe="/")
        httpx.put(f"{self.endpoint}/{BUCKET}/{path}", content=data,
                  timeout=10).raise_for_status()

    def set_modified(self, url: str, key: str, when: datetime) -> None:
        """Dates a stored blob (S3 has no way to; moto runs in this process, so its record of
        the object is changed): for tests of what depends on a blob's age."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        prefix = urlsplit(url).path.strip("/")
        bucket = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[BUCKET]
        bucket.keys[f"{prefix}/{key}" if prefix else key].last_modified = (
            when.astimezone(UTC).replace(tzinfo=None))  # moto keeps naive UTC


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    # One line per request otherwise: the test output would drown in them.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import httpx

        # moto answers any signature: creating the bucket needs no SigV4 of our own.
        httpx.put(f"{endpoint}/{BUCKET}", timeout=10).raise_for_status()
        yield S3Server(endpoint=endpoint)
    finally:
        server.stop()
