"""``selfie-lora model``, ``versions`` and ``activate``: the model page, the versions list and
rollback from the command line, through the same service calls as ``GET /api/model``,
``GET /api/model/versions`` and ``POST /api/model/versions/{id}/activate``, refusing what they
refuse with their words."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora import cli
from selfie_lora.domain.entities import GateStatus, Version
from selfie_lora.domain.likeness import (
    UNDECIDED_WORDS,
    IdentityScores,
    LikenessStatus,
    Undecided,
    VersionLikeness,
    gate_cell,
    likeness_cell,
    unscored_words,
)
from selfie_lora.errors import DatabaseLockedError, GenerationError
from selfie_lora.services.training import NextPin, TrainingService
from selfie_lora.testing.fakes import FakeGenerator
from selfie_lora.wiring import Services
from tests.conftest import auth, wait_terminal
from tests.integration.test_api import upload
from tests.integration.test_cli_out import settings as settings  # the fixtures, re-exported:
from tests.integration.test_cli_out import trained as trained  # ann's two trainings run once
from tests.integration.test_cli_out import trained_home as trained_home  # for the module
from tests.support.photos import photo_zip
from tests.support.trainings import stepped_away_on_a_lock


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def as_json(*args: str) -> Any:
    code, said = run(*args, "--json")
    assert code == 0, said
    return json.loads(said)


def auth_of(services: Services, name: str) -> dict[str, str]:
    _key, secret = services.users.create_key(user=services.users.get_by_name(name=name),
                                             name="test")
    return {"Authorization": f"Bearer {secret}"}


def ann_headers(services: Services) -> dict[str, str]:
    return auth_of(services, "ann")


def test_versions_lists_newest_first_with_the_active_one(trained: Services) -> None:
    code, said = run("versions", "--user", "ann")
    assert code == 0, said
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in said.splitlines()
            if line.startswith("│")]
    assert [row[0] for row in rows] == ["2", "1"], said
    assert [row[3] for row in rows] == ["passed", "passed"]
    assert [row[4] for row in rows] == ["active", ""]


def _version(**kw: Any) -> Version:
    return Version(id="id-1", model_id="m", number=1, training_id="t1", trainer_version="tv",
                   weights_key="k", weights_sha256="0" * 64, weights_method="stored",
                   remote_version=None, version_mismatch=False,
                   created_at=datetime(2026, 1, 1, tzinfo=UTC), **kw)


def _record(identity: float | None, face_share: float) -> VersionLikeness:
    scores = IdentityScores(identity=identity, identity_nearest=identity,
                            face_share=face_share, sane_share=1.0, sharpness=None, probes=4,
                            faces=4, reference_faces=4 if identity is not None else 0)
    return VersionLikeness(version_id="id-1", model_id="m", status=LikenessStatus.SCORED,
                           created_at=datetime(2026, 1, 1, tzinfo=UTC), scores=scores)


def test_versions_shows_a_version_being_scored_as_pending() -> None:
    """A version stored and not scored yet (its training interrupted in phase scoring) has no
    likeness record: its likeness read "-", not its scoring's state as README says."""
    pending = _version(gate_status=GateStatus.PENDING)
    assert likeness_cell(pending, None) == "pending"
    # Decided without a likeness record (a version from before likeness tracking): nothing.
    assert likeness_cell(_version(), None) == "-"
    assert likeness_cell(pending, _record(0.8, 1.0)) == "0.800"
    # Training photos without a face: the face share, the gate's measure then.
    assert likeness_cell(_version(), _record(None, 0.25)) == "25% faces"
    failed = dataclasses.replace(_record(None, 0.0), status=LikenessStatus.FAILED, scores=None)
    assert likeness_cell(_version(), failed) == "failed"
    held = _version(gate_status=GateStatus.HELD, gate_details={"override": {"at": "now"}})
    assert gate_cell(held) == "held, activated anyway"
    assert gate_cell(_version(gate_status=GateStatus.HELD)) == "held"


