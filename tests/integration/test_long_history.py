"""A user with a long history (many photo sets, trainings, versions): what a page or a route
costs must not grow with it, and lists that grow with every training are paged."""

from __future__ import annotations

import dataclasses
import re
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import event, insert

from selfie_lora.adapters.db.tables import EventRow
from selfie_lora.config import Settings
from selfie_lora.domain.entities import Generation
from selfie_lora.wiring import Services
from tests.conftest import make_settings
from tests.integration.test_web import (
    PASSWORD,
    browser,
    csrf,
    fake_services,
    sign_in,
    train,
    upload,
)
from tests.support.homes import copy_home


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

    def during(self, client: TestClient, url: str, status: int = 200,
               **headers: str) -> list[str]:
        with self._lock:
            self.seen.clear()
        r = client.get(url, headers=headers)
        assert r.status_code == status, r.text
        with self._lock:
            return list(self.seen)


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home where ann, with a password, has one version trained through the pages, made once
    per module (its upload and training were most of each test's time): each test starts from
    a copy of it (``web_settings``)."""
    settings = make_settings(tmp_path_factory.mktemp("trained"))
    services = fake_services(settings)
    try:
        services.users.create(name="ann", password=PASSWORD)
        with browser(settings, services) as client:
            sign_in(client, "ann")
            assert upload(client)[0] == 200
            assert 'data-status="succeeded"' in train(client)
    finally:
        services.close()
    return settings.home


@pytest.fixture
def web_settings(trained_home: Path, tmp_path: Path) -> Settings:
    copy_home(trained_home, tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def svc(web_settings: Settings) -> Iterator[Services]:
    services = fake_services(web_settings)
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
    """ann, signed in, with one version trained through the pages (``trained_home``)."""
    with browser(web_settings, svc) as client:
        sign_in(client, "ann")
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
        with svc.engine.begin() as db:
            # Stamped at the training's time (add_event stamps now), as the flow writes them.
            db.execute(insert(EventRow).values(model_id=model.id, kind="training_queued",
                                               data={"training_id": f"{name}-t{n}"},
                                               created_at=at))


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


# A statement that brings a likeness record's probes (their face embeddings, ~3 KB a probe)
# whole, not taken apart in the database (json_extract(version_quality.probes, ...)).
WHOLE_PROBES = re.compile(r"(?<![(])version_quality\.probes\b")


def history_reads(statements: list[str]) -> list[str]:
    """``statements`` but the API key's check, which reads its user again once the key's
    second in this process's cache is over (on a busy machine, between any two requests)."""
    return [s for s in statements if "\nFROM users" not in s and "\nFROM api_keys" not in s]


def scored_history(svc: Services, name: str, count: int) -> None:
    """``grow_history``, each new version scored as the worker leaves it (v1's record)."""
    grow_history(svc, name, count)
    model = svc.repo.get_model_for_user(svc.users.get_by_name(name=name).id)
    assert model is not None
    records = {r.version_id: r for r in svc.repo.list_likeness(model.id)}
    first = next(r for r in records.values() if r.probes)
    for version in svc.repo.list_versions(model.id):
        if version.id not in records:
            svc.repo.save_likeness(dataclasses.replace(first, version_id=version.id))


def test_the_versions_page_chart_and_lists_read_no_version_s_probes_whatever_their_number(
        trained: TestClient, svc: Services, statements: Statements, key: str) -> None:
    urls = ("/versions", "/versions/chart.png", "/api/model/versions", "/api/model/log")
    scored_history(svc, "ann", 2)
    # Each seen once first: the key's first check reads its user, the comparison's first view
    # of a photo set finds its faces (not costs of the history).
    for url in urls:
        statements.during(trained, url, Authorization=key)
    few = {url: history_reads(statements.during(trained, url, Authorization=key))
           for url in urls}
    scored_history(svc, "ann", 30)
    for url in urls:
        statements.during(trained, url, Authorization=key)
        many = history_reads(statements.during(trained, url, Authorization=key))
        assert len(many) == len(few[url]), url
        # Every version's probes were read (and their JSON decoded) to show its headline
        # scores, the chart's points and the log's entries: ~12 KB a version, each view.
        assert not [s for s in many if WHOLE_PROBES.search(s)
                    and "WHERE version_quality.model_id" in s], url
    # The comparison the page shows reads the two versions it compares, probes and all.
    page = statements.during(trained, "/versions", Authorization=key)
    assert len([s for s in page if WHOLE_PROBES.search(s)]) == 2
    assert "v32 and v33 side by side" in trained.get("/versions").text


def walk(client: TestClient, url: str, limit: int, **headers: str) -> list[dict[str, Any]]:
    """Every page of ``url`` at ``limit`` a page, following ``older``."""
    pages: list[dict[str, Any]] = []
    before: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"before": before} if before else {})
        r = client.get(url, params=params, headers=headers)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        before = pages[-1]["older"]
        if before is None:
            return pages
        assert len(pages) < 100, "no last page"


