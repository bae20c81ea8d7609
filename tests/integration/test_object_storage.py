"""The service on S3-compatible object storage (an S3 server on loopback): every blob goes there,
the process's HOME keeps only caches, and downloads are streamed or presigned."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from selfie_lora.config import Settings
from selfie_lora.wiring import Services
from tests.conftest import auth, make_settings, serving, wait_terminal
from tests.integration.test_api import upload
from tests.support.s3 import S3Server


@pytest.fixture(params=[False, True], ids=["streamed", "presigned"])
def on_s3(request: pytest.FixtureRequest, s3_server: S3Server,
          tmp_path: Path) -> Iterator[tuple[TestClient, Services, S3Server, str]]:
    location = s3_server.new_location()
    settings = make_settings(tmp_path, **s3_server.settings(location),
                             download_urls=request.param)
    with serving(settings, run_worker=True) as (client, svc):
        yield client, svc, s3_server, location


def test_the_whole_cycle_keeps_every_blob_in_object_storage(
        on_s3: tuple[TestClient, Services, S3Server, str], tmp_path: Path) -> None:
    client, svc, server, location = on_s3
    h = auth(svc, "ann")
    body = upload(client, h)
    done = wait_terminal(client, h, body["training"]["id"])
    assert done["training"]["status"] == "succeeded"
    version = done["model"]["active_version"]

    answer = client.get(version["weights_url"], headers=h, follow_redirects=False)
    if svc.settings.download_urls:
        assert answer.status_code == 307
        url = answer.headers["location"]
        assert "X-Amz-Signature=" in url
        served = httpx.get(url, timeout=10)  # the storage serves it, without a key
        data = served.content
        # Saved under the version's name, as the 307 says, not the object's (<sha256>...).
        assert served.headers.get("content-disposition") == (
            answer.headers["content-disposition"]), url
    else:
        assert answer.status_code == 200
        assert int(answer.headers["content-length"]) == len(answer.content)
        data = answer.content
    assert answer.headers["x-weights-sha256"] == version["weights_sha256"]
    assert hashlib.sha256(data).hexdigest() == version["weights_sha256"]

    generated = client.post("/api/generate", headers=h, json={"prompt": "a portrait",
                                                              "seed": 1})
    assert generated.status_code == 200, generated.text
    assert client.get(generated.json()["generation"]["images"][0],
                      headers=h).content.startswith(b"\x89PNG")

    # Everything is in the bucket; HOME has no blob folder, only the generator's cached copy.
    store = server.store(location, tmp_path / "reader")
    prefixes = {info.key.split("/")[0] for top in ("photos", "datasets", "weights",
                                                   "generations") for info in store.list(top)}
    assert prefixes == {"photos", "datasets", "weights", "generations"}
    assert not (svc.settings.home / "blobs").exists()
    cached = list((svc.settings.home / "blob-cache").rglob("*.safetensors"))
    assert [p.name for p in cached] == [f"{version['weights_sha256']}.safetensors"]


def test_a_retried_store_of_a_published_version_writes_nothing(
        on_s3: tuple[TestClient, Services, S3Server, str], tmp_path: Path) -> None:
    client, svc, _server, _location = on_s3
    h = auth(svc, "bob")
    done = wait_terminal(client, h, upload(client, h)["training"]["id"])
    key = f"weights/{done['model']['active_version']['weights_sha256']}.safetensors"
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the published bytes")
    assert svc.blobs.put_file(key, other, if_absent=True) is False
    assert hashlib.sha256(svc.blobs.get(key)).hexdigest() == \
        done["model"]["active_version"]["weights_sha256"]


def test_a_storage_url_that_is_not_s3_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        Settings(home=tmp_path, storage_url="gs://bucket/x")


def test_the_usual_aws_variables_configure_the_storage(
        s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora.wiring import default_blob_store

    location = s3_server.new_location()
    for name, value in s3_server.env(location).items():
        monkeypatch.setenv(name, value)
    settings = Settings(home=tmp_path)
    assert settings.storage_endpoint == s3_server.endpoint
    store = default_blob_store(settings)
    store.put("photos/p.jpg", b"p")
    assert s3_server.store(location, tmp_path / "other").get("photos/p.jpg") == b"p"


def test_a_download_of_weights_gone_from_the_bucket_is_refused_not_redirected(
        on_s3: tuple[TestClient, Services, S3Server, str]) -> None:
    """The active version's weights are gone from the bucket (lost, an older backup restored):
    the streamed download answered 409 weights_missing, the presigned one a 307 to a URL that
    then answered 404 (a URL is signed whether the object exists or not). Both answer the 409."""
    client, svc, _server, _location = on_s3
    h = auth(svc, "cy")
    done = wait_terminal(client, h, upload(client, h)["training"]["id"])
    version = done["model"]["active_version"]
    svc.blobs.delete(svc.repo.get_version(version["id"]).weights_key)
    answer = client.get(version["weights_url"], headers=h, follow_redirects=False)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "weights_missing"
    assert answer.json()["error"]["message"].startswith(
        f"version {version['number']}'s weights are missing from the storage, so they cannot "
        "be downloaded")


def test_a_resumed_download_pulls_only_its_range_from_the_bucket(
        s3_server: S3Server, tmp_path: Path) -> None:
    """curl -C - near the end of a large LoRA: the route read the whole object from the bucket
    and dropped all but the end (adapters review: 64 MiB pulled for the last 100 bytes)."""
    from tests.support.counting_proxy import counting_proxy

    location = s3_server.new_location()
    with counting_proxy(s3_server.endpoint) as proxy:
        settings = make_settings(tmp_path, **(s3_server.settings(location)
                                              | {"storage_endpoint": proxy.endpoint}))
        with serving(settings, run_worker=True) as (client, svc):
            h = auth(svc, "dee")
            done = wait_terminal(client, h, upload(client, h)["training"]["id"])
            version = done["model"]["active_version"]
            # A LoRA of a real size in its place (the route streams what the bucket holds).
            data = os.urandom(16 * 1024 * 1024)
            big = tmp_path / "big.safetensors"
            big.write_bytes(data)
            svc.blobs.put_file(svc.repo.get_version(version["id"]).weights_key, big)
            before = proxy.received
            answer = client.get(version["weights_url"], headers={**h, "Range": "bytes=-100"})
            pulled = proxy.received - before
    assert answer.status_code == 206
    assert answer.content == data[-100:]
    assert answer.headers["content-range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
    assert pulled < 64 * 1024, pulled  # old code: the whole 16 MiB