def test_a_comparison_says_why_a_version_has_no_probe_results() -> None:
    """A comparison (grid, its words on the Versions page, ``selfie-lora compare``'s table)
    said "not scored" of a version whose scoring failed and of one being scored alike, as of
    one from before likeness tracking (found in review)."""
    failed = dataclasses.replace(_record(None, 0.0), status=LikenessStatus.FAILED, scores=None)
    assert unscored_words(_version(gate_status=GateStatus.HELD), failed) == "scoring failed"
    assert unscored_words(_version(gate_status=GateStatus.PENDING), None) == "not scored yet"
    pending = dataclasses.replace(failed, status=LikenessStatus.PENDING)
    assert unscored_words(_version(gate_status=GateStatus.PENDING), pending) == "not scored yet"
    assert unscored_words(_version(), None) == "not scored"


def _page_cells(page: str) -> dict[str, tuple[str, str]]:
    """The Versions page's Likeness and Gate cells (the gate's reason left out), by number."""
    cells = {}
    for number, row in re.findall(r'<tr id="v(\d+)"[^>]*>(.*?)</tr>', page, re.S):
        tds = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        cells[number] = (html.unescape(tds[2]).strip(),
                         html.unescape(re.sub(r":\s*<span.*", "", tds[4], flags=re.S)).strip())
    return cells


def test_the_versions_page_and_the_cli_word_the_likeness_and_gate_alike(
        trained: Services, client: TestClient) -> None:
    """The Likeness cell (and the Gate's) was worked out twice, in versions.html and in
    ``selfie-lora versions``: both now show domain.likeness.likeness_cell and gate_cell."""
    ann = trained.users.get_by_name(name="ann")
    trained.users.set_password(user=ann, password="a long enough password 1")
    token = re.search(r'name="form_token" value="([^"]+)"', client.get("/signin").text)
    assert token
    r = client.post("/signin", data={"name": "ann", "password": "a long enough password 1",
                                     "form_token": token.group(1), "next": "/versions"})
    assert r.status_code == 200, r.text
    page = _page_cells(r.text)
    code, said = run("versions", "--user", "ann")
    assert code == 0, said
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in said.splitlines()
            if line.startswith("│")]
    assert {row[0]: (row[2], row[3]) for row in rows} == page
    assert sorted(page) == ["1", "2"]
    assert all(re.fullmatch(r"\d\.\d{3}", likeness) for likeness, _gate in page.values())


def test_versions_json_is_what_the_api_answers(trained: Services, client: TestClient) -> None:
    api = client.get("/api/model/versions", headers=ann_headers(trained))
    assert api.status_code == 200
    assert as_json("versions", "--user", "ann") == api.json()


def test_model_shows_the_model_and_its_active_version(trained: Services,
                                                      client: TestClient) -> None:
    code, said = run("model", "--user", "ann")
    assert code == 0, said
    model = trained.models.get(user=trained.users.get_by_name(name="ann"))
    assert f"trigger word: {model.trigger_word}" in said
    assert f"trainer version: {model.trainer_version} (pinned: every training uses it)" in said
    assert f"LoRA scale: {model.lora_scale:g} (the default)" in said
    assert "active version: version 2 (sha256 " in said
    api = client.get("/api/model", headers=ann_headers(trained)).json()
    shown = as_json("model", "--user", "ann")
    assert shown.pop("next_training") == {
        "backend": model.backend, "trainer_version": model.trainer_version,
        "destination": model.destination, "pinned": True, "chosen": False}
    assert shown == api


def untrained_pin(services: Services, client: TestClient) -> NextPin:
    """bob's model, made by an upload and never trained: its pin still follows the settings."""
    upload(client, auth(services, "bob"), start=False)
    pin = services.training.next_pin(user=services.users.get_by_name(name="bob"))
    assert pin is not None
    assert not pin.fixed
    return pin


def test_model_before_the_first_training_shows_the_pin_it_will_take(
        trained: Services, client: TestClient) -> None:
    pin = untrained_pin(trained, client)
    code, said = run("model", "--user", "bob")
    assert code == 0, said
    assert (f"trainer version: {pin.model.trainer_version} (what the first training uses: "
            "the server's trainer version, until that training pins it)") in said.replace(
        "\n", " ")
    assert "active version: none yet" in said
    shown = as_json("model", "--user", "bob")
    assert shown.pop("next_training")["pinned"] is False
    # The API's answer whole, its pin_fixed (false: the pin still follows the settings) too.
    api = client.get("/api/model", headers=auth_of(trained, "bob")).json()
    assert api["pin_fixed"] is False
    assert shown == api
    code, said = run("versions", "--user", "bob")
    assert code == 0, said
    assert "bob's model has no version yet" in said