@pytest.fixture
def key(svc: Services) -> str:
    _key, secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"), name="pages")
    return f"Bearer {secret}"


def test_versions_walk_page_by_page_without_gaps_or_repeats(
        trained: TestClient, svc: Services, key: str) -> None:
    grow_history(svc, "ann", 11)
    whole = trained.get("/api/model/versions", headers={"Authorization": key}).json()
    # No limit: every version, as the contract says.
    assert [v["number"] for v in whole["versions"]] == list(range(12, 0, -1))
    assert whole["older"] is None
    pages = walk(trained, "/api/model/versions", 5, Authorization=key)
    assert [len(p["versions"]) for p in pages] == [5, 5, 2]
    assert [v for p in pages for v in p["versions"]] == whole["versions"]
    for bad in ({"limit": 0}, {"limit": 201}, {"limit": 5, "before": "newest"}):
        r = trained.get("/api/model/versions", params=bad, headers={"Authorization": key})
        assert r.status_code == 422, (bad, r.text)


def test_a_before_past_any_version_number_is_the_newest_page(
        trained: TestClient, svc: Services, key: str) -> None:
    # Bound as is, 2**31 was out of PostgreSQL's INTEGER range and 2**63 out of SQLite's
    # (a 500 that told the client to retry); 9999 was the newest page.
    grow_history(svc, "ann", 6)
    newest = trained.get("/api/model/versions", params={"limit": 5},
                         headers={"Authorization": key}).json()
    for before in ("9999", str(2**31), f"v{2**63}", "9" * 60):
        r = trained.get("/api/model/versions", params={"limit": 5, "before": before},
                        headers={"Authorization": key})
        assert r.status_code == 200, (before[:30], r.text[:300])
        assert r.json() == newest
        page = trained.get("/versions", params={"before": before})
        assert page.status_code == 200
        assert re.findall(r'<tr id="v(\d+)"', page.text) == [str(n) for n in range(7, 0, -1)]
    # Digits other than ASCII's (fullwidth, Arabic-Indic, Devanagari) were read as numbers
    # (str.isdecimal): U+FF11 listed the versions below 1, where activate's 404 said no such
    # version.
    for bad in ("0", "v0", "\u0660", "\uff11", "\u0661", "v\u0967", "1\uff10"):
        r = trained.get("/api/model/versions", params={"limit": 5, "before": bad},
                        headers={"Authorization": key})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_input", (bad, r.text)


def test_a_before_over_64_characters_is_answered_as_a_shorter_one(
        trained: TestClient, svc: Services, key: str) -> None:
    # Capped at 64 characters, a longer one was FastAPI's 422 invalid_request ("the request is
    # not valid") where a shorter one was the newest page, a 422 invalid_input or a 404, and
    # where the Versions page showed its newest page.
    grow_history(svc, "ann", 1)
    auth = {"Authorization": key}
    newest = trained.get("/api/model/versions", params={"limit": 5}, headers=auth).json()
    # 5000 zeros and a 5 (below 5: v2 and v1): zeros in front counted towards int()'s 4300
    # digits, a ValueError (a 500) on both.
    for before in ("9" * 65, "v" + "9" * 5000, "0" * 5000 + "5"):
        r = trained.get("/api/model/versions", params={"limit": 5, "before": before},
                        headers=auth)
        assert r.status_code == 200, r.text[:300]
        assert r.json() == newest
        page = trained.get("/versions", params={"before": before})
        assert page.status_code == 200
        assert re.findall(r'<tr id="v(\d+)"', page.text) == ["2", "1"]
    r = trained.get("/api/model/versions", params={"limit": 5, "before": "v" + "0" * 5000},
                    headers=auth)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["message"] == (
        f"before must be a version number, not 'v{'0' * 63}'... (5001 characters)")
    r = trained.get("/api/model/versions", params={"limit": 5, "before": "x" * 5000},
                    headers=auth)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"] == {  # its start only, not 5000 characters said back
        "code": "invalid_input", "details": [],
        "message": f"before must be a version number, not '{'x' * 64}'... (5000 characters)"}
    for before in ("nope", "x" * 65):
        r = trained.get("/api/model/log", params={"before": before}, headers=auth)
        assert r.status_code == 404, r.text[:300]
        assert r.json()["error"] == {"code": "not_found", "message": "no such training",
                                     "details": []}


