"""Clients that try to wedge or exhaust the service, through HTTP: oversized bodies, numbers and
strings out of range, re-pins that would break every later training, racing uploads. (Slow
clients and a body never sent need a real server: tests/e2e/test_hostile_clients.py.)"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.domain.text import BIDI_CONTROLS
from selfie_lora.testing.fakes import FakeFaceAnalyzer, FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings, serving, wait_terminal
from tests.support.backends import DATABASES, database_url, fresh_engine
from tests.support.homes import MadeHome, made_once
from tests.support.photos import photo_zip


def upload(client: TestClient, headers: dict[str, str], *, start: bool = True) -> Any:
    return client.post("/api/training/upload-zip", headers=headers,
                       files={"file": ("photos.zip", photo_zip(4), "application/zip")},
                       data={"start": "true" if start else "false"})


def trained(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    r = upload(client, headers)
    assert r.status_code == 202, r.text
    return wait_terminal(client, headers, r.json()["training"]["id"])


def _ann_trained(client: TestClient, services: Services) -> tuple[dict[str, str], dict[str, Any]]:
    h = auth(services, "ann")
    return h, trained(client, h)


@pytest.fixture(scope="module")
def ann_trained_home(
        tmp_path_factory: pytest.TempPathFactory) -> MadeHome[tuple[dict[str, str], dict[str, Any]]]:
    """ann trained once, made once per module: the training was most of the time of each test
    that only starts from a trained model (``settings`` below copies it per test)."""
    return made_once(tmp_path_factory, _ann_trained)


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """conftest's, on a copy of ``ann_trained_home`` for a test that takes ``ann_trained`` (a
    copy each: what one test writes the next does not see)."""
    if "ann_trained" in request.fixturenames:
        request.getfixturevalue("ann_trained_home").copy_to(tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def ann_trained(ann_trained_home: MadeHome[tuple[dict[str, str], dict[str, Any]]],
                client: TestClient) -> tuple[dict[str, str], dict[str, Any]]:
    """ann's headers and her training's terminal answer, on this test's copy of the HOME."""
    return ann_trained_home.made


