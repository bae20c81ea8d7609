"""Every API operation fuzzed from its OpenAPI document (schemathesis, on Hypothesis): whatever
a client sends, the answer is never a 5xx, its status, media type and body are the ones the
document declares, and what was stored before is all still there afterwards."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from selfie_lora.api.app import create_app
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.owners import own_model

# In the dev extras (`make install`); a virtual environment made before it skips, saying so.
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed: make install")
GenerationMode = schemathesis.GenerationMode

# Examples per operation and mode: the whole test takes ~30 s on one core at 25
# (HYPOTHESIS_PROFILE does not reach it: the settings below are its own). FUZZ_EXAMPLES=300 for
# a longer hunt.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))

# DELETE /api/me deletes the account and all it owns when asked to: the one loss that is asked
# for, and one that would leave nothing for the operations after it.
NOT_FUZZED = {("DELETE", "/api/me")}

# Not checked: a request the document allows can still be refused (a file that is no zip), and a
# query parameter no route names is ignored, as HTTP APIs do, not refused.
NOT_CHECKED = [schemathesis.checks.positive_data_acceptance,
               schemathesis.checks.negative_data_rejection]


@dataclass(frozen=True)
class Stored:
    """A user's trained model and a generation, and what must still be read back after fuzzing."""

    client: TestClient
    headers: dict[str, str]
    ids: dict[str, str]  # path parameter -> the id of something stored
    weights_sha256: str

    def still_there(self) -> None:
        h = self.headers
        versions = self.client.get("/api/model/versions", headers=h)
        assert versions.status_code == 200, versions.text
        assert self.ids["version_id"] in {v["id"] for v in versions.json()["versions"]}
        weights = self.client.get(f"/api/model/versions/{self.ids['version_id']}/weights",
                                  headers=h)
        assert weights.status_code == 200, weights.text
        assert hashlib.sha256(weights.content).hexdigest() == self.weights_sha256
        image = self.client.get(f"/api/generations/{self.ids['generation_id']}/images/0",
                                headers=h)
        assert image.status_code == 200, image.text
        progress = self.client.get("/api/training/progress", headers=h,
                                   params={"training_id": self.ids["training_id"]})
        assert progress.status_code == 200, progress.text


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """One app for every operation, its worker running: something for the routes to answer
    about, and to lose."""
    config = make_settings(tmp_path_factory.mktemp("fuzz"))
    services = build_services(config, trainers={"local": FakeTrainer()},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()})
    try:
        with TestClient(create_app(config, services=services, run_worker=True),
                        raise_server_exceptions=False) as client:
            owner = own_model(client, services, "ann")
            r = client.post("/api/generate", headers=owner.headers, json={"prompt": "a hat"})
            assert r.status_code == 200, r.text
            yield Stored(client=client, headers=owner.headers,
                         ids={"version_id": owner.version["id"],
                              "generation_id": r.json()["generation"]["id"],
                              "training_id": owner.training["id"]},
                         weights_sha256=owner.version["weights_sha256"])
    finally:
        services.close()


def test_no_input_is_a_server_error_or_off_the_document(stored: Stored) -> None:
    api = schemathesis.openapi.from_asgi("/openapi.json", stored.client.app)
    failures: dict[str, str] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in NOT_FUZZED:
            continue
        # Each mode a run of its own: in one run of all three, 25 examples held too few valid
        # bodies to reach a route's code behind its validation (a key's name was never set).
        runs = {mode.value: operation.as_strategy(mode) for mode in GenerationMode}
        # Random ids reach only the routes' "not found"; the stored ones reach the code behind
        # it (an image's index, a weights format, a sample's step). Not for a DELETE: deleting
        # what was asked to be deleted is no loss, but the later operations would find nothing.
        known = {p.name: stored.ids[p.name] for p in operation.path_parameters
                 if p.name in stored.ids}
        if known and operation.method.upper() != "DELETE":
            runs["stored ids"] = operation.as_strategy(GenerationMode.POSITIVE,
                                                       path_parameters=known)
        for run, cases in runs.items():

            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(cases)
            def fuzz(case: Any) -> None:
                case.call_and_validate(headers=stored.headers, excluded_checks=NOT_CHECKED)

            try:
                fuzz()
            # schemathesis's FailureGroup is a BaseExceptionGroup; an exception the app raised
            # comes through too (its transport re-raises it, after the 500). Every operation's
            # failures at once, not the first only.
            except (Exception, BaseExceptionGroup) as error:
                if isinstance(error, Unsatisfiable) and run == GenerationMode.NEGATIVE.value:
                    continue  # no parameters and no body: there is no invalid request to make
                failures[f"{operation.label} ({run})"] = f"{type(error).__name__}: {error}"[:3000]
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())
    stored.still_there()