def test_an_empty_before_is_the_first_page_as_for_generations(
        trained: TestClient, svc: Services, key: str) -> None:
    # GET /api/generations?before= is its first page (a script passing the last page's older
    # on starts with none), as the Versions page's ?before= is: the versions' was a 422
    # "before must be a version number, not ''", the log's a 404 "no such training".
    grow_history(svc, "ann", 6)
    auth = {"Authorization": key}
    for path in ("/api/model/versions", "/api/model/log"):
        first = trained.get(path, params={"limit": 5}, headers=auth)
        r = trained.get(f"{path}?limit=5&before=", headers=auth)
        assert r.status_code == 200, (path, r.text[:300])
        assert r.json() == first.json()
        assert r.json()["older"] is not None


def test_a_before_that_is_no_number_is_refused_on_the_versions_page_as_by_the_api(
        trained: TestClient, svc: Services, key: str) -> None:
    # The Versions page showed its newest page for a before that is no number, where
    # GET /api/model/versions answers 422 invalid_input: the page now says the API's sentence,
    # whatever the before's length or characters, its Back leading to the newest page.
    grow_history(svc, "ann", 6)
    newest = re.findall(r'<tr id="v(\d+)"', trained.get("/versions").text)
    # Nor a number below 1 ('0', '00', 'v0'): the API refused it, the page showed its newest
    # page (found in review).
    for before in ("newest", "x/../y", "x" * 5000, "\x00", "1\x00", "\x7f", "\uff11",
                   "0", "00", "v0", "v" + "0" * 5000):
        api = trained.get("/api/model/versions", params={"limit": 5, "before": before},
                          headers={"Authorization": key})
        assert api.status_code == 422, (before[:30], api.text[:300])
        said = api.json()["error"]["message"]
        page = trained.get("/versions", params={"before": before})
        assert page.status_code == 422, before[:30]
        assert page.headers["content-type"].startswith("text/html")
        assert (f'<p class="error" role="alert" data-code="invalid_input">{escape(said)}</p>'
                in page.text), (before[:30], page.text[:2000])
        assert '<a href="/versions" data-back>Back</a>' in page.text
    # An empty one is the first page, as the API's (a number past every version's, and one
    # with none below it, are the newest page: test_the_versions_page_shows_the_newest_...).
    page = trained.get("/versions?before=")
    assert page.status_code == 200
    assert re.findall(r'<tr id="v(\d+)"', page.text) == newest


def test_a_before_with_a_control_character_names_nothing_before_any_lookup(
        trained: TestClient, svc: Services, statements: Statements, key: str) -> None:
    # PostgreSQL cannot be asked about a NUL (psycopg refuses it in bound text: a 422
    # unstorable_text) where SQLite answered the 404, and a cursor "1~<NUL>" a page: no id holds
    # a control character, so such a before is the route's 404 without a lookup, on both.
    grow_history(svc, "ann", 1)
    for before in ("\x00", "1~\x00", "ann-t1\x1f", "\x7f"):
        query = urllib.parse.urlencode({"before": before})
        for path, said in (("/api/model/log", "no such training"),
                           ("/api/generations", "no such generation")):
            r = trained.get(f"{path}?{query}", headers={"Authorization": key})
            assert r.status_code == 404, (before, r.text[:300])
            assert r.json()["error"] == {"code": "not_found", "message": said, "details": []}
            ran = statements.during(trained, f"{path}?{query}", 404, Authorization=key)
            assert not [s for s in ran if "\nFROM trainings" in s or "\nFROM generations" in s]
        page = trained.get(f"/generate?{query}")
        assert page.status_code == 404, before
        assert '<p class="error" role="alert" data-code="not_found">no such generation</p>' \
            in page.text


def test_the_log_walks_page_by_page_without_gaps_or_repeats(
        trained: TestClient, svc: Services, key: str) -> None:
    grow_history(svc, "ann", 11)
    whole = trained.get("/api/model/log", params={"limit": 200},
                        headers={"Authorization": key}).json()
    assert len(whole["trainings"]) == 12
    assert whole["older"] is None
    default = trained.get("/api/model/log", headers={"Authorization": key}).json()
    assert default == whole  # 12 trainings: under the default page of 50
    pages = walk(trained, "/api/model/log", 5, Authorization=key)
    assert [len(p["trainings"]) for p in pages] == [5, 5, 2]
    assert [t for p in pages for t in p["trainings"]] == whole["trainings"]
    # Each page has the events of its trainings' time; the pages go back in time.
    assert [e for p in reversed(pages) for e in p["events"]] == whole["events"]
    assert all(p["events"] for p in pages)
    r = trained.get("/api/model/log", params={"before": "nope"}, headers={"Authorization": key})
    assert r.status_code == 404, r.text