def test_a_json_body_over_the_cap_is_413_before_it_is_parsed(
        client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    trained(client, h)
    padding = "x" * (services.settings.max_json_bytes + 1)
    r = client.patch("/api/model", headers=h, json={"lora_scale": 0.5, "reason": padding})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"
    assert client.get("/api/model", headers=h).json()["lora_scale"] == 1.0  # not applied


def test_a_chunked_body_is_counted_as_it_streams(client: TestClient, services: Services) -> None:
    h = auth(services, "ann")

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting the bytes can stop it
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"y" * 1024
        yield b'"}'

    r = client.post("/api/generate", headers={**h, "content-type": "application/json"},
                    content=chunks())
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


def test_no_key_is_401_whatever_the_body(client: TestClient, services: Services) -> None:
    # Answered before the body is read: a 10 MB upload without a key costs nothing.
    r = client.post("/api/training/upload-zip",
                    files={"file": ("big.zip", b"\0" * (10 * 1024 * 1024), "application/zip")})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("body", [
    {"prompt": "x", "seed": 9223372036854775808},
    {"prompt": "x", "seed": 2**32},
    {"prompt": "x", "seed": -1},
    {"prompt": "x", "num_outputs": 10**9},
    # An empty or a 2001-character prompt is the service's empty_prompt or prompt_too_long, as
    # the CLI and the Generate page say it (test_generation_gallery.py).
    {"prompt": "x", "lora_scale": 1e308},
    {"prompt": "x", "version_id": "v" * 65},
    {"prompt": "x", "unknown_field": 1},
])
def test_out_of_range_fields_are_422_never_500(client: TestClient, services: Services,
                                               body: dict[str, Any]) -> None:
    h = auth(services, "ann")
    r = client.post("/api/generate", headers=h, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("force", ["yes", 1, "1", "on", "no", 0, "0", "false", 0.0])
def test_delete_me_force_takes_only_json_true_or_false(client: TestClient, services: Services,
                                                        force: Any) -> None:
    """``force`` was the one lax field: "yes", 1, "1" and "on" were read as true (an account
    deleted and its training canceled by a string), "no", 0 and "0" as false."""
    h = auth(services, "ann")
    r = client.request("DELETE", "/api/me", headers=h, json={"confirm": "ann", "force": force})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert client.get("/api/model", headers=h).status_code != 401  # nothing deleted


def test_a_body_that_cannot_be_parsed_is_422_as_documented_not_400(
        client: TestClient, services: Services) -> None:
    """Bytes that are not UTF-8 sent as JSON, and a form whose multipart framing is broken, were
    answered 400 http_error, a status no route's OpenAPI entry declares; a JSON syntax error
    was already 422 invalid_request."""
    h = auth(services, "ann")
    json_type = {**h, "Content-Type": "application/json"}
    for method, path in (("POST", "/api/generate"), ("PATCH", "/api/model"),
                         ("POST", "/api/keys"), ("POST", "/api/training/start")):
        r = client.request(method, path, headers=json_type, content=b"\xff\xfe{")
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_request", path
        assert "body" in r.json()["error"]["message"], path
    boundary = "b164b3aec9cfc4f09329a9a4bee94365"
    r = client.post("/api/training/upload-zip",
                    headers={**h, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                    content=f"--{boundary}\r\n-0.5--{boundary}--\r\n".encode())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "multipart" in r.json()["error"]["message"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_a_json_body_not_in_utf8_is_422_even_with_a_bom(client: TestClient, services: Services,
                                                        encoding: str) -> None:
    """json.loads on bytes detects UTF-16 and UTF-32: a UTF-16 body with its BOM made a key (201)
    though the README says JSON that is not UTF-8 is a 422. A UTF-8 BOM is skipped."""
    h = {**auth(services, "ann"), "Content-Type": "application/json"}
    r = client.post("/api/keys", headers=h, content='{"name": "wide"}'.encode(encoding))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "wide" not in [k["name"] for k in client.get("/api/keys", headers=h).json()["keys"]]
    r = client.post("/api/keys", headers=h, content='{"name": "bom"}'.encode("utf-8-sig"))
    assert r.status_code == 201, r.text
    assert r.json()["key"]["name"] == "bom"


def test_a_body_that_is_only_a_utf8_bom_is_an_empty_body(client: TestClient,
                                                         services: Services) -> None:
    """The README says a UTF-8 BOM is skipped, and an empty body is taken on routes whose body
    is optional; a body of the BOM alone (a Windows tool's "empty" file) was 422 "JSON decode
    error" there. It is an empty body now, with or without a content type."""
    h = auth(services, "ann")
    for headers in ({**h, "Content-Type": "application/json"}, h):
        empty = client.post("/api/keys", headers=headers, content=b"")
        bom = client.post("/api/keys", headers=headers, content=b"\xef\xbb\xbf")
        assert bom.status_code == empty.status_code == 201, bom.text
        start = client.post("/api/training/start", headers=headers, content=b"\xef\xbb\xbf")
        # The service's own answer (no photos yet), not a refusal of the body.
        assert start.json()["error"]["code"] == "no_dataset", start.text
        assert start.json() == client.post("/api/training/start", headers=headers,
                                           content=b"").json()


def test_a_json_body_with_a_duplicate_key_is_422_naming_it(client: TestClient,
                                                           services: Services) -> None:
    """json.loads kept the last of two equal keys: {"lora_scale": 0.5, "lora_scale": 2.5} set 2.5
    (a proxy reading the first saw 0.5); now refused on every JSON route, at any depth."""
    h = auth(services, "ann")
    json_type = {**h, "Content-Type": "application/json"}
    for method, path, body in (
            ("PATCH", "/api/model", b'{"lora_scale": 0.5, "lora_scale": 2.5}'),
            ("POST", "/api/generate", b'{"prompt": "a", "prompt": "b"}'),
            ("POST", "/api/keys", b'{"name": "a", "name": "b"}'),
            ("POST", "/api/training/start", b'{"dataset_id": "x", "dataset_id": "y"}'),
            ("DELETE", "/api/me", b'{"confirm": "ann", "confirm": "ann"}'),
            ("PATCH", "/api/model", b'{"reason": "r", "x": {"k": 1, "k": 2}}')):
        r = client.request(method, path, headers=json_type, content=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_request", path
        assert "appears twice" in r.json()["error"]["message"], path
    assert '"lora_scale"' in client.patch(
        "/api/model", headers=json_type,
        content=b'{"lora_scale": 0.5, "lora_scale": 2.5}').json()["error"]["message"]
    assert client.get("/api/keys", headers=h).json()["keys"][0]["name"] != "b"
    assert client.get("/api/model", headers=h).status_code != 401  # not deleted


def test_every_json_route_of_the_api_parses_its_body_strictly() -> None:
    """A router made without JsonBodyRoute would take duplicate keys again."""
    import importlib
    import pkgutil

    from fastapi.routing import APIRoute

    import selfie_lora.api
    from selfie_lora.api.json_body import JsonBodyRoute
    modules = [importlib.import_module(f"selfie_lora.api.{info.name}")
               for info in pkgutil.iter_modules(selfie_lora.api.__path__)]
    api = [route for module in modules if hasattr(module, "router")
           for route in module.router.routes
           if isinstance(route, APIRoute) and route.path.startswith("/api/")
           and not route.path.startswith("/api/webhooks/")]
    assert len(api) > 20
    assert [r.path for r in api if not isinstance(r, JsonBodyRoute)] == []


def test_more_files_than_the_form_parser_takes_are_too_many_members(
        client: TestClient, services: Services) -> None:
    """1001 files (past Starlette's 1000 files or fields) were answered 422 invalid_request
    "the request's body could not be read: Too many files...", though the form was well made
    and 999 files got too_many_members: a client branching on that code missed it."""
    h = auth(services, "ann")
    limit = services.intake.limits.max_members
    for files, data, sent in (
            ([("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(1001)], None,
             "more than 1000 files sent"),
            ([("files", ("0.jpg", b"x", "image/jpeg"))], {f"f{i}": "x" for i in range(1001)},
             "more than 1000 form fields sent")):
        r = client.post("/api/training/upload", headers=h, files=files, data=data)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == {
            "code": "too_many_members", "details": [],
            "message": f"{sent}; at most {limit} files are accepted"}


@pytest.fixture(params=DATABASES)
def on_each_database(request: pytest.FixtureRequest,
                     tmp_path: Path) -> Iterator[tuple[TestClient, Services]]:
    """The app, with its worker, on each database the service supports: PostgreSQL refuses
    values SQLite stores."""
    url = database_url(request.param, tmp_path)
    fresh_engine(url).dispose()  # PostgreSQL: an empty schema (the services migrate it)
    with serving(make_settings(tmp_path, database_url=url), run_worker=True) as served:
        yield served


def test_the_largest_seed_is_accepted(on_each_database: tuple[TestClient, Services]) -> None:
    """PostgreSQL's 32-bit column refused seeds past 2**31-1 after the pictures were made."""
    client, services = on_each_database
    h = auth(services, "ann")
    trained(client, h)
    r = client.post("/api/generate", headers=h, json={"prompt": "x", "seed": 2**32 - 1})
    assert r.status_code == 200, r.text
    assert r.json()["generation"]["seed"] == 2**32 - 1


@pytest.mark.parametrize("bidi", sorted(BIDI_CONTROLS))
def test_a_prompt_with_a_bidi_override_or_isolate_is_refused_naming_it(
        client: TestClient, bidi: str,
        ann_trained: tuple[dict[str, str], dict[str, Any]]) -> None:
    """'in the alps \u202eevil' was taken: the Generate page showed it raw (text, alt text, the
    Delete button's label, whose date then read backwards) and so did 'generations list'.
    Refused as a key name refuses it, naming the character, before anything is generated."""
    h, _done = ann_trained
    r = client.post("/api/generate", headers=h, json={"prompt": f"in the alps {bidi}evil"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_prompt"), r.text
    named = f"U+{ord(bidi):04X} ({unicodedata.name(bidi)})"
    assert r.json()["error"]["message"] == (f"the prompt holds {named}, which reorders the text "
                                            "after it; remove it")
    assert client.get("/api/generations", headers=h).json()["generations"] == []
    # Key names refuse the same characters, named the same way.
    key = client.post("/api/keys", headers=h, json={"name": f"ci{bidi}"})
    assert key.status_code == 422, key.text
    assert named in key.json()["error"]["message"], key.text
    # The marks pasted Hebrew or Arabic carries reorder nothing after them: taken.
    ok = client.post("/api/generate", headers=h, json={"prompt": "שלום\u200f world"})
    assert ok.status_code == 200, ok.text


def test_a_nul_in_an_id_or_a_prompt_is_422_never_500(
        on_each_database: tuple[TestClient, Services]) -> None:
    """PostgreSQL refuses a NUL in any text: a 500, and for a prompt after the pictures were
    made and stored. Ids in a body and prompts are refused before anything is done; an id in a
    path or a query (and a form's field) is not found, or refused by the database's net."""
    client, services = on_each_database
    h = auth(services, "ann")
    trained(client, h)
    pictures = lambda: sorted(services.settings.home.rglob("*.png"))  # noqa: E731
    before = pictures()
    for method, url, body in [
        ("post", "/api/training/start", {"dataset_id": "x\x00"}),
        ("post", "/api/training/cancel", {"training_id": "x\x00"}),
        ("post", "/api/generate", {"prompt": "x", "version_id": "1\x00"}),
    ]:
        r = getattr(client, method)(url, headers=h, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), url
    r = client.post("/api/generate", headers=h, json={"prompt": "on a beach\x00"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_prompt")
    assert pictures() == before  # refused before anything was generated
    ok = client.post("/api/generate", headers=h, json={"prompt": "on a beach,\r\n\tsmiling"})
    assert ok.status_code == 200, ok.text  # what a text area sends is fine
    for answer in [
        client.get("/api/training/progress", params={"training_id": "x\x00"}, headers=h),
        client.get("/api/training/x%00/samples/1", headers=h),
        client.post("/api/model/versions/x%00/activate", headers=h),
        client.get("/api/generations/x%00/images/0", headers=h),
    ]:
        assert answer.status_code in (404, 422), (answer.request.url, answer.text)
        assert "error" in answer.json()
    signin = client.post("/signin", data={"name": "ann\x00", "password": "whatever-password"})
    assert signin.status_code < 500


@pytest.mark.parametrize("patch", [
    {"trainer_version": "evil/../../x", "reason": "r"},
    {"trainer_version": "local-nonexistent-v9", "reason": "r"},
    {"trainer_version": "ostris/flux-dev-lora-trainer:" + "f" * 64, "reason": "r"},  # not local
    {"trainer_version": "local-flux-v1"},  # no reason
    {"trainer_version": "local-flux-v1", "reason": ""},
])
def test_a_repin_that_could_not_train_is_refused_and_training_goes_on(
        client: TestClient, patch: dict[str, Any],
        ann_trained: tuple[dict[str, str], dict[str, Any]]) -> None:
    h, first = ann_trained
    r = client.patch("/api/model", headers=h, json=patch)
    assert r.status_code == 422, r.text
    assert client.get("/api/model", headers=h).json()["trainer_version"] == (
        first["model"]["trainer_version"])
    # Every later start still works.
    again = client.post("/api/training/start", headers=h, json={})
    assert again.status_code == 202, again.text
    assert wait_terminal(client, h, again.json()["training"]["id"])["training"][
        "status"] == "succeeded"


def test_a_valid_repin_with_a_reason_is_applied_and_logged(
        client: TestClient, ann_trained: tuple[dict[str, str], dict[str, Any]]) -> None:
    h, _done = ann_trained
    r = client.patch("/api/model", headers=h,
                     json={"trainer_version": "local-tiny-v1", "reason": "the v1 recipe"})
    assert r.status_code == 200, r.text
    assert r.json()["trainer_version"] == "local-tiny-v1"
    events = client.get("/api/model/log", headers=h).json()["events"]
    changed = [e for e in events if e["kind"] == "trainer_version_changed"]
    assert changed[-1]["data"]["reason"] == "the v1 recipe"


REPLICATE_HASH = "ab" * 32


@pytest.mark.parametrize("allowed", [(), ("acme/better-trainer",)])
def test_a_repin_to_a_replicate_model_the_operator_did_not_choose_is_refused(
        tmp_path: Path, allowed: tuple[str, ...]) -> None:
    # Any owner/name:<64 hex> was taken: a user re-pinned their model to a model of their own
    # choosing, which every later training ran on (and billed to) the operator's account.
    settings = make_settings(tmp_path, trainer="replicate", replicate_api_token="r8_dummy",
                             replicate_owner="operator", allowed_trainers=allowed)
    with serving(settings) as (client, services):
        h = auth(services, "ann")
        made = client.post(  # a photo large enough for Replicate's 1024 px; makes the model
            "/api/training/upload-zip", headers=h, data={"start": "false"},
            files={"file": ("photos.zip", photo_zip(4, size=1100), "application/zip")})
        assert made.status_code == 202, made.text
        pinned = client.get("/api/model", headers=h).json()["trainer_version"]
        r = client.patch("/api/model", headers=h, json={
            "trainer_version": f"attacker/anything-expensive:{REPLICATE_HASH}",
            "reason": "because", "lora_scale": 0.5})
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert error["code"] == "trainer_not_allowed"
        assert "ostris/flux-dev-lora-trainer" in error["message"]
        assert error["details"] == []
        after = client.get("/api/model", headers=h).json()
        assert (after["trainer_version"], after["lora_scale"]) == (pinned, 1.0)  # nothing changed
        events = client.get("/api/model/log", headers=h).json()["events"]
        assert not [e for e in events if e["kind"] == "trainer_version_changed"]

        # A newer version of the configured trainer, or one of the operator's list, is a move.
        targets = [f"ostris/flux-dev-lora-trainer:{REPLICATE_HASH}"]
        targets += [f"{model}:{'cd' * 32}" for model in allowed]
        for target in targets:
            r = client.patch("/api/model", headers=h,
                             json={"trainer_version": target, "reason": "newer trainer"})
            assert r.status_code == 200, r.text
            assert r.json()["trainer_version"] == target
        r = client.patch("/api/model", headers=h, json={
            "trainer_version": f"acme/better-trainer:{'cd' * 32}", "reason": "r"})
        assert r.status_code == (200 if allowed else 403), r.text


class SlowAnalyzer(FakeFaceAnalyzer):
    """Every photo takes a while to analyse, so concurrent uploads overlap for real."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Any]:
        time.sleep(0.15)
        return super().detect(image, landmarks=landmarks, embed=embed)


@pytest.fixture
def slow_intake(tmp_path: Path) -> Iterator[tuple[TestClient, Services]]:
    settings = make_settings(tmp_path, intake_workers=1)
    services = build_services(
        settings, trainers={"local": FakeTrainer()}, generators={"local": FakeGenerator()},
        face_analyzer=SlowAnalyzer(embed=lambda _image: (0.1,) * 128, box_fraction=0.5))
    with TestClient(create_app(settings, services=services, run_worker=True),
                    raise_server_exceptions=False) as client:
        yield client, services
    services.close()


def test_concurrent_uploads_give_one_training_and_409s_that_store_nothing(
        slow_intake: tuple[TestClient, Services]) -> None:
    client, services = slow_intake
    h = auth(services, "ann")
    statuses: list[int] = []
    barrier = threading.Barrier(5)

    def send() -> None:
        barrier.wait()
        statuses.append(upload(client, h).status_code)

    threads = [threading.Thread(target=send) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [202, 409, 409, 409, 409]
    user = services.users.get_by_name(name="ann")
    with services.engine.connect() as conn:
        from sqlalchemy import text

        datasets = conn.execute(text("SELECT count(*) FROM datasets WHERE user_id = :u"),
                                {"u": user.id}).scalar_one()
    assert datasets == 1
    # The slot is free again once the winner's training ends: the next upload is accepted.
    training = client.get("/api/training/progress", headers=h).json()["training"]
    wait_terminal(client, h, training["id"])
    assert upload(client, h).status_code == 202