def test_a_repin_to_the_version_shown_before_the_first_training_says_it_is_now_chosen(
        trained: Services, client: TestClient) -> None:
    # Recorded and fixing the pin, it was printed '(unchanged)' (diffcli review 3).
    pin = untrained_pin(trained, client)
    shown = pin.model.trainer_version
    code, said = run("model", "--user", "bob", "--trainer-version", shown, "--reason", "keep")
    assert code == 0, said
    assert (f"trainer version of bob's model: {shown} (the one it showed, now chosen by you "
            "rather than following the server's setting); every later training uses it") in \
        " ".join(said.split())
    assert "your choice: the first training uses it" in said
    # Again: now it is unchanged, and said so.
    code, said = run("model", "--user", "bob", "--trainer-version", shown, "--reason", "keep")
    assert code == 0, said
    assert f"trainer version of bob's model: {shown} (unchanged)" in said


def test_an_unknown_user_or_no_model_is_one_line(trained: Services) -> None:
    trained.users.create(name="cy")
    for command in ("model", "versions"):
        code, said = run(command, "--user", "nobody")
        assert code == 1, said
        assert said.strip() == ("error: no user named 'nobody'; create one with 'selfie-lora "
                                "users create'")
        code, said = run(command, "--user", "cy")
        assert code == 1, said
        assert said.strip() == ("error: cy has no model yet: run 'selfie-lora train PATH "
                                "--user cy' to start one")


def active_number() -> int:
    return int(as_json("model", "--user", "ann")["active_version"]["number"])


def test_activate_rolls_back_and_forward(trained: Services, client: TestClient) -> None:
    code, said = run("activate", "1", "--user", "ann")
    assert code == 0, said
    assert said.strip() == ("version 1 of ann's model is active (was version 2); generations "
                            "that name no version use it")
    assert active_number() == 1
    h = ann_headers(trained)
    assert client.get("/api/model", headers=h).json()["active_version"]["number"] == 1
    code, said = run("versions", "--user", "ann")
    assert [line.split("│")[5].strip() for line in said.splitlines()
            if line.startswith("│")] == ["", "active"], said
    code, said = run("activate", "v2", "--user", "ann")  # the API's spelling too
    assert code == 0, said
    assert "version 2 of ann's model is active (was version 1)" in said
    assert active_number() == 2
    code, said = run("activate", "2", "--user", "ann")
    assert code == 0, said
    assert "version 2 of ann's model is active (it was already)" in said


def test_activate_refuses_what_the_api_refuses_with_its_words(trained: Services,
                                                              client: TestClient) -> None:
    code, said = run("activate", "9", "--user", "ann")
    assert code == 1, said
    api = client.post("/api/model/versions/9/activate", headers=ann_headers(trained)).json()
    assert said.strip() == f"error: {api['error']['message']}" == "error: no such version: 9"
    ann = trained.users.get_by_name(name="ann")
    v1 = trained.models.version(user=ann, version_id="1")
    trained.blobs.delete(v1.weights_key)
    code, said = run("activate", "1", "--user", "ann")
    assert code == 1, said
    api = client.post("/api/model/versions/1/activate", headers=ann_headers(trained)).json()
    assert api["error"]["code"] == "weights_missing"
    # The operator's log line (which key is missing) comes before it on stderr.
    assert said.strip().splitlines()[-1] == f"error: {api['error']['message']}"
    assert active_number() == 2  # nothing changed
    trained.users.create(name="cy")
    code, said = run("activate", "1", "--user", "cy")
    assert code == 1, said
    assert said.strip() == ("error: cy has no model yet: run 'selfie-lora train PATH --user "
                            "cy' to start one")
    code, said = run("activate", "1", "--user", "nobody")
    assert code == 1, said
    assert said.strip() == ("error: no user named 'nobody'; create one with 'selfie-lora "
                            "users create'")