def test_a_page_of_the_log_reads_its_own_trainings_not_the_whole_history(
        trained: TestClient, svc: Services, statements: Statements, key: str) -> None:
    scored_history(svc, "ann", 11)
    first, older = "/api/model/log?limit=5", "/api/model/log?limit=5&before=ann-t8"
    statements.during(trained, first, Authorization=key)  # the key's first check reads its user
    few = {url: len(history_reads(statements.during(trained, url, Authorization=key)))
           for url in (first, older)}
    scored_history(svc, "ann", 60)
    pages = walk(trained, "/api/model/log", 5, Authorization=key)
    assert len(pages) == 15
    assert [t["version_number"] for p in pages for t in p["trainings"]] == list(range(72, 0, -1))
    for url, reads in ((first, few[first]), (older.replace("t8", "t40"), few[older])):
        many = history_reads(statements.during(trained, url, Authorization=key))
        assert len(many) == reads, url
        # Each page read every training, version and likeness record of the model (72 of each
        # here) to show 5: the page got slower with every training.
        whole = [s for s in many for table in ("trainings", "versions", "version_quality")
                 if f"\nWHERE {table}.model_id = ?" in s and "LIMIT" not in s and "IN (" not in s]
        assert not whole, (url, whole)


def test_a_page_of_versions_reads_the_likeness_of_its_own_versions_not_the_whole_model(
        trained: TestClient, svc: Services, statements: Statements, key: str) -> None:
    """``GET /api/model/versions?limit=5`` read the likeness summary of every version of the
    model (72 here) to show 5, where the log's pages read only their own."""
    scored_history(svc, "ann", 71)
    whole = trained.get("/api/model/versions", headers={"Authorization": key}).json()
    assert all(v["quality"] is not None for v in whole["versions"])
    first, older = "/api/model/versions?limit=5", "/api/model/versions?limit=5&before=40"
    statements.during(trained, first, Authorization=key)  # the key's first check reads its user
    for url in (first, older):
        reads = [s for s in history_reads(statements.during(trained, url, Authorization=key))
                 if "\nFROM version_quality" in s]
        assert len(reads) == 1, (url, reads)
        # The five shown versions' records, named: not every record of the model.
        assert "IN (" in reads[0], (url, reads)
    pages = walk(trained, "/api/model/versions", 5, Authorization=key)
    # Each version's scores as the whole list has them.
    assert [v for p in pages for v in p["versions"]] == whole["versions"]


def test_the_generate_page_reads_the_versions_once_and_no_likeness_record(
        trained: TestClient, svc: Services, statements: Statements) -> None:
    user = svc.users.get_by_name(name="ann")
    model = svc.repo.get_model_for_user(user.id)
    assert model is not None
    grow_history(svc, "ann", 2)
    for n, vid in enumerate(["ann-v3", "ann-v2", "ann-v3"]):
        svc.repo.add_generation(Generation(
            id=f"g{n}", user_id=user.id, model_id=model.id, version_id=vid, prompt="a hat",
            lora_scale=1.0, seed=n, image_keys=(f"generations/g{n}-0.png",),
            created_at=datetime.now(UTC) + timedelta(seconds=n)))
    few = statements.during(trained, "/generate")
    page = trained.get("/generate").text
    assert "· v3 ·" in page
    assert "· v2 ·" in page
    grow_history(svc, "ann", 30)
    many = statements.during(trained, "/generate")
    assert len(many) == len(few)
    # Every version and likeness record of the model was read to number the pictures shown.
    # The versions are read once now, for the page's Version choice (which lists them all, as
    # the API takes any of them), and never their likeness records.
    assert not [s for s in many if "FROM version_quality" in s]
    assert len([s for s in many if "\nFROM versions \nWHERE versions.model_id" in s
                and "IN (" not in s]) == 1


