"""The answer to a write of the model (``PATCH /api/model``, an activation) is the model as that
write left it, not as a request of the same user that committed right after it left it. The
service read the model again after its commit and the route a third time, so a client that set
the scale to 0.6 while another reset it was answered ``1.0``, not custom, and concluded its change
was lost. The tests run the other request's write right after the first one commits, before any
read back: the old code answered with the other's state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.domain.entities import User
from selfie_lora.services.models import ModelService
from selfie_lora.services.ports import Repository
from selfie_lora.wiring import Services, training_defaults
from tests.conftest import auth, wait_terminal
from tests.support.photos import photo_zip


class CompetingRepository:
    """A repository whose next ``atomic()`` transaction, once committed, is followed at once by
    ``meanwhile`` (set with ``after_next_commit``): another request's write landing between a
    write's commit and anything read after it."""

    def __init__(self, inner: Repository) -> None:
        self._inner = inner
        self._meanwhile: Callable[[], object] | None = None
        self.ran = 0

    def after_next_commit(self, meanwhile: Callable[[], object]) -> None:
        self._meanwhile = meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextmanager
    def atomic(self) -> Iterator[Repository]:
        with self._inner.atomic() as tx:
            yield tx
        # Committed (the block raised nothing): the other request's write goes in now.
        meanwhile, self._meanwhile = self._meanwhile, None
        if meanwhile is not None:
            meanwhile()
            self.ran += 1


def model_service(settings: Settings, services: Services, repo: Any) -> ModelService:
    return ModelService(repo=repo, blobs=services.blobs, repin_policy=settings.repin_policy,
                        defaults=lambda: training_defaults(settings))


@pytest.fixture
def raced(settings: Settings, services: Services
          ) -> Iterator[tuple[TestClient, CompetingRepository, ModelService]]:
    """The app whose model service writes through a ``CompetingRepository``, that repository,
    and the other request's model service (on the plain repository)."""
    competing = CompetingRepository(services.repo)
    app = create_app(settings, services=dataclasses.replace(
        services, models=model_service(settings, services, competing)), run_worker=True)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, competing, model_service(settings, services, services.repo)


def trained_twice(client: TestClient, h: dict[str, str]) -> list[dict[str, Any]]:
    r = client.post("/api/training/upload-zip", headers=h, data={"start": "true"},
                    files={"file": ("photos.zip", photo_zip(4), "application/zip")})
    assert r.status_code == 202, r.text
    wait_terminal(client, h, r.json()["training"]["id"])
    wait_terminal(client, h, client.post("/api/training/start", headers=h,
                                         json={}).json()["training"]["id"])
    versions: list[dict[str, Any]] = client.get("/api/model/versions",
                                                headers=h).json()["versions"]
    assert [v["number"] for v in versions] == [2, 1]
    return versions


def user(services: Services, name: str) -> User:
    return services.users.get_by_name(name=name)


def test_a_scale_patch_answers_its_own_scale_when_a_reset_commits_right_after_it(
        raced: tuple[TestClient, CompetingRepository, ModelService],
        services: Services) -> None:
    client, competing, other = raced
    h = auth(services, "ann")
    trained_twice(client, h)
    ann = user(services, "ann")
    competing.after_next_commit(lambda: other.change(user=ann, lora_scale_to_default=True))
    r = client.patch("/api/model", headers=h, json={"lora_scale": 0.6})
    assert r.status_code == 200, r.text
    assert competing.ran == 1
    answer = r.json()
    assert (answer["lora_scale"], answer["lora_scale_is_custom"]) == (0.6, True)
    assert answer["photos_need_upload_again"] is False
    assert answer["notice"] is None
    # The reset did land after it: the model now reads as the other request left it.
    now = client.get("/api/model", headers=h).json()
    assert (now["lora_scale"], now["lora_scale_is_custom"]) == (1.0, False)
    # The other way round: the reset's answer is the default, not the scale set after it.
    competing.after_next_commit(lambda: other.set_lora_scale(user=ann, lora_scale=1.4))
    r = client.patch("/api/model", headers=h, json={"lora_scale": None})
    assert r.status_code == 200, r.text
    assert competing.ran == 2
    assert (r.json()["lora_scale"], r.json()["lora_scale_is_custom"]) == (1.0, False)


def test_an_activation_answers_the_version_it_made_active_when_another_follows_it(
        raced: tuple[TestClient, CompetingRepository, ModelService],
        services: Services) -> None:
    client, competing, other = raced
    h = auth(services, "ann")
    v2, v1 = trained_twice(client, h)
    ann = user(services, "ann")
    competing.after_next_commit(lambda: other.activate(user=ann, version_id=v2["id"]))
    r = client.post(f"/api/model/versions/{v1['id']}/activate", headers=h)
    assert r.status_code == 200, r.text
    assert competing.ran == 1
    assert r.json()["active_version"]["id"] == v1["id"]
    assert r.json()["active_version"]["number"] == 1
    assert client.get("/api/model", headers=h).json()["active_version"]["number"] == 2


def test_the_services_answers_are_the_state_their_own_write_left(
        raced: tuple[TestClient, CompetingRepository, ModelService],
        settings: Settings, services: Services) -> None:
    # What the CLI's 'model --lora-scale' and 'activate' and the web forms are given.
    client, competing, other = raced
    h = auth(services, "ann")
    v2, v1 = trained_twice(client, h)
    ann = user(services, "ann")
    models = model_service(settings, services, competing)
    competing.after_next_commit(lambda: other.change(user=ann, lora_scale_to_default=True))
    changed = models.set_lora_scale(user=ann, lora_scale=0.6)
    assert (changed.model.lora_scale, changed.model.lora_scale_is_custom) == (0.6, True)
    assert changed.active is not None
    assert changed.active.id == v2["id"]
    competing.after_next_commit(lambda: other.activate(user=ann, version_id=v2["id"]))
    activated = models.activate(user=ann, version_id="1")
    assert activated.active is not None
    assert activated.active.id == v1["id"]
    assert activated.model.active_version_id == v1["id"]
    assert activated.model.lora_scale == 1.0  # the reset before it, committed
    assert competing.ran == 2
