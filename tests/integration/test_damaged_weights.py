"""A version whose weights file is in the storage but damaged (cut short, garbled, not the file
the version stored): a 409 ``weights_damaged`` naming the version and what to do, as for a
missing file, not a 500 "please retry" that no retry mends."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfie_lora.errors import WeightsDamagedError
from selfie_lora.testing.fakes import FakeGenerator
from selfie_lora.wiring import Services
from tests.conftest import make_settings, serving
from tests.integration.test_web import PASSWORD, csrf, sign_in
from tests.support.owners import own_model
from tests.support.s3 import S3Server


def test_a_cut_short_weights_file_is_a_409_naming_the_version_until_it_is_restored(
        client: TestClient, services: Services, fake_generator: FakeGenerator,
        caplog: pytest.LogCaptureFixture) -> None:
    services.users.create(name="ann", password=PASSWORD)
    owner = own_model(client, services, "ann")
    user = services.users.get_by_name(name="ann")
    [version] = services.models.versions(user=user)
    stored = services.blobs.get(version.weights_key)
    ok = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
    assert ok.status_code == 200, ok.text  # its copy is known sound now, and checked again
    services.blobs.put(version.weights_key, stored[: len(stored) // 2])  # cut short
    for _ in range(2):
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert r.status_code == 409, r.text  # old code: 200, the fake reads any bytes
        error = r.json()["error"]
        assert error["code"] == "weights_damaged"
        assert "version 1's weights file is damaged" in error["message"]
        assert "activate another version" in error["message"]
    assert any(version.weights_key in rec.getMessage() and version.weights_sha256
               in rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)
    sign_in(client, "ann")
    page = client.post("/generate", data={"csrf_token": csrf(client, "/generate"),
                                          "prompt": "p"})
    assert page.status_code == 409
    assert "version 1&#39;s weights file is damaged" in page.text
    services.blobs.put(version.weights_key, stored)  # restored: generates again
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
    assert r.status_code == 200, r.text


def test_weights_the_generator_cannot_read_are_a_409_naming_the_version(
        client: TestClient, services: Services, fake_generator: FakeGenerator) -> None:
    # The file hashes as stored (damaged before it was stored), but the generator cannot read
    # it: the version's fault too, said with its number.
    owner = own_model(client, services, "ann")
    fake_generator.fail_with = WeightsDamagedError(
        "the LoRA weights file /x.safetensors cannot be read: SafetensorError: header")
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
    assert r.status_code == 409, r.text  # old code: a SafetensorError, 500 internal_error
    error = r.json()["error"]
    assert error["code"] == "weights_damaged"
    assert error["message"].startswith("version 1's weights file is damaged")
    assert "/x.safetensors" not in error["message"]


def test_on_object_storage_a_damaged_copy_is_fetched_again_and_a_restored_object_heals(
        s3_server: S3Server, tmp_path: Path) -> None:
    """On S3 storage the generator reads this machine's cached copy, fetched once. A copy that
    fails its hash was kept, so after the operator restored the object every generation on this
    host was still a 409, and a copy garbled on this disk over a sound object was reported as
    damaged in the storage for ever. A damaged copy is now dropped and fetched once more."""
    settings = make_settings(tmp_path, **s3_server.settings(s3_server.new_location()))
    with serving(settings, run_worker=True) as (client, services):
        owner = own_model(client, services, "ann")
        user = services.users.get_by_name(name="ann")
        [version] = services.models.versions(user=user)
        key = version.weights_key
        stored = services.blobs.get(key)
        ok = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert ok.status_code == 200, ok.text
        with services.blobs.local_copy(key) as path:
            copy = Path(path)  # this machine's cached copy

        # The object cut short in the bucket, and this machine's copy fetched from it.
        services.blobs.put(key, stored[: len(stored) // 2])
        copy.write_bytes(stored[: len(stored) // 2])
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert r.status_code == 409, r.text  # the fresh copy is wrong too
        assert r.json()["error"]["code"] == "weights_damaged"
        services.blobs.put(key, stored)  # the operator restores it
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert r.status_code == 200, r.text  # old code: 409, the cut copy served for ever
        assert copy.read_bytes() == stored

        # Garbled on this disk only: the object is sound, so it generates.
        copy.write_bytes(b"x" * len(stored))
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": "p"})
        assert r.status_code == 200, r.text  # old code: 409 "damaged in the storage"
        assert copy.read_bytes() == stored
