"""A version whose weights file is in the storage but damaged (cut short, garbled, not the file
the version stored): a 409 ``weights_damaged`` naming the version and what to do, as for a
missing file, not a 500 "please retry" that no retry mends."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from selfie_lora.errors import WeightsDamagedError
from selfie_lora.testing.fakes import FakeGenerator
from selfie_lora.wiring import Services
from tests.integration.test_web import PASSWORD, csrf, sign_in
from tests.support.owners import own_model


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