def test_train_names_the_activate_command_for_a_held_version(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path) -> None:
    # A generator that fails: the new version cannot be scored, so the gate holds it back. The
    # shared fake, not one for the CLI alone: the test app's worker may take the training (and
    # its scoring) before the CLI's own worker does, and with a working generator it activated
    # version 3 (a flaky test under load).
    fake_generator.fail_with = GenerationError("the generator is out of memory")
    photos = tmp_path / "photos.zip"
    photos.write_bytes(photo_zip(4))
    code, said = run("train", str(photos), "--user", "ann")
    assert code == 0, said
    said = " ".join(said.split())
    assert "version 3 is held back" in said
    assert ("version 2 stays active; compare them with 'selfie-lora compare --user ann', or "
            "activate version 3 yourself ('selfie-lora activate 3 --user ann')") in said
    code, said = run("versions", "--user", "ann")
    assert "version 3 held back: " in said
    code, said = run("activate", "3", "--user", "ann")
    assert code == 0, said
    # After the service's log line of the override.
    assert said.strip().splitlines()[-1] == ("version 3 of ann's model is active (was version "
                                             "2), although the likeness gate held it "
                                             "back; generations that name no version use it")
    # Activated, it was still listed as 'held back' alone (diffcli review 5c).
    code, said = run("versions", "--user", "ann")
    assert code == 0, said
    assert "version 3 held back by the likeness gate, then activated anyway: " in " ".join(
        said.split())
    row = next(line for line in said.splitlines() if line.startswith("│ 3 "))
    assert "│ held, activated anyway │ active │" in row


def test_activate_says_what_a_database_lock_left_of_a_pending_version(
        trained: Services) -> None:
    """'although its likeness is still being scored' was said of a version whose scoring a
    database lock stopped, and of one scored whose judging it stopped (its verdict's write), and
    'versions' said 'pending' alone (and "the gate's decision could not be saved" was said where
    the lock came before the gate decided): said as the Versions page says them
    (``TrainingService.undecided``)."""
    ann = trained.users.get_by_name(name="ann")
    v1 = trained.models.version(user=ann, version_id="1")
    for scored, pending, against in [
            (False, "its likeness could not be scored yet: the database was busy; it is scored "
                    "again shortly",
             "although its likeness could not be scored yet (the database was busy): the gate "
             "has not decided yet"),
            (True, "its likeness is scored, but the gate could not decide yet: the database "
                   "was busy; it is tried again shortly",
             "although the likeness gate could not decide on it yet (the database was busy; its "
             "likeness is scored)")]:
        stepped_away_on_a_lock(trained, v1, scored=scored)
        code, said = run("versions", "--user", "ann")
        assert code == 0, said
        # Below the table, as the Versions page's Gate cell says it.
        assert f"version 1 pending: {pending}" in said, said
        code, said = run("activate", "1", "--user", "ann")
        assert code == 0, said
        # After the service's log line of the override.
        assert said.strip().splitlines()[-1] == (
            f"version 1 of ann's model is active (was version 2), {against}; generations that "
            "name no version use it")
        assert run("activate", "2", "--user", "ann")[0] == 0


@contextlib.contextmanager
def _v1_as_it_was(services: Services) -> Iterator[Version]:
    """ann's version 1, put back as it was (its gate, record and training's row) once the test
    made it one a lock left undecided: the module's later tests read it."""
    ann = services.users.get_by_name(name="ann")
    v1 = services.models.version(user=ann, version_id="1")
    record = services.repo.get_likeness(v1.id)
    training = services.repo.get_training(v1.training_id)
    assert record is not None
    assert training is not None
    try:
        yield v1
    finally:
        services.repo.set_version_gate(v1.id, status=v1.gate_status, reason=v1.gate_reason,
                                       details=v1.gate_details)
        services.repo.save_likeness(record)
        services.repo.save_training(training)


