"""A user with a long history (many photo sets, trainings, versions): what a page or a route
costs must not grow with it, and lists that grow with every training are paged."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from selfie_lora.config import Settings
from selfie_lora.wiring import Services
from tests.conftest import make_settings
from tests.integration.test_web import PASSWORD, browser, fake_services, sign_in, train, upload


class Statements:
    """The SQL statements the requests ran (in anyio's worker threads, where FastAPI runs a
    sync route; not the worker's or the reconciler's own)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, _conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if threading.current_thread().name.startswith("AnyIO worker thread"):
            with self._lock:
                self.seen.append(sql)

    def during(self, client: TestClient, url: str) -> list[str]:
        with self._lock:
            self.seen.clear()
        r = client.get(url)
        assert r.status_code == 200, r.text
        with self._lock:
            return list(self.seen)


@pytest.fixture
def web_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def svc(web_settings: Settings) -> Iterator[Services]:
    services = fake_services(web_settings)
    services.users.create(name="ann", password=PASSWORD)
    yield services
    services.close()


@pytest.fixture
def statements(svc: Services) -> Iterator[Statements]:
    found = Statements()
    event.listen(svc.engine, "before_cursor_execute", found)
    yield found
    event.remove(svc.engine, "before_cursor_execute", found)


@pytest.fixture
def trained(web_settings: Settings, svc: Services) -> Iterator[TestClient]:
    """ann, signed in, with one version trained through the pages."""
    with browser(web_settings, svc) as client:
        sign_in(client, "ann")
        assert upload(client)[0] == 200
        assert 'data-status="succeeded"' in train(client)
        yield client


def grow_history(svc: Services, name: str, count: int) -> None:
    """``count`` more photo sets, each trained into a version of its own (copies of the user's
    first, as a long-lived account has them)."""
    user = svc.users.get_by_name(name=name)
    model = svc.repo.get_model_for_user(user.id)
    assert model is not None
    first = svc.repo.list_versions(model.id)[-1]
    training = svc.repo.get_training(first.training_id)
    dataset = svc.repo.get_dataset(training.dataset_id) if training else None
    assert training is not None
    assert dataset is not None
    top = max(v.number for v in svc.repo.list_versions(model.id))
    for n in range(top + 1, top + 1 + count):
        at = first.created_at + timedelta(minutes=n)
        svc.repo.add_dataset(dataclasses.replace(dataset, id=f"{name}-d{n}", created_at=at,
                                                 images_accepted=n))
        svc.repo.add_training(dataclasses.replace(training, id=f"{name}-t{n}",
                                                  dataset_id=f"{name}-d{n}", created_at=at,
                                                  version_id=f"{name}-v{n}"))
        svc.repo.add_version(dataclasses.replace(first, id=f"{name}-v{n}", number=n,
                                                 training_id=f"{name}-t{n}", created_at=at))


def test_the_versions_page_reads_as_many_times_whatever_the_number_of_photo_sets(
        trained: TestClient, svc: Services, statements: Statements) -> None:
    grow_history(svc, "ann", 2)
    few = statements.during(trained, "/versions")
    assert "v3" in trained.get("/versions").text
    grow_history(svc, "ann", 9)
    many = statements.during(trained, "/versions")
    # Each photo set read on its own added a statement per upload to every view of the page.
    assert len(many) == len(few), [s for s in many if "datasets" in s]
    # And each list is read once, not once for each way the page shows it.
    for table in ("versions", "trainings", "version_quality"):
        lists = [s for s in many if f"\nFROM {table} \nWHERE {table}.model_id" in s]
        assert len(lists) == 1, (table, lists)