def test_the_versions_page_shows_the_newest_and_links_to_older_ones(
        trained: TestClient, svc: Services) -> None:
    grow_history(svc, "ann", 59)
    newest = trained.get("/versions").text
    shown = re.findall(r'<tr id="v(\d+)"', newest)
    assert shown == [str(n) for n in range(60, 10, -1)]
    assert 'href="/versions?before=11"' in newest
    older = trained.get("/versions", params={"before": "11"}).text
    assert re.findall(r'<tr id="v(\d+)"', older) == [str(n) for n in range(10, 0, -1)]
    assert "Older versions" not in older
    assert 'href="/versions" class="newest"' in older
    # No version below: the newest page (it was an empty table, "Versions v to v"). A number
    # below 1 is refused, as the API refuses it (test_a_before_that_is_no_number_is_...).
    for none_below in ("1", "v1", "01"):
        page = trained.get("/versions", params={"before": none_below}).text
        assert re.findall(r'<tr id="v(\d+)"', page) == shown, none_below
        assert "Versions v60 to v11 of your model" in page
    # The compare form still offers every version, and the log splits with the table.
    assert older.count("<option value=") == 2 * 60
    log = [len(re.findall(r"<li>", page.split('<ol class="log">')[1].split("</ol>")[0]))
           for page in (newest, older)]
    assert sum(log) == 60
    assert log[1] == 10


def test_activating_on_an_older_page_comes_back_to_that_page_at_the_version(
        trained: TestClient, svc: Services) -> None:
    # It went to /versions, the 50 newest: the version just activated was on none of its rows.
    grow_history(svc, "ann", 59)
    older = trained.get("/versions", params={"before": "11"}).text
    v2 = svc.models.version(user=svc.users.get_by_name(name="ann"), version_id="2")
    form = older.split(f'action="/versions/{v2.id}/activate"')[1].split("</form>")[0]
    assert '<input type="hidden" name="before" value="11">' in form
    r = trained.post(f"/versions/{v2.id}/activate",
                     data={"csrf_token": csrf(trained, "/versions"), "before": "11"},
                     follow_redirects=False)
    assert r.status_code == 303
    # No fragment: a browser scrolled to the row and left the focus on <body>, the notice out
    # of sight and unread (nojs review 2). The notice at the top takes it and says where it is.
    assert r.headers["location"] == "/versions?before=11"
    page = trained.get(r.headers["location"]).text
    assert ('id="done-notice" tabindex="-1" autofocus>Version 2 is now active: new pictures '
            'use it. Its row below is marked active.</p>') in page
    assert '<tr id="v2" data-version-id="' + v2.id + '" class="active">' in page
    # A before that is no version number (an edited form): the newest page.
    v3 = svc.models.version(user=svc.users.get_by_name(name="ann"), version_id="3")
    r = trained.post(f"/versions/{v3.id}/activate",
                     data={"csrf_token": csrf(trained, "/versions"), "before": "x/../y"},
                     follow_redirects=False)
    assert r.headers["location"] == "/versions"
    # Compare keeps the page: the form sends its before back.
    compare = older.split('<form method="get" action="/versions#compare"')[1].split("</form>")[0]
    assert '<input type="hidden" name="before" value="11">' in compare
    shown = trained.get("/versions", params={"a": "1", "b": "2", "before": "11"}).text
    assert re.findall(r'<tr id="v(\d+)"', shown) == [str(n) for n in range(10, 0, -1)]
    assert "v1 and v2 side by side" in shown
    # The newest page carries none.
    assert 'name="before"' not in trained.get("/versions").text


def test_keys_that_work_come_first_newest_first_and_revoked_ones_are_folded(
        trained: TestClient, svc: Services, key: str) -> None:
    ann = svc.users.get_by_name(name="ann")
    made = [svc.users.create_key(user=ann, name=f"k{n}")[0] for n in range(25)]
    for old in made[:-1]:
        svc.users.revoke_key(user=ann, key_id=old.id)
    listed = [k["name"] for k in trained.get("/api/keys", headers={"Authorization": key})
              .json()["keys"]]
    # The API's order stays the stable one, oldest first, each key saying whether it works.
    assert listed == ["default", "pages"] + [f"k{n}" for n in range(25)]
    page = trained.get("/settings").text
    # The page's: working first, newest first ("pages" was made before the 25, "default" with
    # the user), then the most recently revoked, folded; oldest first, the key just made came
    # below every key ever revoked.
    working, folded = page.split('<details class="revoked-keys">')
    assert re.findall(r"<tr><td>(\w+)</td>", working) == ["k24", "pages", "default"]
    assert "Revoked keys (24)" in folded
    assert re.findall(r"<tr><td>(k\d+)</td>", folded) == [f"k{n}" for n in range(23, 3, -1)]
    assert "The 20 most recently revoked are shown" in folded
