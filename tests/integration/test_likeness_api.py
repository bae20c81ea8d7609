"""Likeness tracking through the HTTP API, with the real queue and worker, dlib, and a generator
stand-in that answers with real photos: the gate's state in the training's answer, the quality
and comparison routes, their PNGs (owner only), the retraining log and explicit activation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.likeness.chart import CHART_SIZE
from selfie_lora.likeness.grid import grid_size
from selfie_lora.services.ports import GenerationJob
from selfie_lora.testing.fakes import FakeTrainer, PhotoGenerator, RecordingAlerter
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, wait_terminal
from tests.support.alerts import alert_inbox
from tests.support.likeness import other_person, png_size, same_person, shared_analyzer
from tests.support.loops import noting_the_loop
from tests.support.owners import own_model
from tests.support.photos import real_photo_zip


class HeldGenerator(PhotoGenerator):
    """Answers only once ``release`` is set, so a test can see a version being scored."""

    release: threading.Event

    def generate(self, job: GenerationJob) -> list[bytes]:
        self.release.wait(30)
        return super().generate(job)


@pytest.fixture
def generator() -> HeldGenerator:
    g = HeldGenerator(photos=same_person())
    g.release = threading.Event()
    g.release.set()
    return g


@pytest.fixture
def alerter() -> RecordingAlerter:
    return RecordingAlerter()


@pytest.fixture
def services(settings: Settings, generator: HeldGenerator,
             alerter: RecordingAlerter) -> Iterator[Services]:
    svc = build_services(settings, trainers={"local": FakeTrainer()},
                         generators={"local": generator}, face_analyzer=shared_analyzer(),
                         alerter=alerter)
    yield svc
    svc.close()


# ``client`` comes from tests/conftest.py and runs on this module's ``services``.


def wait_scored(client: TestClient, h: dict[str, str], version_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        r = client.get(f"/api/model/versions/{version_id}/quality", headers=h)
        assert r.status_code == 200, r.text
        if r.json()["quality"]["status"] != "pending":
            return r.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.05)


def test_a_retraining_that_loses_the_likeness_is_held_and_says_why(
    client: TestClient, services: Services, generator: HeldGenerator, alerter: RecordingAlerter,
) -> None:
    ann = auth(services, "ann")
    r = client.post("/api/training/upload-zip", headers=ann,
                    files={"file": ("me.zip", real_photo_zip(), "application/zip")})
    assert r.status_code == 202, r.text
    first = wait_terminal(client, ann, r.json()["training"]["id"])
    assert first["training"]["status"] == "succeeded"
    assert first["training"]["gate"]["status"] == "passed"
    assert "first version" in first["training"]["gate"]["reason"]
    v1 = first["model"]["active_version"]
    assert len(first["model"]["probes"]) == 4
    q1 = wait_scored(client, ann, v1["id"])
    assert q1["quality"]["status"] == "scored"
    assert q1["scores"]["identity"] > 0.6
    assert q1["scores"]["face_share"] == 1.0

    # ---- a retraining whose probes show another person; watched while it is scored
    generator.photos = other_person()
    generator.release.clear()
    r = client.post("/api/training/start", headers=ann, json={})
    assert r.status_code == 202, r.text
    tid = r.json()["training"]["id"]
    deadline = time.monotonic() + 60
    while True:
        body = client.get("/api/training/progress", headers=ann,
                          params={"training_id": tid}).json()
        if body["training"]["phase"] == "scoring":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["training"]["status"] == "processing"
    assert body["training"]["progress"] == 1.0
    assert body["training"]["gate"]["status"] == "pending"
    assert body["model"]["active_version"]["id"] == v1["id"]
    # The slot is held while the gate decides.
    assert client.post("/api/training/start", headers=ann, json={}).status_code == 409
    generator.release.set()
    done = wait_terminal(client, ann, tid)
    training = done["training"]
    assert training["status"] == "succeeded"
    assert training["error"] is None
    assert training["gate"]["status"] == "held"
    assert "likeness dropped" in training["gate"]["reason"]
    assert training["gate"]["before"]["identity"] > training["gate"]["after"]["identity"]
    assert done["model"]["active_version"]["id"] == v1["id"]
    v2_id = training["version_id"]

    versions = client.get("/api/model/versions", headers=ann).json()["versions"]
    assert [(v["number"], v["gate"]["status"]) for v in versions] == [(2, "held"), (1, "passed")]
    assert versions[0]["alert"]["kind"] == "likeness_drop"
    assert versions[0]["quality"]["identity"] < 0.45
    assert versions[1]["quality"]["identity"] > 0.6
    assert len(alerter.sent) == 1
    assert alerter.sent[0]["version_id"] == v2_id

    # ---- the quality report, its probe images, the comparison, the grid and the chart
    q2 = client.get(f"/api/model/versions/{v2_id}/quality", headers=ann).json()
    assert q2["compared_with"] == v1["id"]
    assert q2["quality"]["embedding_model"] == "dlib_face_recognition_resnet_model_v1+5pt"
    assert [(p["prompt"], p["seed"]) for p in q2["probes"]] == [
        (p["prompt"], p["seed"]) for p in q1["probes"]]
    assert all(p["face_found"] for p in q2["probes"])
    assert q2["training"]["steps"] == 4
    image = client.get(q2["probes"][0]["image_url"], headers=ann)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    png_size(image.content)

    compare = client.get("/api/model/compare", headers=ann).json()
    assert (compare["a"]["id"], compare["b"]["id"]) == (v1["id"], v2_id)
    assert compare["scores"]["delta_identity"] < -0.3
    assert (compare["scores"]["stale_a"], compare["scores"]["stale_b"]) == (None, None)
    # Whose photos the scores are on, A's or B's: the newer version's (the dataset id alone did
    # not say which version's).
    assert (compare["reference_version_id"], compare["reference_version_number"]) == (v2_id, 2)
    assert all(p["delta"] < 0 for p in compare["probes"])
    assert compare["grid_url"] == q2["grid_url"]
    grid = client.get(compare["grid_url"], headers=ann)
    assert grid.status_code == 200, grid.text
    assert png_size(grid.content) == grid_size(4)
    chart = client.get(compare["chart_url"], headers=ann)
    assert chart.status_code == 200
    assert png_size(chart.content) == CHART_SIZE
    explicit = client.get("/api/model/compare", headers=ann, params={"a": v2_id, "b": v1["id"]})
    assert explicit.json()["scores"]["delta_identity"] > 0.3
    assert explicit.json()["reference_version_number"] == 2  # B before A: still v2's photos

    # ---- owner only. Bob has a scored version of his own: past "you have no model yet", only
    # a version lookup scoped to his model refuses Ann's.
    bob_owner = own_model(client, services, "bob", photos=real_photo_zip())
    bob, bob_v1 = bob_owner.headers, bob_owner.version
    assert bob_v1 is not None
    wait_scored(client, bob, bob_v1["id"])
    for url in (f"/api/model/versions/{v2_id}/quality", q2["probes"][0]["image_url"],
                f"/api/model/versions/{v1['id']}/quality/probes/0",
                compare["grid_url"], f"/api/model/compare?a={v2_id}",
                f"/api/model/compare?b={v2_id}", f"/api/model/compare?a={v2_id}&b={bob_v1['id']}",
                f"/api/model/compare/grid.png?a={v1['id']}&b={bob_v1['id']}"):
        r = client.get(url, headers=bob)
        assert r.status_code == 404, (url, r.status_code, r.text)
        # The id Bob sent, said back; nothing of Ann's.
        assert r.json()["error"]["message"].startswith("no such version: ")
        assert first["model"]["trigger_word"] not in r.text
    # What is not a version's is Bob's own: his chart, and nothing of his to compare yet.
    own_chart = client.get(compare["chart_url"], headers=bob)
    assert own_chart.status_code == 200
    assert own_chart.content != chart.content
    nothing = client.get("/api/model/compare", headers=bob)
    assert nothing.json()["error"]["code"] == "nothing_to_compare"
    cat = auth(services, "cat")  # no model at all
    for url in (f"/api/model/versions/{v2_id}/quality", compare["chart_url"],
                "/api/model/compare"):
        assert client.get(url, headers=cat).status_code == 404, url
    assert client.get(compare["chart_url"]).status_code == 401
    assert client.get(f"/api/model/versions/{v2_id}/quality/probes/9",
                      headers=ann).status_code == 404
    r = client.get("/api/model/compare", headers=ann, params={"a": v2_id, "b": v2_id})
    assert r.status_code == 422

    # ---- the retraining log
    log = client.get("/api/model/log", headers=ann).json()
    entries = log["trainings"]
    assert [e["kind"] for e in entries] == ["retraining", "first_training"]
    assert entries[0]["gate"]["status"] == "held"
    assert entries[0]["scores"]["before"]["identity"] > entries[0]["scores"]["after"]["identity"]
    assert entries[0]["preserved"]["trigger_word"] == first["model"]["trigger_word"]
    assert entries[1]["scores"]["after"]["identity"] > 0.6
    kinds = [e["kind"] for e in log["events"]]
    assert "gate_held" in kinds
    assert "quality_scored" in kinds

    # ---- the user activates the held version anyway: it works and is recorded
    r = client.post(f"/api/model/versions/{v2_id}/activate", headers=ann)
    assert r.status_code == 200
    assert r.json()["active_version"]["id"] == v2_id
    assert r.json()["active_version"]["gate"]["overridden"] is True
    assert r.json()["active_version"]["gate"]["override"]["replaced_version_id"] == v1["id"]
    last = client.get("/api/model/log", headers=ann).json()["events"][-1]
    assert last["kind"] == "version_activated"
    assert last["data"]["overrides_gate"] is True


def test_compare_needs_two_versions(client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    assert client.get("/api/model/compare", headers=h).status_code == 404
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("me.zip", real_photo_zip(), "application/zip")})
    wait_terminal(client, h, r.json()["training"]["id"])
    r = client.get("/api/model/compare", headers=h)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "nothing_to_compare"


def test_the_comparison_grid_is_made_off_the_event_loop(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first comparison on a photo set finds the faces of its photos: on the event loop, it
    would hold every other request of the server meanwhile."""
    h = auth(services, "ann")
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("me.zip", real_photo_zip(), "application/zip")})
    wait_terminal(client, h, r.json()["training"]["id"])
    noting, on_loop = noting_the_loop(services.likeness.compare)
    monkeypatch.setattr(services.likeness, "compare", noting)
    r = client.get("/api/model/compare/grid.png", headers=h)
    assert r.status_code == 422  # one version: nothing to compare, found in the pool
    assert on_loop == [False]


