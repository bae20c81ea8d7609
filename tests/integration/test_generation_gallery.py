"""A user's generations past the gallery's first page: the Generate page's "Older pictures"
link and ``GET /api/generations``, both paged by the last generation shown.

Every test starts on a copy of ``owners_home``: ann (with a password) and bob own a model."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from selfie_lora.config import Settings
from selfie_lora.domain.entities import Generation
from selfie_lora.errors import ConflictError, ErrorCode
from selfie_lora.services.common import new_id
from selfie_lora.services.generation import GenerationRequest
from selfie_lora.services.ports import GenerationJob
from selfie_lora.testing.fakes import FakeGenerator
from selfie_lora.wiring import Services
from tests.conftest import make_settings
from tests.integration.test_web import PASSWORD, csrf, sign_in
from tests.support.homes import MadeHome, made_once
from tests.support.owners import Owner, own_model


def _ann_and_bob(client: TestClient, services: Services) -> dict[str, Owner]:
    services.users.create(name="ann", password=PASSWORD)  # for the pages' sign_in
    return {name: own_model(client, services, name) for name in ("ann", "bob")}


@pytest.fixture(scope="module")
def owners_home(tmp_path_factory: pytest.TempPathFactory) -> MadeHome[dict[str, Owner]]:
    """A HOME where ann (with a password) and bob each own a model with one version, made once
    per module (their uploads and trainings were most of each test's time)."""
    return made_once(tmp_path_factory, _ann_and_bob)


@pytest.fixture
def settings(owners_home: MadeHome[dict[str, Owner]], tmp_path: Path) -> Settings:
    """conftest's, on a copy of ``owners_home`` (each test its own: what one generates or
    deletes the next does not see)."""
    owners_home.copy_to(tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def owners(owners_home: MadeHome[dict[str, Owner]]) -> dict[str, Owner]:
    """ann's and bob's ``own_model``, in this test's HOME (``settings``)."""
    return owners_home.made


def _generations(services: Services, name: str, count: int) -> list[str]:
    """``count`` generations of ``name``'s, oldest first (their ids)."""
    user = services.users.get_by_name(name=name)
    return [services.generation.generate(
        user=user, request=GenerationRequest(prompt=f"picture {i}", seed=i)).id
        for i in range(count)]


def test_the_oldest_of_51_generations_is_reachable_on_the_page_and_through_the_api(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # Only the 50 newest were ever listed (the page had no paging, GET /api/generations was a
    # 404): the first generation's pictures were stored but could not be found.
    owner = owners["ann"]
    made = _generations(services, "ann", 51)
    sign_in(client, "ann")

    page = client.get("/generate").text
    shown = re.findall(r'<img src="/generations/([^/]+)/0\.png"', page)
    assert shown == made[::-1][:50]
    assert "50 generations shown" in page
    older = re.search(r'<a href="(/generate\?before=[^"]+)" id="older">Older pictures</a>', page)
    assert older, page
    page = client.get(older.group(1)).text
    assert re.findall(r'<img src="/generations/([^/]+)/0\.png"', page) == [made[0]]
    assert "1 generation shown" in page
    assert 'id="older"' not in page

    r = client.get("/api/generations", headers=owner.headers, params={"limit": 30})
    assert r.status_code == 200, r.text
    first = r.json()
    assert [g["id"] for g in first["generations"]] == made[::-1][:30]
    r = client.get("/api/generations", headers=owner.headers,
                   params={"limit": 30, "before": first["older"]})
    second = r.json()
    assert [g["id"] for g in second["generations"]] == made[::-1][30:]
    assert second["older"] is None
    assert second["generations"][-1]["images"] == [f"/api/generations/{made[0]}/images/0"]


def test_an_empty_before_is_the_first_page_as_on_the_generate_page(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # A script passing the last page's "older" on (curl "...?before=$older", 'generations list
    # --before "$older"') starts with none: it was told "no such generation" (404, exit 1).
    owner = owners["ann"]
    made = _generations(services, "ann", 2)
    r = client.get("/api/generations?limit=1&before=", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert [g["id"] for g in r.json()["generations"]] == [made[1]]
    r = client.get("/api/generations", headers=owner.headers,
                   params={"limit": 1, "before": r.json()["older"]})
    assert [g["id"] for g in r.json()["generations"]] == [made[0]]


def test_generations_of_another_user_are_neither_listed_nor_a_cursor(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    ann = owners["ann"]
    bob = owners["bob"]
    [anns] = _generations(services, "ann", 1)
    r = client.get("/api/generations", headers=bob.headers)
    assert r.json() == {"generations": [], "older": None}
    r = client.get("/api/generations", headers=bob.headers, params={"before": anns})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    for limit in (0, 201):
        r = client.get("/api/generations", headers=ann.headers, params={"limit": limit})
        assert r.status_code == 422, r.text
    assert client.get("/api/generations").status_code == 401


def test_a_cursor_whose_time_is_no_ascii_number_is_not_found(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # The cursor's microseconds were read with str.isdigit, which takes a superscript two or
    # any script's digits: "²~x" passed it and int() refused it, a 500 on the API and the
    # Generate page, and "٣~x" (Arabic-Indic 3) was a position, an empty page of none older.
    _generations(services, "ann", 1)
    sign_in(client, "ann")
    for before in ("\u00b2~x", "1\u00b2~x", "\u0663~x", "\uff11~x", "\u2460~x"):
        r = client.get("/api/generations", headers=owners["ann"].headers,
                       params={"before": before})
        assert r.status_code == 404, (before, r.text[:300])
        assert r.json()["error"] == {"code": "not_found", "message": "no such generation",
                                     "details": []}
        page = client.get("/generate", params={"before": before})
        assert page.status_code == 404, before
        assert '<p class="error" role="alert" data-code="not_found">no such generation</p>' \
            in page.text


def test_a_before_naming_no_generation_is_not_found_whatever_its_length(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # Over 64 characters, GET /api/generations answered FastAPI's 422 invalid_request ("the
    # request is not valid"), a shorter one the 404, and the Generate page its Not found page.
    _generations(services, "ann", 1)
    sign_in(client, "ann")
    # A control character (no id has one) too: PostgreSQL could not be asked about a NUL (a
    # 422 unstorable_text), and SQLite showed the cursor "1~<NUL>"'s page.
    for before in ("nope", "x" * 65, "x" * 5000, "\x00", "1~\x00"):
        r = client.get("/api/generations", headers=owners["ann"].headers,
                       params={"before": before})
        assert r.status_code == 404, r.text[:300]
        assert r.json()["error"] == {"code": "not_found", "message": "no such generation",
                                     "details": []}
        page = client.get("/generate", params={"before": before})
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        assert '<p class="error" role="alert" data-code="not_found">no such generation</p>' \
            in page.text
        assert '<a href="/generate" data-back>Back</a>' in page.text  # the newest pictures


def test_the_gallery_shows_each_picture_s_own_seed(client: TestClient, services: Services,
                                                   fake_generator: FakeGenerator) -> None:
    # One "seed 10" stood under a whole batch: picture 3, made with seed 12, could not be made
    # again alone from the page. A withheld picture keeps its place's seed from the others.
    sign_in(client, "ann")
    r = client.post("/generate", data={"csrf_token": csrf(client, "/generate"),
                                       "prompt": "a hike", "num_outputs": "3", "seed": "10"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    fake_generator.withhold = frozenset({1})
    r = client.post("/generate", data={"csrf_token": csrf(client, "/generate"), "prompt": "a lake",
                                       "num_outputs": "3", "seed": "4294967294"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/generate").text
    captions = re.findall(r"<figcaption[^>]*>([^<]+)</figcaption>", page)
    assert captions == ["picture 1 · seed 4294967294", "picture 3 · seed 0",
                        "picture 1 · seed 10", "picture 2 · seed 11", "picture 3 · seed 12"]
    assert 'title="picture 3 · seed 12"' in page


def test_a_1999_character_prompt_of_crlf_lines_is_accepted_and_stored_with_lf(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # The text area (maxlength 2000) counts a line break as 1; the browser sends it as CRLF, and
    # the server counted 2: five lines of 399 (1999 as typed) were refused as longer than 2000.
    owner = owners["ann"]
    sign_in(client, "ann")
    lines = [f"{i}" + "x" * 398 for i in range(5)]
    typed = "\n".join(lines)
    assert len(typed) == 1999
    r = client.post("/generate", data={"csrf_token": csrf(client, "/generate"),
                                       "prompt": "\r\n".join(lines)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": "\r\n".join(lines)})
    assert r.status_code == 200, r.text
    user = services.users.get_by_name(name="ann")
    trigger = services.models.get(user=user).trigger_word
    stored = [g.prompt for g in services.generation.history(user=user)]
    assert len(stored) == 2
    assert all("\r" not in p and typed in p and trigger in p for p in stored), stored
    r = client.post("/api/generate", headers=owner.headers,
                    json={"prompt": "\r\n".join([*lines, "x"])})  # 2001 as counted now
    assert r.status_code == 422, r.text
    assert "2000" in r.text


def test_an_empty_or_too_long_prompt_is_refused_by_the_api_with_the_service_s_codes(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # The body's own bounds answered "" and a 2001-character prompt invalid_request ("the
    # request is not valid"), where "   " was empty_prompt and the CLI and the Generate page
    # said "the prompt is empty" / "is longer than 2000 characters" (prompt_too_long).
    owner = owners["ann"]
    for prompt, code, said in (("", "empty_prompt", "the prompt is empty"),
                               ("   ", "empty_prompt", "the prompt is empty"),
                               ("x" * 2001, "prompt_too_long",
                                "the prompt is longer than 2000 characters")):
        r = client.post("/api/generate", headers=owner.headers, json={"prompt": prompt})
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]) == (
            422, code, said), r.text
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": 5})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), r.text
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": "x" * 2000})
    assert r.status_code == 200, r.text
    declared = client.get("/openapi.json").json()["paths"]["/api/generate"]["post"]["responses"]
    assert "prompt_too_long" in declared["422"]["description"]
    assert len(services.generation.history(user=services.users.get_by_name(name="ann"))) == 1


def test_a_generation_is_deleted_with_its_pictures_by_its_owner_only(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # There was no way to delete one generation (API, page or CLI): only the operator's
    # retention or deleting the whole account.
    ann = owners["ann"]
    bob = owners["bob"]
    first, second = _generations(services, "ann", 2)
    keys = services.repo.get_generation(first).image_keys
    assert all(services.blobs.exists(key) for key in keys)
    r = client.delete(f"/api/generations/{first}", headers=bob.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = client.delete(f"/api/generations/{first}", headers=ann.headers)
    assert (r.status_code, r.json()) == (200, {"deleted": first})  # old code: no such route
    assert not any(services.blobs.exists(key) for key in keys)
    assert client.get(f"/api/generations/{first}/images/0", headers=ann.headers).status_code == 404
    assert client.delete(f"/api/generations/{first}", headers=ann.headers).status_code == 404
    r = client.get("/api/generations", headers=ann.headers)
    assert [g["id"] for g in r.json()["generations"]] == [second]

    sign_in(client, "ann")
    page = client.get("/generate").text
    assert f'action="/generations/{second}/delete"' in page
    r = client.post(f"/generations/{second}/delete", data={"csrf_token": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403
    r = client.post(f"/generations/{second}/delete",
                    data={"csrf_token": csrf(client, "/generate")}, follow_redirects=False)
    # Saying so, at the gallery's heading (no generation is left beside it).
    assert (r.status_code, r.headers["location"]) == (303, "/generate#pictures")
    assert "No pictures yet." in client.get("/generate").text


def test_a_delete_sent_twice_comes_back_to_the_gallery_saying_it_was_deleted_already(
        client: TestClient, services: Services) -> None:
    # The Delete button sent twice (a double click without scripts, another tab's Delete of the
    # same generation): the second answered a "Not found" page, "no such generation", and the
    # user could not tell whether the first had deleted it.
    first, second = _generations(services, "ann", 2)
    sign_in(client, "ann")
    token = csrf(client, "/generate")
    for said in ("Generation deleted.", "That generation was deleted already."):
        r = client.post(f"/generations/{second}/delete",
                        data={"csrf_token": token, "focus": f"g-{first}"}, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, f"/generate#g-{first}"), r.text
        page = client.get(r.headers["location"]).text
        assert f'<p class="notice" role="status" id="deleted-note">{said}</p>' in page, page
        assert re.findall(r'<img src="/generations/([^/]+)/0\.png"', page) == [first]
    assert [g.id for g in services.generation.history(
        user=services.users.get_by_name(name="ann"))] == [first]


def test_the_next_page_comes_when_the_cursor_generation_was_deleted_in_between(
        client: TestClient, services: Services, owners: dict[str, Owner]) -> None:
    # The cursor was the last generation of the page before, looked up as a row: deleted in
    # between (this route, another tab, the retention), every older one was out of reach.
    owner = owners["ann"]
    made = _generations(services, "ann", 4)
    r = client.get("/api/generations", headers=owner.headers, params={"limit": 1})
    first = r.json()
    assert [g["id"] for g in first["generations"]] == [made[3]]
    r = client.get("/api/generations", headers=owner.headers,
                   params={"limit": 1, "before": first["older"]})
    older = r.json()["older"]
    assert [g["id"] for g in r.json()["generations"]] == [made[2]]
    assert client.delete(f"/api/generations/{made[2]}", headers=owner.headers).status_code == 200
    r = client.get("/api/generations", headers=owner.headers,
                   params={"limit": 5, "before": older})
    assert r.status_code == 200, r.text  # old code: 404 "no such generation"
    assert [g["id"] for g in r.json()["generations"]] == [made[1], made[0]]
    assert r.json()["older"] is None
    # A generation's id (the cursor before positions) still pages from it while it exists.
    r = client.get("/api/generations", headers=owner.headers, params={"before": made[1]})
    assert [g["id"] for g in r.json()["generations"]] == [made[0]]
    r = client.get("/api/generations", headers=owner.headers, params={"before": made[2]})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")

    # The page: "Older pictures" after its cursor's generation is deleted, and a Delete on
    # an older page comes back to that page, not to the newest.
    sign_in(client, "ann")
    page = client.get("/generate", params={"before": older})
    assert page.status_code == 200
    assert re.findall(r'<img src="/generations/([^/]+)/0\.png"', page.text) == [made[1], made[0]]
    r = client.post(f"/generations/{made[1]}/delete",
                    data={"csrf_token": csrf(client, "/generate"), "before": older},
                    follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/generate?before={quote(older, safe='')}#pictures"
    page = client.get(r.headers["location"])
    assert re.findall(r'<img src="/generations/([^/]+)/0\.png"', page.text) == [made[0]]
    assert 'name="before"' in page.text


def test_a_generation_id_already_stored_is_refused_before_anything_is_written(
        client: TestClient, services: Services, fake_generator: FakeGenerator) -> None:
    """``GenerationRequest.generation_id`` (the CLI's, named before it generates) was trusted:
    the pictures were put under ``generations/<id>/`` before the row was inserted, so an id
    already stored had another generation's (another user's) pictures overwritten, and only
    then the insert failed. Refused now, before the generator is called, and again before the
    first put (one stored under it while this one rendered)."""
    ann = services.users.get_by_name(name="ann")
    bob = services.users.get_by_name(name="bob")
    anns = services.generation.generate(
        user=ann, request=GenerationRequest(prompt="ann's", seed=1, num_outputs=2))
    pictures = [services.generation.image(user=ann, generation_id=anns.id, index=i)
                for i in range(2)]
    jobs = len(fake_generator.jobs)
    for user in (bob, ann):
        with pytest.raises(ConflictError, match="already stored under the id") as refused:
            services.generation.generate(user=user, request=GenerationRequest(
                prompt="bob's", seed=7, num_outputs=2, generation_id=anns.id))
        assert refused.value.code is ErrorCode.WRITE_CONFLICT
        assert "nothing generated" in refused.value.message
    assert len(fake_generator.jobs) == jobs  # nothing was paid for
    assert [services.generation.image(user=ann, generation_id=anns.id, index=i)
            for i in range(2)] == pictures
    assert services.generation.find(user=bob, generation_id=anns.id) is None

    # Stored under the same id while this one was being made: its pictures are dropped.
    shared = new_id()
    render = fake_generator.generate
    nested: list[Generation] = []

    def first_bob_then_render(job: GenerationJob) -> list[bytes | None]:
        if fake_generator.generate is first_bob_then_render:  # ann's render, not bob's
            fake_generator.generate = render  # type: ignore[method-assign]
            nested.append(services.generation.generate(user=bob, request=GenerationRequest(
                prompt="bob's", seed=3, generation_id=shared)))
        return render(job)

    fake_generator.generate = first_bob_then_render  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="the pictures made are dropped"):
        services.generation.generate(user=ann, request=GenerationRequest(
            prompt="ann's", seed=9, generation_id=shared))
    assert services.generation.find(user=bob, generation_id=shared) == nested[0]
    assert services.generation.find(user=ann, generation_id=shared) is None
    # bob's picture is bob's render's, not ann's.
    again = services.generation.generate(user=bob, request=GenerationRequest(
        prompt="bob's", seed=3))
    assert services.generation.image(user=bob, generation_id=shared, index=0) == \
        services.generation.image(user=bob, generation_id=again.id, index=0)


@pytest.mark.parametrize("withheld", [False, True], ids=["same pictures", "other pictures"])
def test_two_generations_made_at_once_under_one_id_store_one_and_refuse_the_other(
        services: Services, fake_generator: FakeGenerator, monkeypatch: pytest.MonkeyPatch,
        withheld: bool) -> None:
    """The id was checked (twice), then the pictures were put, then the row inserted: two
    generations under one id that both passed the second check both wrote
    ``generations/<id>/<n>.png``, so the one stored could show the other's pictures, and the
    other was refused as a bare "conflicting write: UNIQUE constraint failed". Both are held
    here at their first put, past every check. ``withheld``: their pictures have other places
    (ann's second is withheld, bob's first: no place in common), so neither put meets the
    other's and the row insert decides; the loser's refused insert is counted, as places that
    overlapped (bob's first alone withheld) let a put decide and never reached it."""
    ann = services.users.get_by_name(name="ann")
    bob = services.users.get_by_name(name="bob")
    shared = new_id()
    if withheld:
        render = fake_generator.generate

        def other_places(job: GenerationJob) -> list[bytes | None]:
            made = render(job)  # ann (seed 1) keeps place 0 alone, bob (seed 2) place 1
            return [made[0], None] if job.seed == 1 else [None, *made[1:]]

        fake_generator.generate = other_places  # type: ignore[method-assign]
    both = threading.Barrier(2, timeout=20)
    put = services.blobs.put
    held: set[int] = set()

    def put_together(key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if key.startswith("generations/") and threading.get_ident() not in held:
            held.add(threading.get_ident())
            both.wait()  # each one's first picture: both are past the id's checks
        return put(key, data, if_absent=if_absent)

    monkeypatch.setattr(services.blobs, "put", put_together)
    add_generation = services.repo.add_generation
    inserts_refused: list[str] = []

    def add_counted(generation: Generation) -> None:
        try:
            add_generation(generation)
        except ConflictError:
            inserts_refused.append(generation.prompt)
            raise

    monkeypatch.setattr(services.repo, "add_generation", add_counted)
    outcomes: dict[str, Generation | ConflictError] = {}

    def make(name: str, user_seed: int) -> None:
        user = ann if name == "ann" else bob
        try:
            outcomes[name] = services.generation.generate(user=user, request=GenerationRequest(
                prompt=f"{name}'s", seed=user_seed, num_outputs=2, generation_id=shared))
        except ConflictError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=make, args=(name, seed))
               for name, seed in (("ann", 1), ("bob", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    monkeypatch.undo()
    stored = [name for name, o in outcomes.items() if isinstance(o, Generation)]
    refused = [o for o in outcomes.values() if isinstance(o, ConflictError)]
    assert (len(stored), len(refused)) == (1, 1), outcomes
    # Who decided: a put (the loser stops at its first taken place, before its insert) or,
    # the places being other, the row's primary key.
    assert len(inserts_refused) == (1 if withheld else 0), inserts_refused
    assert refused[0].code is ErrorCode.WRITE_CONFLICT
    assert "already stored under the id" in refused[0].message
    assert "the pictures made are dropped" in refused[0].message
    winner = services.users.get_by_name(name=stored[0])
    generation = services.generation.find(user=winner, generation_id=shared)
    assert generation == outcomes[stored[0]]
    # The stored pictures are the winner's render's, every one, and nothing else is left
    # under the id (the garbage collection keeps whatever is under a stored generation's id).
    again = services.generation.generate(user=winner, request=GenerationRequest(
        prompt=f"{stored[0]}'s", seed=1 if stored[0] == "ann" else 2, num_outputs=2))
    assert [services.generation.image(user=winner, generation_id=shared, index=i)
            for i in range(len(generation.image_keys))] == \
        [services.generation.image(user=winner, generation_id=again.id, index=i)
         for i in range(len(again.image_keys))]
    assert sorted(b.key for b in services.blobs.list(f"generations/{shared}")) == \
        sorted(generation.image_keys)
