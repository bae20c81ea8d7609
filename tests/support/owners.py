"""A second user with a model of their own, for the tests of the owner-only checks.

A user with no model is refused ("you have no model yet") before any version or training is
looked up, so a test that asks for another user's object as such a user passes whatever that
lookup does. A user with a model of their own (and a version, a training) gets past that first
refusal: only a lookup scoped to the user's own model answers 404 then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient

from selfie_lora.wiring import Services
from tests.conftest import wait_terminal
from tests.support.photos import photo_zip


@dataclass(frozen=True)
class Owner:
    """What ``own_model`` made, as the API answered it."""

    headers: dict[str, str]
    model: dict[str, Any]
    training: dict[str, Any] | None  # None: uploaded with nothing started
    version: dict[str, Any] | None  # the active version once trained, else None


def own_model(client: TestClient, services: Services, name: str, *,
              photos: bytes | None = None, versions: int = 1) -> Owner:
    """``name``'s own model, made through the API (the user too, if there is none yet; a user
    made with a password on the pages gets an API key). ``photos``: the zip to upload (default:
    four drawings, for the fake face analyzer). ``versions``: how many trainings are run to
    their end (each one a version), which needs an app whose worker runs; with 0 the upload
    only makes the model, with no training."""
    user = services.repo.get_user_by_name(name)
    if user is None:
        _user, secret = services.users.create(name=name)
    else:
        _key, secret = services.users.create_key(user=user, name="owner-tests")
    headers = {"Authorization": f"Bearer {secret}"}
    r = client.post("/api/training/upload-zip", headers=headers,
                    files={"file": ("photos.zip", photos or photo_zip(4), "application/zip")},
                    data={"start": "true" if versions else "false"})
    assert r.status_code == 202, r.text
    done = r.json()
    for n in range(versions):
        if n:
            r = client.post("/api/training/start", headers=headers, json={})
            assert r.status_code == 202, r.text
        done = wait_terminal(client, headers, r.json()["training"]["id"])
        assert done["training"]["status"] == "succeeded", done["training"]
    return Owner(headers=headers, model=done["model"], training=done["training"],
                 version=done["model"]["active_version"])