def train_twice(settings: Settings, generator: PhotoGenerator
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A first training on photos of one person, then a retraining whose probes show another
    person: the answers at their ends."""
    svc = build_services(settings, trainers={"local": FakeTrainer()},
                         generators={"local": generator}, face_analyzer=shared_analyzer())
    try:
        with TestClient(create_app(settings, services=svc, run_worker=True),
                        raise_server_exceptions=False) as client:
            h = auth(svc, "ann")
            r = client.post("/api/training/upload-zip", headers=h,
                            files={"file": ("me.zip", real_photo_zip(), "application/zip")})
            assert r.status_code == 202, r.text
            first = wait_terminal(client, h, r.json()["training"]["id"])
            wait_scored(client, h, first["model"]["active_version"]["id"])
            generator.photos = other_person()
            r = client.post("/api/training/start", headers=h, json={})
            assert r.status_code == 202, r.text
            return first, wait_terminal(client, h, r.json()["training"]["id"])
    finally:
        svc.close()


def test_the_likeness_settings_change_what_the_service_does(tmp_path: Path) -> None:
    """Probe count and size, tolerance and the alert address, as a deployment sets them: the
    probes are rendered as asked, a drop beyond the tolerance is held and POSTed to the address."""
    from tests.conftest import make_settings

    generator = PhotoGenerator(photos=same_person())
    with alert_inbox() as inbox:
        settings = make_settings(tmp_path, gate_tolerance=0.1, probe_count=2, probe_size=128,
                                 alert_url=inbox.url)
        first, second = train_twice(settings, generator)
        assert len(first["model"]["probes"]) == 2
        assert {(job.width, job.height) for job in generator.jobs} == {(128, 128)}
        assert len(generator.jobs) == 4  # two probes for each version
        assert second["training"]["gate"]["status"] == "held"
        assert second["training"]["gate"]["tolerance"] == 0.1
        assert [a["version_id"] for a in inbox.received] == [second["training"]["version_id"]]


def test_with_the_gate_off_in_the_settings_a_drop_is_active_at_once(tmp_path: Path) -> None:
    from tests.conftest import make_settings

    _first, second = train_twice(make_settings(tmp_path, quality_gate=False),
                                 PhotoGenerator(photos=same_person()))
    assert second["training"]["gate"]["status"] == "passed"
    assert "gate is off" in second["training"]["gate"]["reason"]
    assert second["model"]["active_version"]["id"] == second["training"]["version_id"]