def test_activate_says_the_activation_when_what_a_lock_left_cannot_be_read(
        trained: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read of why the gate has not decided comes after the activation committed: its
    failure (a lock again) made the command exit 1 with an error, an activation that was done
    said to have failed. Now the activation is said, the failed read logged."""
    def locked(self: TrainingService, *, versions: object) -> None:
        raise DatabaseLockedError("database error: database is locked", lock=True)

    monkeypatch.setattr(TrainingService, "undecided_of", locked)
    with _v1_as_it_was(trained):
        code, said = run("activate", "1", "--user", "ann")
        assert code == 0, said
        assert said.strip().splitlines()[-1] == (
            "version 1 of ann's model is active (was version 2); generations that name no "
            "version use it")
        # Its log line (the CLI's logging writes to the output), before the activation's.
        assert ("WARNING selfie_lora.cli: version 1 is active; why the gate has not decided on "
                "it could not be read: database error: database is locked") in said, said
        assert run("activate", "2", "--user", "ann")[0] == 0


def test_versions_json_and_the_api_say_why_a_lock_left_a_version_pending(
        trained: Services, client: TestClient) -> None:
    """GET /api/model/versions and 'versions --json' gave a version a database lock left pending
    as "pending" alone, where the pages and 'versions' say why: the gate's ``waiting`` carries
    the case and the Versions page's words; null for every other version."""
    with _v1_as_it_was(trained) as v1:
        for scored, why in [(False, "scoring_kept_waiting"), (True, "judging_kept_waiting")]:
            stepped_away_on_a_lock(trained, v1, scored=scored)
            api = client.get("/api/model/versions", headers=ann_headers(trained))
            assert api.status_code == 200, api.text
            gates = {v["number"]: v["gate"] for v in api.json()["versions"]}
            assert gates[1]["status"] == "pending"
            assert gates[1]["waiting"] == {"why": why, "words": UNDECIDED_WORDS[Undecided(why)]}
            assert all(gate["waiting"] is None for number, gate in gates.items() if number != 1)
            assert as_json("versions", "--user", "ann") == api.json()


def test_compare_says_what_a_lock_left_of_a_version_not_being_scored(
        trained: Services, tmp_path: Path) -> None:
    """A version whose worker stepped away on a database lock was said to be "being scored by a
    worker (its training ... is in phase scoring)" by compare, which the pages no longer say of
    it: said as the Versions page says it (``TrainingService.undecided``)."""
    with _v1_as_it_was(trained) as v1:
        stepped_away_on_a_lock(trained, v1, scored=False)
        code, said = run("compare", "--user", "ann", "--a", "1", "--b", "2",
                         "--out", str(tmp_path))
        assert code == 0, said
        said = " ".join(said.split())
        assert "being scored by a worker" not in said, said
        assert ("version 1 is not being scored: its likeness could not be scored yet: the "
                "database was busy; it is scored again shortly: it shows as not scored; run "
                "compare again once its training ended") in said, said


def test_a_custom_lora_scale_is_set_and_survives_retraining(trained: Services,
                                                           client: TestClient) -> None:
    code, said = run("model", "--user", "ann", "--lora-scale", "0.8")
    assert code == 0, said
    assert said.splitlines()[0] == ("LoRA scale of ann's model set to 0.8 (custom): generations "
                                    "that name none use it, and retraining keeps it")
    assert "LoRA scale: 0.8 (custom)" in said
    shown = as_json("model", "--user", "ann")
    assert (shown["lora_scale"], shown["lora_scale_is_custom"]) == (0.8, True)
    h = ann_headers(trained)
    done = wait_terminal(client, h, upload(client, h)["training"]["id"])
    assert done["training"]["status"] == "succeeded"
    shown = as_json("model", "--user", "ann")
    assert shown["active_version"]["number"] == 3
    assert (shown["lora_scale"], shown["lora_scale_is_custom"]) == (0.8, True)
    code, said = run("model", "--user", "ann", "--default-lora-scale")
    assert code == 0, said
    assert said.splitlines()[0] == "LoRA scale of ann's model set to 1 (the default)"
    assert as_json("model", "--user", "ann")["lora_scale_is_custom"] is False


def test_a_lora_scale_the_api_refuses_is_refused(trained: Services,
                                                 client: TestClient) -> None:
    """The same rule as PATCH /api/model (the service's, whose message the CLI prints; the API's
    body schema answers the same range as invalid_request first)."""
    h = ann_headers(trained)
    for value in ("5", "-3", "nan", "inf", "0.2_5", "\u0660.\u0665"):
        sent = {"nan": "NaN", "inf": "Infinity"}.get(value, value)  # as Python's json reads
        if not value.isascii() or "_" in value:
            sent = json.dumps(value)  # a string: refused by the API's strict float
        api = client.patch("/api/model", content=f'{{"lora_scale": {sent}}}',
                           headers={**h, "Content-Type": "application/json"})
        assert api.status_code == 422, api.text
        assert api.json()["error"]["code"] == "invalid_request"
        code, said = run("model", "--user", "ann", "--lora-scale", value)
        assert code == 1, said
        # The option parser took "0.2_5" (0.25) and "٣": read as the web's Save the scale reads.
        assert said.strip() == f"error: the LoRA scale must be a number from -1.0 to 3.0 (not {value!r})"
    assert as_json("model", "--user", "ann")["lora_scale_is_custom"] is False
    code, said = run("model", "--user", "nobody", "--lora-scale", "0.8")
    assert code == 1, said
    assert said.startswith("error: no user named 'nobody'")


def test_generate_reads_its_lora_scale_as_model_does(trained: Services, tmp_path: Path) -> None:
    """generate --lora-scale went through the option parser's float(), which took "0.2_5" (0.25)
    and "٣" and made the pictures; refused now as 'model --lora-scale' and the web refuse it,
    before anything is generated."""
    for value in ("0.2_5", "\u0660.\u0665", "nan", "7"):
        code, said = run("generate", "a hat", "--user", "ann", "--lora-scale", value,
                         "--out", str(tmp_path))
        assert code == 1, said
        assert said.strip() == ("error: the LoRA scale must be a number from -1.0 to 3.0 "
                                f"(not {value!r})")
    assert trained.generation.history(user=trained.users.get_by_name(name="ann")) == []


def test_generate_without_an_active_version_names_the_activate_command(
        trained: Services, client: TestClient, tmp_path: Path) -> None:
    """The service's message (the API's) names the Versions page and the activate route; the
    command line names its own command, as it does for a held-back version after 'train'."""
    ann = trained.users.get_by_name(name="ann")
    model = trained.models.get(user=ann)
    trained.repo.set_model_active_version(model.id, None)  # each version held back, say
    api = client.post("/api/generate", headers=ann_headers(trained), json={"prompt": "x"})
    assert api.status_code == 422
    assert api.json()["error"]["code"] == "no_version"
    assert "POST /api/model/versions/{id}/activate" in api.json()["error"]["message"]
    code, said = run("generate", "x", "--user", "ann", "--out", str(tmp_path))
    assert code == 1, said
    assert " ".join(said.split()) == (
        "error: ann's model has no active version: activate one with 'selfie-lora activate N "
        "--user ann' ('selfie-lora versions --user ann' lists them) or train again")
    # 'model' said 'none yet', as if there were no version (diffcli review 5).
    count = len(trained.models.versions(user=ann))
    code, said = run("model", "--user", "ann")
    assert code == 0, said
    assert (f"active version: none active ({count} versions: activate one with 'selfie-lora "
            "activate N --user ann')") in " ".join(said.split())
    code, said = run("activate", "2", "--user", "ann")
    assert code == 0, said
    code, said = run("generate", "x", "--user", "ann", "--out", str(tmp_path))
    assert code == 0, said


def test_a_repin_is_applied_and_logged_as_the_api_does(trained: Services,
                                                       client: TestClient) -> None:
    code, said = run("model", "--user", "ann", "--trainer-version", "local-tiny-v1",
                     "--reason", "the v1 recipe")
    assert code == 0, said
    # After the service's log line of the re-pin, before the model.
    assert said.splitlines()[-7] == ("trainer version of ann's model: local-tiny-v1 (was "
                                     "local-tiny-v2); every later training uses it"), said
    assert "trainer version: local-tiny-v1 (pinned: every training uses it)" in said
    h = ann_headers(trained)
    assert client.get("/api/model", headers=h).json()["trainer_version"] == "local-tiny-v1"
    changed = [e for e in client.get("/api/model/log", headers=h).json()["events"]
               if e["kind"] == "trainer_version_changed"]
    assert [(e["data"]["from"], e["data"]["to"], e["data"]["reason"]) for e in changed] == [
        ("local-tiny-v2", "local-tiny-v1", "the v1 recipe")]
    # Again: nothing changes and nothing more is logged, as a PATCH sent again.
    shown = as_json("model", "--user", "ann", "--trainer-version", "local-tiny-v1",
                    "--reason", "again")
    assert shown["trainer_version"] == "local-tiny-v1"
    assert (shown["photos_need_upload_again"], shown["notice"]) == (False, None)
    assert len([e for e in client.get("/api/model/log", headers=h).json()["events"]
                if e["kind"] == "trainer_version_changed"]) == 1


def test_a_repin_the_api_refuses_is_refused_with_its_words(
        trained: Services, client: TestClient) -> None:
    import dataclasses

    from selfie_lora.domain.entities import TrainingStatus

    h = ann_headers(trained)
    for version, reason in (("local-nope-v9", "try"), ("local-flux-v1", "flux"),
                            ("local-tiny-v1", ""), ("local-tiny-v1", "  ")):
        api = client.patch("/api/model", headers=h,
                           json={"trainer_version": version, "reason": reason})
        assert api.status_code == 422, api.text
        message = api.json()["error"]["message"]
        code, said = run("model", "--user", "ann", "--trainer-version", version,
                         "--reason", reason)
        assert code == 1, said
        if api.json()["error"]["code"] == "reason_required":
            # The API names its field; the command names its option.
            message += ": pass --reason TEXT"
        assert " ".join(said.split()) == f"error: {message}"
    code, said = run("model", "--user", "ann", "--trainer-version", "local-tiny-v1")
    assert code == 1, said
    assert " ".join(said.split()) == ("error: say why the trainer version changes (reason): "
                                      "pass --reason TEXT")
    # A training queued: the re-pin waits for it, as the API's 409.
    ann = trained.users.get_by_name(name="ann")
    done = trained.training.progress(user=ann).training
    trained.repo.add_training(dataclasses.replace(
        done, id="queued", status=TrainingStatus.QUEUED, version_id=None, is_retraining=True))
    api = client.patch("/api/model", headers=h,
                       json={"trainer_version": "local-tiny-v1", "reason": "now"})
    assert api.status_code == 409, api.text
    code, said = run("model", "--user", "ann", "--trainer-version", "local-tiny-v1",
                     "--reason", "now", "--lora-scale", "0.5")
    assert code == 1, said
    assert said.strip() == f"error: {api.json()['error']['message']}" == (
        "error: wait for the running training to end before re-pinning")
    shown = as_json("model", "--user", "ann")
    # Nothing changed, the scale given with it neither (one transaction, as the PATCH).
    assert (shown["trainer_version"], shown["lora_scale_is_custom"]) == ("local-tiny-v2", False)


def test_a_reason_or_trainer_version_over_the_api_s_cap_is_refused_alike(
        trained: Services, client: TestClient) -> None:
    # The caps lived only in the API's schema: the CLI re-pinned with a 5000-character reason
    # and logged it (diffcli review 2).
    h = ann_headers(trained)
    for version, reason, api_code in (
            ("local-tiny-v1", "x" * 501, "invalid_request"),
            ("local-tiny-v1" + "1" * 300, "why", "invalid_trainer_version")):
        api = client.patch("/api/model", headers=h,
                           json={"trainer_version": version, "reason": reason})
        assert api.status_code == 422, api.text
        error = api.json()["error"]
        assert error["code"] == api_code
        code, said = run("model", "--user", "ann", "--trainer-version", version,
                         "--reason", reason)
        assert code == 1, said
        assert " ".join(said.split()) == f"error: {error['message']}"
        assert "at most" in error["message"]
    code, _ = run("model", "--user", "ann", "--trainer-version", "local-tiny-v1",
                  "--reason", "x" * 500)
    assert code == 0  # the cap itself is taken
    assert as_json("model", "--user", "ann")["trainer_version"] == "local-tiny-v1"


def test_a_reason_without_a_trainer_version_is_a_usage_error(trained: Services) -> None:
    # It was silently ignored (exit 0, the scale given with it applied; diffcli review 4).
    for extra in ((), ("--lora-scale", "0.5")):
        code, said = run("model", "--user", "ann", "--reason", "no version given", *extra)
        assert code == 2, said
        assert said.strip() == ("error: --reason goes with --trainer-version (it is recorded "
                                "with a re-pin); nothing was changed")
    assert as_json("model", "--user", "ann")["lora_scale_is_custom"] is False
