"""``selfie-lora users delete NAME``: an account and everything it owns goes, in the database
and in storage; another account's data stays; a run stopped at any step is finished by running
it again (blobs whose rows were already gone included: the plan stored with the rows' deletion
names them); a queued or running training refuses it unless ``--force``."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from selfie_lora import cli, wiring
from selfie_lora.adapters.db import tables
from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.config import Settings
from selfie_lora.domain.entities import Recipe, Training, TrainingStatus, User
from selfie_lora.domain.lease import wait_text
from selfie_lora.errors import (
    ConflictError,
    DatabaseBusyError,
    DatabaseRefusedError,
    DeploymentMismatchError,
    ForbiddenError,
    StorageError,
    StorageUnavailableError,
)
from selfie_lora.services import gc as gc_module
from selfie_lora.services.common import utcnow
from selfie_lora.services.erasure import ERASURE_PARKED
from selfie_lora.services.layout import (
    DEPLOYMENT_KEY,
    PREFIXES,
    checkpoint_key,
    photo_key,
    sample_key,
)
from selfie_lora.services.users import API_KEY_CACHE_TTL, ERASURE_PENDING, UserService
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from selfie_lora.worker import Identity, Worker, start_embedded
from tests.conftest import make_settings, one_person_analyzer, serving
from tests.support.homes import MadeHome, made_once
from tests.support.legacy import legacy_user
from tests.support.owners import Owner, own_model
from tests.support.passwords import fast_password_hashing
from tests.support.photos import photo_zip
from tests.support.s3 import S3Server

ROW_TABLES = (tables.ApiKeyRow, tables.WebSessionRow, tables.ModelRow, tables.DatasetRow,
              tables.TrainingRow, tables.VersionRow, tables.VersionLikenessRow,
              tables.GenerationRow, tables.EventRow, tables.UploadClaimRow, tables.UserRow)


@pytest.fixture(autouse=True)
def _fast_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accounts, not the hash's cost, are under test here (``tests.support.passwords``)."""
    fast_password_hashing(monkeypatch)


@pytest.fixture(autouse=True)
def key_cache_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds each deletion built here (the ``services`` fixture's, the CLI commands' run
    in this process) waited for other API servers' memory of her keys to run out: recorded,
    not slept (a second a deletion, most of these tests' run); that the wait is asked for,
    and how long, is checked in ``test_a_user_and_everything_theirs_is_deleted_and_no_one_elses``
    (what the cache it outwaits does, in test_accounts and test_cli_users_admin)."""
    waits: list[float] = []
    monkeypatch.setattr(wiring, "AccountEraser", functools.partial(
        wiring.AccountEraser, sleep=waits.append))
    return waits


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, list(args), input=stdin)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture
def on_services(services: Services, settings: Settings,
                monkeypatch: pytest.MonkeyPatch) -> Services:
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    return services


def blob_keys(services: Services) -> set[str]:
    return {info.key for prefix in PREFIXES for info in services.blobs.list(prefix)}


def row_counts(services: Services) -> dict[str, int]:
    with services.engine.connect() as c:
        return {t.__tablename__: c.execute(select(func.count()).select_from(t)).scalar_one()
                for t in ROW_TABLES}


def rows_of(services: Services) -> dict[str, list[tuple[Any, ...]]]:
    with services.engine.connect() as c:
        return {t.__tablename__: sorted(tuple(str(v) for v in r)
                                        for r in c.execute(select(t)).all())
                for t in ROW_TABLES}


def furnish(client: TestClient, services: Services, name: str, *, photos: bytes) -> Owner:
    """A user with a trained model, a generation, a session, a second key, a sample image
    and a checkpoint of their training."""
    owner = own_model(client, services, name, photos=photos)
    r = client.post("/api/generate", headers=owner.headers, json={"prompt": "on a beach"})
    assert r.status_code == 200, r.text
    user = services.users.get_by_name(name=name)
    services.users.create_key(user=user, name="second")
    services.users.set_password(user=user, password="a long enough password")
    services.users.sign_in(name=name, password="a long enough password", client="10.0.0.1")
    assert owner.training is not None
    services.blobs.put(sample_key(owner.training["id"], 1), b"sample of " + name.encode())
    services.blobs.put(checkpoint_key(owner.training["id"], 1), b"ckpt of " + name.encode())
    return owner


def mine(keys: set[str], services: Services, owner: Owner) -> set[str]:
    """The keys that name one of the owner's ids."""
    assert owner.training is not None
    assert owner.version is not None
    ids = (owner.model["id"], owner.training["id"], owner.version["id"])
    return {k for k in keys if any(i in k for i in ids)}


@dataclass(frozen=True)
class BobThenAnn:
    """bob furnished (his photos not hers), then ann: the owners, and bob's rows and blob keys
    as they were before ann was furnished (what is left once she is deleted)."""

    bob: Owner
    ann: Owner
    bob_rows: dict[str, list[tuple[Any, ...]]]
    bob_blobs: set[str]


def _furnish_bob_then_ann(client: TestClient, services: Services) -> BobThenAnn:
    bob = furnish(client, services, "bob", photos=photo_zip(3, offset=10))
    bob_rows, bob_blobs = rows_of(services), blob_keys(services)
    ann = furnish(client, services, "ann", photos=photo_zip(4))
    return BobThenAnn(bob=bob, ann=ann, bob_rows=bob_rows, bob_blobs=bob_blobs)


def _furnish_ann(client: TestClient, services: Services) -> Owner:
    return furnish(client, services, "ann", photos=photo_zip(4))


@pytest.fixture(scope="module")
def bob_then_ann_home(tmp_path_factory: pytest.TempPathFactory) -> MadeHome[BobThenAnn]:
    """A HOME furnished once per module with bob then ann (two furnishings were most of each
    test's time): each test that takes ``bob_then_ann`` starts from a copy (``settings``)."""
    with pytest.MonkeyPatch.context() as m:
        fast_password_hashing(m)
        return made_once(tmp_path_factory, _furnish_bob_then_ann)


@pytest.fixture(scope="module")
def ann_home(tmp_path_factory: pytest.TempPathFactory) -> MadeHome[Owner]:
    """A HOME furnished once per module with ann alone, for the tests that take ``ann``."""
    with pytest.MonkeyPatch.context() as m:
        fast_password_hashing(m)
        return made_once(tmp_path_factory, _furnish_ann)


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """conftest's; on a copy of ``bob_then_ann_home`` or ``ann_home`` for a test that takes
    ``bob_then_ann`` or ``ann`` (a copy each: what one test deletes the next still has)."""
    for made in ("bob_then_ann", "ann"):
        if made in request.fixturenames:
            request.getfixturevalue(f"{made}_home").copy_to(tmp_path)
    return make_settings(tmp_path)


@pytest.fixture(name="bob_then_ann")  # named so: a test that forgets to take it fails lint
def bob_then_ann_fixture(bob_then_ann_home: MadeHome[BobThenAnn]) -> BobThenAnn:
    """bob and ann furnished (``furnish``), in this test's HOME (``settings``)."""
    return bob_then_ann_home.made


@pytest.fixture(name="ann")
def ann_fixture(ann_home: MadeHome[Owner]) -> Owner:
    """ann furnished (``furnish``), in this test's HOME (``settings``)."""
    return ann_home.made


def test_a_user_and_everything_theirs_is_deleted_and_no_one_elses(
        on_services: Services, client: TestClient, key_cache_waits: list[float],
        bob_then_ann: BobThenAnn) -> None:
    services = on_services
    bob, ann = bob_then_ann.bob, bob_then_ann.ann
    bob_rows, bob_blobs = bob_then_ann.bob_rows, bob_then_ann.bob_blobs
    assert mine(blob_keys(services), services, ann)  # samples, checkpoints at least
    before = blob_keys(services) - bob_blobs
    assert any(k.startswith("photos/") for k in before)
    assert any(k.startswith("weights/") for k in before)
    assert any(k.startswith("generations/") for k in before)

    # This app (another API server to the command) now remembers her key: the check after the
    # wait below would pass without any wait on a cache that never saw it (ann is furnished
    # once per module, on another app).
    assert client.get("/api/model", headers=ann.headers).status_code == 200
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 0, said
    # Other API servers' memory of her keys waited out, once.
    assert key_cache_waits == [API_KEY_CACHE_TTL.total_seconds()]
    assert "deleted user ann" in said
    assert "rows:" in said
    assert "generations" in said
    assert "versions" in said

    assert blob_keys(services) == bob_blobs  # every blob of hers gone, every one of his kept
    assert rows_of(services) == bob_rows  # every row of hers gone, his untouched
    assert services.repo.get_user_by_name("ann") is None
    # The app here is another API server to the command: its memory of her key lasts the wait
    # the deletion asked for, recorded above, not slept (a 404 within it, once her rows are gone).
    time.sleep(key_cache_waits[0])
    r = client.get("/api/model", headers=ann.headers)
    assert r.status_code == 401
    assert client.get("/api/model", headers=bob.headers).status_code == 200


def test_a_photo_another_user_uploaded_too_is_kept(
        on_services: Services, client: TestClient) -> None:
    services = on_services
    furnish(client, services, "bob", photos=photo_zip(4))
    bob_photos = {k for k in blob_keys(services) if k.startswith("photos/")}
    furnish(client, services, "ann", photos=photo_zip(4))  # the same photos
    code, said = run("users", "delete", "ann", "--yes", "--json")
    assert code == 0, said
    assert json.loads(said.splitlines()[-1])["name"] == "ann"
    assert {k for k in blob_keys(services) if k.startswith("photos/")} == bob_photos


def test_a_photo_uploaded_by_another_user_while_hers_are_deleted_is_written_back(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """Photos are keyed by their content: bob uploading the same photos while ann's are being
    deleted stores them "again" as blobs that exist (made fresh, not written), and the delete
    then removes the file his new row names. The erase holds young blobs aside (on disk: weights
    can be GBs) and writes back each one a row named meanwhile."""
    services = on_services
    real_delete = services.blobs.delete
    uploaded: list[Owner] = []

    def delete_racing_an_upload(key: str) -> None:
        if key.startswith("photos/") and not uploaded:
            uploaded.append(own_model(client, services, "bob", photos=photo_zip(4), versions=0))
        real_delete(key)

    monkeypatch.setattr(services.blobs, "delete", delete_racing_an_upload)
    summary = services.erasure.erase(name="ann")
    assert uploaded  # the race happened
    photos = {k for k in blob_keys(services) if k.startswith("photos/")}
    assert len(photos) == 4, photos  # every photo his upload names is there
    assert photos <= set(summary.blobs.kept)


def test_the_deletion_answer_says_nothing_of_photos_another_account_holds_too(
        on_services: Services, client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """Photos are stored once per content: ann's, uploaded by bob too, stay in the storage. Her
    answer (``DELETE /api/me``, ``users delete``) once listed them as "kept", telling her that
    another account holds the same photo. From her side they are deleted (her reference is
    gone): the answer counts what she had, whoever else holds it; the log keeps the detail."""
    services = on_services
    ann = own_model(client, services, "ann", photos=photo_zip(4), versions=0)
    ann_blobs = {i.key: i.size for p in PREFIXES for i in services.blobs.list(p)}
    ann_photos = {k for k in ann_blobs if k.startswith("photos/")}
    assert ann_photos
    for name in ("bob", "cat"):  # the same photos
        own_model(client, services, name, photos=photo_zip(4), versions=0)
    with caplog.at_level(logging.INFO, logger="selfie_lora"):
        r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ann"})
    assert r.status_code == 200, r.text
    # As if no one else had them: every blob of hers, photos included, and their bytes.
    assert r.json()["deleted"] == {"name": "ann", "rows": r.json()["deleted"]["rows"],
                                   "canceled": [], "blobs": len(ann_blobs),
                                   "bytes": sum(ann_blobs.values())}
    assert ann_photos <= blob_keys(services)  # still there: bob's and cat's
    said = "\n".join(rec.getMessage() for rec in caplog.records)
    assert f"kept {len(ann_photos)} blob(s)" in said  # the operator's detail, in the log
    assert "bob" not in said
    assert "cat" not in said
    # The command's own lines (stdout) as the answer; its log (stderr) is the operator's.
    result = CliRunner().invoke(cli.app, ["users", "delete", "cat", "--yes"])
    assert result.exit_code == 0, result.output
    assert "deleted user cat" in result.stdout
    assert "another account" not in result.stdout
    assert "kept" not in result.stdout
    result = CliRunner().invoke(cli.app, ["users", "delete", "bob", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    assert "kept" not in json.loads(result.stdout.splitlines()[-1])


def test_no_confirmation_at_a_pipe_exits_2_and_an_unknown_name_deletes_nothing(
        on_services: Services, client: TestClient, ann: Owner) -> None:
    services = on_services
    rows, blobs = rows_of(services), blob_keys(services)
    code, said = run("users", "delete", "ann")
    assert code == 2
    assert "--yes" in said
    assert "nothing was deleted" in said
    code, said = run("users", "delete", "nobody", "--yes")
    assert code == 1
    assert "no user named 'nobody'" in said
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)


def a_training_of(services: Services, name: str, training_id: str, **fields: Any) -> Training:
    """A training of the user's model on her latest photos (queued, local, unless ``fields``
    say otherwise), not yet stored."""
    user = services.users.get_by_name(name=name)
    model = services.repo.get_model_for_user(user.id)
    dataset = services.repo.latest_accepted_dataset(user.id)
    assert model is not None
    assert dataset is not None
    chosen: dict[str, Any] = {"backend": "local", "status": TrainingStatus.QUEUED,
                              "created_at": utcnow(), **fields}
    return Training(
        id=training_id, model_id=model.id, dataset_id=dataset.id, is_retraining=False,
        trigger_word=model.trigger_word, destination=model.destination,
        trainer_version=model.trainer_version,
        recipe=Recipe(name="local-tiny-v1", steps=4, lora_rank=4, learning_rate=1e-2,
                      resolution=64),
        preserved={}, **chosen)


def test_a_training_running_refuses_without_force_and_force_cancels_it(
        on_services: Services, client: TestClient) -> None:
    services = on_services
    ann = own_model(client, services, "ann", photos=photo_zip(4), versions=0)
    # Queued in the database only: no worker is sent it, so it stays queued.
    training_id = "queued-one"
    services.repo.add_training(a_training_of(services, "ann", training_id))
    rows = rows_of(services)
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 1, said
    assert "training queued or running" in said
    assert "--force" in said
    # Only what the command line offers: it has no command that cancels a training.
    assert "cancel it first" not in said
    assert rows_of(services) == rows  # nothing changed, not even disabled
    # The API's own words: its parameter is "force": true, not the CLI's --force.
    r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ann"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "training_in_progress"
    said_api = r.json()["error"]["message"]
    assert '"force": true' in said_api
    assert "--force" not in said_api
    assert rows_of(services) == rows
    code, said = run("users", "delete", "ann", "--yes", "--force")
    assert code == 0, said
    assert f"canceled training {training_id}" in said
    assert services.repo.get_user_by_name("ann") is None
    assert row_counts(services)["trainings"] == 0


def test_a_training_started_while_the_delete_disabled_her_says_the_deletion_will_finish(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training started between the command's check and the disabling stops it at "started".
    The disabling recorded the deletion as asked for, so a worker or gc finishes it, forced,
    without anyone acting: the command said only "run again with --force", as if nothing would
    happen otherwise (erasure review 2)."""
    services = on_services
    own_model(client, services, "ann", photos=photo_zip(4), versions=0)
    started = a_training_of(services, "ann", "started-meanwhile")
    disable = UserService.disable_by_id

    def disable_while_one_starts(self: UserService, **kwargs: Any) -> Any:
        services.repo.add_training(started)
        return disable(self, **kwargs)

    monkeypatch.setattr(UserService, "disable_by_id", disable_while_one_starts)
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 1, said
    assert "started a training meanwhile (started-meanwhile)" in said
    assert "--force" in said
    assert "gc finishes the deletion within minutes" in said
    gone = services.repo.get_user_by_name("ann")
    assert gone is not None
    assert gone.erasure_requested_at is not None  # what finishes it


STEPS = ("disable", "delete_user_data", "erase", "delete_user")


@pytest.mark.parametrize("step", STEPS)
def test_a_delete_stopped_at_any_step_is_finished_by_running_it_again(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        step: str, bob_then_ann: BobThenAnn) -> None:
    services = on_services
    bob_rows = bob_then_ann.bob_rows
    bob_blobs_before = bob_then_ann.bob_blobs

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt(f"killed at {step}")

    targets: dict[str, tuple[object, str]] = {
        "disable": (services.users, "disable_by_id"),
        "delete_user_data": (services.repo, "delete_user_data"),
        "erase": (services.gc, "erase"),
        "delete_user": (services.repo, "delete_user"),
    }
    obj, attr = targets[step]
    eraser = services.erasure
    with monkeypatch.context() as m:
        m.setattr(obj, attr, crash)
        with pytest.raises(KeyboardInterrupt):
            eraser.erase(name="ann")
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 0, said
    assert services.repo.get_user_by_name("ann") is None
    assert rows_of(services) == bob_rows
    # Killed after her rows went ("erase", "delete_user"): the plan stored with that deletion
    # names her blobs, so the run again deletes them at once, not a gc a day later.
    assert blob_keys(services) == bob_blobs_before


class DiesMidway:
    """The blob store of the collection, killed (KeyboardInterrupt) at its ``after``-th delete:
    a process stopped while deleting her blobs, some gone and some not."""

    def __init__(self, blobs: Any, *, after: int) -> None:
        self._blobs = blobs
        self._left = after

    def delete(self, key: str) -> None:
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt(f"killed deleting {key}")
        self._blobs.delete(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blobs, name)


def test_a_delete_killed_while_deleting_her_blobs_deletes_the_rest_when_run_again(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        bob_then_ann: BobThenAnn) -> None:
    """Her rows are gone, some of her blobs too: the run again deletes her photos, weights and
    the rest at once, from the plan stored with her rows' deletion (her rows no longer name
    them; a gc would wait out its 24 h grace), and then her user row."""
    services = on_services
    bob_rows, bob_blobs = bob_then_ann.bob_rows, bob_then_ann.bob_blobs
    hers = blob_keys(services) - bob_blobs
    assert {k.split("/", 1)[0] for k in hers} >= {"photos", "weights", "generations"}
    with monkeypatch.context() as m:
        m.setattr(services.gc, "_blobs", DiesMidway(services.blobs, after=2))
        with pytest.raises(KeyboardInterrupt):
            services.erasure.erase(name="ann")
    left = blob_keys(services) - bob_blobs
    assert len(left) == len(hers) - 1  # one deleted, then killed
    assert services.repo.erasure_plan(services.users.get_by_name(name="ann").id) is not None
    assert row_counts(services)["users"] == 2  # hers, disabled, and his

    summary = services.erasure.erase(name="ann")
    assert summary.rows == {}  # nothing of hers was left but the user row
    assert {p.key for p in summary.blobs.deleted} >= left
    assert blob_keys(services) == bob_blobs  # her photos, weights, pictures: gone now
    assert rows_of(services) == bob_rows
    assert services.repo.get_user_by_name("ann") is None


def in_a_child(act: Callable[[], int], *, services: Services, blob_class: type,
               after_delete: Callable[[str], None],
               before_delete: Callable[[str], None] = lambda _key: None) -> int:
    """``act`` in a child process, with ``before_delete`` and ``after_delete`` run around each
    delete of ``blob_class`` (the store's: the command builds a store of its own); the child's
    exit status, as a shell says it (-15: ended by SIGTERM)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which never returns into pytest
        code = 1
        try:
            services.engine.dispose(close=False)  # the parent's connections stay the parent's
            real_delete = blob_class.delete

            def delete(self: object, key: str) -> None:
                before_delete(key)
                real_delete(self, key)
                after_delete(key)

            blob_class.delete = delete
            code = act()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def erase_killed(services: Services, *, dies_after: Callable[[str], bool],
                 before_delete: Callable[[str], None] = lambda _key: None) -> None:
    """``erase("ann")`` in a child process that dies as under ``kill -9`` (``os._exit``: no
    ``finally``, no ``with`` block's exit) right after deleting the blob ``dies_after`` picks;
    ``before_delete`` runs before each delete (an upload racing it)."""
    def die(key: str) -> None:
        if dies_after(key):
            os._exit(137)

    def act() -> int:
        services.erasure.erase(name="ann")
        return 0

    assert in_a_child(act, services=services, blob_class=type(services.blobs),
                      after_delete=die, before_delete=before_delete) == 137


def nth_photo(n: int) -> Callable[[str], bool]:
    seen: list[str] = []

    def pick(key: str) -> bool:
        if key.startswith("photos/"):
            seen.append(key)
        return len(seen) == n and seen[-1] == key

    return pick


def copies_of(contents: set[bytes], tmp_path: Path, store: Path) -> list[Path]:
    """The files under ``tmp_path`` (HOME and the temporary folder) but outside the store that
    hold one of ``contents``."""
    return [p for p in tmp_path.rglob("*")
            if p.is_file() and store not in p.parents and p.read_bytes() in contents]


def bob_and_ann(services: Services, furnished: BobThenAnn, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], set[bytes]]:
    """Bob's blob keys, then the bytes of ann's photos and weights, both furnished
    (``bob_then_ann``); the system's temporary folder moved under ``tmp_path``, where
    ``copies_of`` looks."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bob_blobs = furnished.bob_blobs
    return bob_blobs, {services.blobs.get(k) for k in blob_keys(services) - bob_blobs
                       if k.startswith(("photos/", "weights/"))}


@pytest.mark.parametrize("settled_by", ["users delete", "gc"])
def test_a_delete_killed_while_holding_her_photos_leaves_no_copy_once_settled(
        on_services: Services, client: TestClient, settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, settled_by: str,
        bob_then_ann: BobThenAnn) -> None:
    """Her young photos and weights are copied aside while deleted (an upload of the same bytes
    may name them meanwhile). Killed with ``kill -9`` while holding them, the copies stayed in
    the system's temporary folder for ever; they are in HOME/work now, where the command run
    again, or a collection, settles them: no copy of her face is left anywhere."""
    services = on_services
    bob_blobs, hers = bob_and_ann(services, bob_then_ann, tmp_path, monkeypatch)
    erase_killed(services, dies_after=nth_photo(2))
    assert copies_of(hers, tmp_path, settings.blob_dir)  # held while she was being deleted

    if settled_by == "gc":
        code, said = run("gc")
        assert code == 0, said
        assert "settled 1 hold(s)" in said
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 0, said
    assert blob_keys(services) == bob_blobs
    assert copies_of(hers, tmp_path, settings.blob_dir) == []
    assert not list(settings.work_dir.glob("*erase-hold-*"))


@pytest.mark.parametrize("check", ["finish_erasures", "collect_garbage"])
def test_an_api_server_settles_the_hold_its_killed_delete_left_though_it_claims_nothing(
        on_services: Services, client: TestClient, settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, check: str,
        bob_then_ann: BobThenAnn) -> None:
    """``DELETE /api/me`` is answered by the API servers (``serve --no-worker``), so a killed
    one's hold lies on its machine. It was settled only by a deletion that server claimed
    itself (a worker usually claims it first, and finishes her rows and blobs without seeing
    the hold) or a ``gc`` run by hand there: her face photos stayed in its HOME/work. Now the
    API server's every check settles its machine's holds, a deletion claimed or not, and its
    periodic pass over the machine (no collection: no lease, no listing) does too."""
    services = on_services
    _bob_blobs, hers = bob_and_ann(services, bob_then_ann, tmp_path, monkeypatch)
    erase_killed(services, dies_after=nth_photo(2))
    assert copies_of(hers, tmp_path, settings.blob_dir)
    worker = start_embedded(services, consume=False)  # as serve --no-worker starts it
    try:
        # Her deletion is not due (asked for a moment ago): nothing is claimed.
        getattr(worker, check)()
    finally:
        worker.stop()
    assert copies_of(hers, tmp_path, settings.blob_dir) == []
    assert not list(settings.work_dir.glob("*erase-hold-*"))


def test_the_holds_folder_entries_are_on_disk_before_each_held_blob_is_deleted(
        on_services: Services, client: TestClient, settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        bob_then_ann: BobThenAnn) -> None:
    """The held copies and the manifest were fsynced, but not their folder: a power cut after
    the store's delete could leave a manifest naming a copy whose name never reached the disk
    (or the manifest before it, or the hold under its staging name). Now the work folder once
    the hold is in view, and the hold after each copy and manifest, are fsynced before the
    blob it holds is deleted."""
    services = on_services
    bob_and_ann(services, bob_then_ann, tmp_path, monkeypatch)
    events: list[tuple[str, str]] = []
    # Recorded, not done: the order is what is checked (raising=False: old code had none).
    monkeypatch.setattr(gc_module, "fsync_dir",
                        lambda folder: events.append(("fsync_dir", str(folder))),
                        raising=False)
    delete = services.blobs.delete

    def recorded_delete(key: str) -> None:
        events.append(("delete", key))
        delete(key)

    monkeypatch.setattr(services.blobs, "delete", recorded_delete)
    services.erasure.erase(name="ann")
    held = [i for i, (what, key) in enumerate(events)
            if what == "delete" and key.startswith(("photos/", "originals/", "weights/"))]
    assert held  # her young photos and weights were held while deleted
    work = str(settings.work_dir)
    assert ("fsync_dir", work) in events[:held[0]]  # the hold in view, on disk
    for i in held:
        what, folder = events[i - 1]
        assert what == "fsync_dir", events[i - 1]
        assert Path(folder).parent == settings.work_dir, folder
        assert Path(folder).name.startswith(gc_module.HOLD_PREFIX), folder


def test_users_delete_stopped_by_sigterm_settles_what_it_held_and_exits_143(
        on_services: Services, client: TestClient, settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        bob_then_ann: BobThenAnn) -> None:
    """SIGTERM (``timeout``, systemd, ``docker stop``) ended the command on the spot, its
    copies of her photos left behind; it stops as Ctrl-C does now: the hold is settled on the
    way out, and the command run again finishes."""
    services = on_services
    bob_blobs, hers = bob_and_ann(services, bob_then_ann, tmp_path, monkeypatch)
    pick = nth_photo(2)

    def terminate(key: str) -> None:
        if pick(key):
            os.kill(os.getpid(), signal.SIGTERM)

    code = in_a_child(lambda: run("users", "delete", "ann", "--yes")[0], services=services,
                      blob_class=type(services.blobs), after_delete=terminate)
    assert code == 143
    assert copies_of(hers, tmp_path, settings.blob_dir) == []
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 0, said
    assert blob_keys(services) == bob_blobs


def test_a_photo_uploaded_by_another_user_while_a_killed_delete_held_it_is_written_back(
        on_services: Services, client: TestClient, settings: Settings, ann: Owner) -> None:
    """As above, with bob uploading the same photos while hers are deleted, and the delete
    killed before it wrote them back: the run again writes back each one his rows name from
    the copies held, and his dataset is whole."""
    services = on_services
    bob, _secret = services.users.create(name="bob")
    uploaded: list[str] = []

    def racing_upload(key: str) -> None:
        if key.startswith("photos/") and not uploaded:
            result = services.training.upload_zip(user=bob, data=photo_zip(4), start=False)
            uploaded.append(result.dataset.id)  # in the child: the parent reads the rows

    erase_killed(services, dies_after=nth_photo(4), before_delete=racing_upload)
    assert not {k for k in blob_keys(services) if k.startswith("photos/")}  # all four deleted
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 0, said
    named = {photo_key(sha) for d in services.repo.gc_references().datasets
             for sha in d.photo_hashes}
    assert len(named) == 4  # his upload committed, in the killed child
    photos = {k for k in blob_keys(services) if k.startswith("photos/")}
    assert photos == named
    assert len(photos) == 4, photos  # every photo his upload names is there
    assert not list(settings.work_dir.glob("*erase-hold-*"))


def test_a_deleted_users_queued_training_is_not_left_in_the_count(
        on_services: Services, client: TestClient, ann: Owner) -> None:
    """The status counts the metrics read no longer hold hers."""
    services = on_services
    assert run("users", "delete", "ann", "--yes")[0] == 0
    counts = services.repo.count_trainings_by_status()
    assert counts.get(TrainingStatus.SUCCEEDED, 0) == 0


def test_a_user_deletes_their_own_account_through_the_api(
        on_services: Services, client: TestClient, bob_then_ann: BobThenAnn) -> None:
    services = on_services
    bob, ann = bob_then_ann.bob, bob_then_ann.ann
    bob_rows, bob_blobs = bob_then_ann.bob_rows, bob_then_ann.bob_blobs
    r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "bob"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_input"
    assert services.repo.get_user_by_name("ann") is not None
    r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ann"})
    assert r.status_code == 200, r.text
    assert r.json()["deleted"]["name"] == "ann"
    assert r.json()["deleted"]["blobs"] > 0
    assert (rows_of(services), blob_keys(services)) == (bob_rows, bob_blobs)
    assert client.get("/api/model", headers=ann.headers).status_code == 401
    assert client.get("/api/model", headers=bob.headers).status_code == 200


class _AtATerminal:
    """``sys`` as the CLI sees it, its standard input a terminal (CliRunner's is not)."""

    def __getattr__(self, name: str) -> Any:
        import sys

        if name == "stdin":
            return _TerminalStdin(sys.stdin)
        return getattr(sys, name)


class _TerminalStdin:
    def __init__(self, stdin: Any) -> None:
        self._stdin = stdin

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stdin, name)


def test_the_name_typed_to_confirm_a_deletion_is_taken_in_any_case_everywhere(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """A name is one whatever its case (signing in, the Settings page's Delete): DELETE /api/me
    refused {"confirm": "ANN"} for ann (422 invalid_input) and ``users delete`` at a terminal
    refused "ANN" typed, while the Settings page took it."""
    services = on_services
    r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ANN"})
    assert r.status_code == 200, r.text
    assert services.repo.get_user_by_name("ann") is None
    furnish(client, services, "bob", photos=photo_zip(3, offset=10))
    # At a terminal (CliRunner's stdin is none): the command asks for the name.
    monkeypatch.setattr(cli, "sys", _AtATerminal())
    code, said = run("users", "delete", "bob", stdin="Bob\n")
    assert code == 0, said
    assert services.repo.get_user_by_name("bob") is None


def interrupt_her_api_delete(services: Services, client: TestClient, ann: Owner,
                             monkeypatch: pytest.MonkeyPatch, *, step: str) -> str:
    """``DELETE /api/me`` of ann's, its server dying (an exception) at ``step``: before her
    rows are deleted (``delete_user_data``) or after (``erase``). Her id."""
    obj: object = services.repo if step == "delete_user_data" else services.gc

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"the server died at {step}")

    with monkeypatch.context() as m:
        m.setattr(obj, step, crash)
        r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ann"})
    assert r.status_code == 500, r.text
    return services.users.get_by_name(name="ann").id


def backdate_her_request(services: Services, user_id: str) -> None:
    """As if her deletion had been asked for an hour ago (past ``resume_after``)."""
    assert services.erasure.resume_after < timedelta(hours=1)
    assert services.repo.request_erasure(user_id, at=utcnow() - timedelta(hours=1))


def her_deletion_due(services: Services, client: TestClient, ann: Owner,
                     monkeypatch: pytest.MonkeyPatch) -> User:
    """ann's account with its data (``ann``), whose ``DELETE /api/me`` died before her rows
    went, asked for an hour ago: due for ``finish_pending``. Her user row as it is then."""
    ann_id = interrupt_her_api_delete(services, client, ann, monkeypatch,
                                      step="delete_user_data")
    backdate_her_request(services, ann_id)
    asked = services.repo.get_user(ann_id)
    assert asked is not None
    return asked


def erasures_worker(services: Services) -> Worker:
    """A worker that only finishes pending deletions, as ``serve --no-worker``'s does, checking
    every 50 ms; not started."""
    return Worker(training=services.training, queue=services.queue,
                  identity=Identity(name="api"), threads=0, erasure=services.erasure,
                  erase_check_seconds=0.05)


@pytest.mark.parametrize("step", ["delete_user_data", "erase"])
def test_an_api_delete_whose_server_died_is_finished_by_the_workers_reconciler(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        step: str, bob_then_ann: BobThenAnn) -> None:
    """She cannot run it again (her account is disabled, her keys perhaps gone): she is told
    the deletion finishes on its own, the operator sees it pending, and ``serve --no-worker``'s
    reconciler-only worker (as every collecting worker) finishes it once it is overdue."""
    services = on_services
    ann = bob_then_ann.ann
    bob_rows, bob_blobs = bob_then_ann.bob_rows, bob_then_ann.bob_blobs
    ann_id = interrupt_her_api_delete(services, client, ann, monkeypatch, step=step)

    r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ann"})
    if step == "delete_user_data":  # her key still there: refused, and told why
        assert r.status_code == 403, r.text
        assert r.json()["error"]["message"] == ERASURE_PENDING
    else:  # her keys went with her rows
        assert r.status_code == 401, r.text
    with pytest.raises(ForbiddenError) as refused:
        services.users.sign_in(name="ann", password="a long enough password",
                               client="10.0.0.1")
    assert refused.value.message == ERASURE_PENDING
    listed = {u["name"]: u for u in json.loads(run("users", "list", "--json")[1])}
    assert listed["ann"]["deletion_requested_at"]
    assert listed["bob"]["deletion_requested_at"] is None
    table = run("users", "list")[1]
    assert "deletion" in table
    assert "pending" in table
    with pytest.raises(ConflictError):
        services.users.enable(name="ann")  # the operator cannot undo it halfway

    assert services.erasure.finish_pending() == []  # a live deletion may still be running
    assert services.repo.get_user_by_name("ann") is not None
    backdate_her_request(services, ann_id)
    worker = erasures_worker(services)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while services.repo.get_user(ann_id) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert services.repo.get_user(ann_id) is None
    assert rows_of(services) == bob_rows
    assert blob_keys(services) == bob_blobs  # at once: not left to a gc's 24 h grace
    assert services.erasure.finish_pending() == []  # finished once


def test_a_worker_waiting_on_another_workers_training_to_finish_a_deletion_stops_at_once(
        on_services: Services, client: TestClient) -> None:
    """The erasures thread waited up to 30 s for another worker to stop her training, deaf to
    its own worker's stop: SIGTERM of serve took 22.6 s, a worker's SIGINT 29 s (ops review 3).
    Now the wait ends with the stop, and the deletion stays pending for the next check."""
    services = on_services
    own_model(client, services, "ann", photos=photo_zip(4), versions=0)
    user = services.users.get_by_name(name="ann")
    alive = utcnow() + timedelta(days=1)
    services.repo.add_training(a_training_of(
        services, "ann", "held-elsewhere", status=TrainingStatus.PROCESSING,
        started_at=utcnow(), lease_owner="otherhost/w9", lease_expires_at=alive,
        heartbeat_at=alive))
    services.users.disable(name="ann", for_erasure=True)
    backdate_her_request(services, user.id)
    worker = erasures_worker(services)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the thread asked the other worker, and waits
            held = services.repo.get_training("held-elsewhere")
            if held is not None and held.cancel_requested:
                break
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        began = time.monotonic()
        stopped = worker.stop(grace=10)
        took = time.monotonic() - began
    assert stopped
    assert took < 3, took
    assert services.repo.get_user(user.id) is not None  # pending still, for the next check


def test_a_deletion_finished_by_a_worker_logs_the_line_readme_quotes(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, ann: Owner) -> None:
    """README: workers and gc "print and log `deleted user NAME`"; the log said `user NAME
    deleted: ...` (ops review 5)."""
    services = on_services
    ann_id = interrupt_her_api_delete(services, client, ann, monkeypatch, step="erase")
    backdate_her_request(services, ann_id)
    caplog.set_level(logging.INFO, logger="selfie_lora.services.erasure")
    assert [s.name for s in services.erasure.finish_pending()] == ["ann"]
    assert any(m.startswith("deleted user ann:") for m in caplog.messages), caplog.messages


def test_an_account_being_deleted_gets_no_key_nor_password_and_is_not_said_kept(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """Its deletion under way (its process died), ``users disable`` said 'data kept' (an
    operator hoping to stop the deletion so was told it worked), and ``users keys create``,
    ``keys rotate`` and ``users password`` printed a key or set a password that every request
    refuses (403 'being deleted'). Each is refused now, as ``users enable`` is, in the service:
    the API's and the Settings page's routes too."""
    services = on_services
    interrupt_her_api_delete(services, client, ann, monkeypatch, step="delete_user_data")
    her_keys = services.users.keys(user=services.users.get_by_name(name="ann"))
    her_key = her_keys[0].id
    for args, stdin in ((("users", "disable", "ann"), None),
                        (("users", "keys", "create", "ann"), None),
                        (("users", "keys", "rotate", "ann", her_key), None),
                        (("users", "password", "ann"), "a long enough password\n" * 2)):
        code, said = run(*args, stdin=stdin)
        assert code == 1, (args, said)
        assert "ann is being deleted" in said, (args, said)
        assert "finishes on its own" in said, (args, said)
        assert "data kept" not in said
        assert "sl_" not in said  # no secret shown
    her = services.users.get_by_name(name="ann")
    with pytest.raises(ConflictError):
        services.users.create_key(user=her, name="web")
    with pytest.raises(ConflictError):
        services.users.rotate_key(user=her, key_id=her_key)
    with pytest.raises(ConflictError):
        services.users.set_password(user=her, password="a long enough password")
    assert services.users.keys(user=her) == her_keys  # none made, none rotated
    assert services.users.get_by_name(name="ann").erasure_requested_at is not None
    # The deletion itself still disables her again on its way (``users delete`` run again).
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 0, said
    assert services.repo.get_user_by_name("ann") is None


def test_gc_finishes_an_api_delete_whose_server_died(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        bob_then_ann: BobThenAnn) -> None:
    services = on_services
    ann = bob_then_ann.ann
    bob_rows, bob_blobs = bob_then_ann.bob_rows, bob_then_ann.bob_blobs
    ann_id = interrupt_her_api_delete(services, client, ann, monkeypatch,
                                      step="delete_user_data")
    backdate_her_request(services, ann_id)
    code, said = run("gc", "--dry-run")
    assert code == 0, said
    assert services.repo.get_user(ann_id) is not None  # a dry run deletes nothing
    code, said = run("gc")
    assert code == 0, said
    assert "deleted user ann" in said
    assert (rows_of(services), blob_keys(services)) == (bob_rows, bob_blobs)
    code, said = run("gc")
    assert "deleted user" not in said


def test_gc_interrupted_while_finishing_a_deletion_lets_the_next_gc_go_on(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """Interrupted, gc said "run gc again to go on", but its claim had moved the deletion's
    time to now: the next gc skipped it, silently, for 10 min 31 s (ops review 4). Now the
    claim is given back: the next gc finishes it."""
    services = on_services
    asked = her_deletion_due(services, client, ann, monkeypatch)
    ann_id = asked.id

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(gc_module.GarbageCollector, "erase", interrupted)
        code, said = run("gc")
    assert code == 130, said
    assert "run gc again to go on" in said
    left = services.repo.get_user(ann_id)
    assert left is not None
    assert left.erasure_requested_at == asked.erasure_requested_at
    code, said = run("gc")
    assert code == 0, said
    assert "deleted user ann" in said
    assert services.repo.get_user(ann_id) is None


def test_gc_leaves_a_deletion_whose_replicate_run_it_cannot_cancel_to_a_worker(
        on_services: Services, client: TestClient, settings: Settings) -> None:
    """gc has no trainers: finishing her deletion, it canceled her Replicate training (its
    worker gone) on the row alone, then deleted the row that owed the remote cancel, so the run
    went on, billed, training on her face (ops review 2). Now gc leaves the deletion to a
    worker, whose trainer sends the cancel before the row goes."""
    services = on_services
    own_model(client, services, "ann", photos=photo_zip(4), versions=0)
    user = services.users.get_by_name(name="ann")
    long_ago = utcnow() - timedelta(hours=2)
    services.repo.add_training(a_training_of(
        services, "ann", "on-replicate", backend="replicate", status=TrainingStatus.PROCESSING,
        created_at=long_ago, started_at=long_ago, remote_id="remote-xyz-123",
        lease_owner="deadworker", lease_expires_at=long_ago, heartbeat_at=long_ago))
    services.users.disable(name="ann", for_erasure=True)
    backdate_her_request(services, user.id)

    code, said = run("gc")
    assert code == 0, said
    assert "deleted user ann" not in said
    assert "remote-xyz-123" in said
    assert "left to a worker" in said
    code, said = run("gc")  # not due again yet: said all the same, with how to finish it now
    assert code == 0, said
    assert "deletion of user ann pending" in said
    assert "users delete ann --yes --force" in said
    owed = services.repo.get_training("on-replicate")
    assert owed is not None  # the row that owes the cancel is kept
    assert owed.status is TrainingStatus.CANCELED
    assert owed.remote_cancel_pending
    assert services.repo.get_user(user.id) is not None

    replicate = FakeTrainer(backend="replicate")
    worker = build_services(settings, trainers={"local": FakeTrainer(), "replicate": replicate},
                            face_analyzer=one_person_analyzer(),
                            generators={"local": FakeGenerator()})
    try:
        backdate_her_request(worker, user.id)
        assert [s.name for s in worker.erasure.finish_pending()] == ["ann"]
    finally:
        worker.close()
    assert replicate.remote_canceled == ["remote-xyz-123"]
    assert services.repo.get_user(user.id) is None
    assert services.repo.get_training("on-replicate") is None


def test_a_replicate_run_no_process_can_cancel_does_not_block_her_deletion_for_ever(
        on_services: Services, client: TestClient) -> None:
    """A deployment with no Replicate trainer any more (no token: it moved to local training)
    and an old Replicate training of hers still owing its remote cancel: every users delete
    --force, DELETE /api/me and worker refused her deletion for ever, each saying it would
    finish (e4 pre-merge review 1). A process built with the deployment's trainers deletes her,
    the run named in a warning; only gc, built with none, leaves it to a worker."""
    services = on_services
    own_model(client, services, "ann", photos=photo_zip(4), versions=0)
    long_ago = utcnow() - timedelta(days=30)
    services.repo.add_training(a_training_of(
        services, "ann", "old-replicate", backend="replicate", status=TrainingStatus.CANCELED,
        created_at=long_ago, started_at=long_ago, completed_at=long_ago,
        remote_id="r-old-123", remote_cancel_pending=True))
    assert "replicate" not in services.trainers  # as the CLI builds it: no token
    code, said = run("users", "delete", "ann", "--yes", "--force")
    assert code == 0, said
    assert "deleted user ann" in said
    assert services.repo.get_user_by_name("ann") is None
    assert services.repo.get_training("old-replicate") is None
    assert "r-old-123 is left uncanceled: this deployment has no replicate trainer" in said


def test_gc_given_another_deployments_storage_finishes_no_deletion_there(
        on_services: Services, settings: Settings, client: TestClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ann: Owner) -> None:
    """gc finished the pending account deletions before its collection, whose guard refuses a
    storage bound to another database: given another deployment's storage (same photos, same
    keys) it deleted 14 of that deployment's blobs and only then refused (day review 1). The
    collection goes first now: refused, it deletes nothing anywhere, and her deletion waits."""
    services = on_services
    ann_id = interrupt_her_api_delete(services, client, ann, monkeypatch,
                                      step="delete_user_data")
    backdate_her_request(services, ann_id)
    other = make_settings(tmp_path / "elsewhere",
                          database_url=f"sqlite:///{settings.home / 'selfie-lora.db'}")
    theirs = other.home / "blobs"
    shutil.rmtree(theirs, ignore_errors=True)
    shutil.copytree(settings.home / "blobs", theirs)
    marker = json.loads((theirs / "deployment.json").read_text())
    marker.update(deployment_id="another-deployment", storage_id="another-storage")
    (theirs / "deployment.json").write_text(json.dumps(marker))
    before = {p for p in theirs.rglob("*") if p.is_file()}
    monkeypatch.setattr(cli, "_settings", lambda: other)
    code, said = run("gc")
    assert code == 1, said
    assert "refusing to collect garbage" in said
    assert "deleted user ann" not in said
    assert {p for p in theirs.rglob("*") if p.is_file()} == before  # not one of theirs gone
    assert services.repo.get_user(ann_id) is not None  # her deletion waits for a right gc
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    code, said = run("gc")
    assert code == 0, said
    assert "deleted user ann" in said
    assert services.repo.get_user(ann_id) is None


def mark_as_another_deployments(services: Services) -> bytes:
    """The store's marker rewritten to name another deployment: this deployment given a
    storage that another one (staging, production) was bound to first, with the same keys.
    The marker as it was."""
    was = services.blobs.get(DEPLOYMENT_KEY)
    marker = json.loads(was)
    marker.update(deployment_id="another-deployment", storage_id="another-storage")
    services.blobs.put(DEPLOYMENT_KEY, json.dumps(marker).encode())
    return was


def test_a_deletion_on_another_deployments_storage_is_refused_and_changes_nothing(
        on_services: Services, client: TestClient, ann: Owner) -> None:
    """Account deletion deleted by key and prefix with no look at the store's marker, which
    ``gc`` refuses on: given another deployment's storage it deleted that deployment's blobs
    under her keys (day review). Now it refuses first, the account as it was."""
    services = on_services
    mark_as_another_deployments(services)
    rows, blobs = rows_of(services), blob_keys(services)
    with pytest.raises(DeploymentMismatchError) as refused:
        services.erasure.erase(name="ann")
    assert "refusing to delete user ann" in refused.value.message
    assert "SELFIE_LORA_STORAGE_URL" in refused.value.message
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)
    her = services.users.get_by_name(name="ann")
    assert her.disabled_at is None
    assert her.erasure_requested_at is None


def test_a_storage_with_no_marker_yet_does_not_hold_up_a_deletion(
        on_services: Services, client: TestClient, ann: Owner) -> None:
    """Unbound (no server or worker of this release started on it): only this database's rows
    name her keys, and the store gets its marker at the first start (``check_deployment``)."""
    services = on_services
    services.blobs.delete(DEPLOYMENT_KEY)
    assert services.erasure.erase(name="ann").blobs.deleted
    assert services.repo.get_user_by_name("ann") is None


def test_users_delete_on_another_deployments_storage_exits_1_and_deletes_nothing(
        on_services: Services, client: TestClient, ann: Owner) -> None:
    services = on_services
    mark_as_another_deployments(services)
    rows, blobs = rows_of(services), blob_keys(services)
    code, said = run("users", "delete", "ann", "--yes", "--force")
    assert code == 1, said
    assert "refusing to delete user ann" in said
    assert "SELFIE_LORA_DATABASE_URL and SELFIE_LORA_STORAGE_URL" in said
    assert "deleted user ann" not in said
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)


def test_delete_me_on_another_deployments_storage_is_a_503_and_her_account_stays(
        on_services: Services, client: TestClient, ann: Owner) -> None:
    services = on_services
    mark_as_another_deployments(services)
    rows, blobs = rows_of(services), blob_keys(services)
    r = client.request("DELETE", "/api/me", headers=ann.headers, json={"confirm": "ann"})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "deployment_mismatch"
    assert "nothing was changed" in error["message"]
    assert "another-deployment" not in error["message"]  # the operator's words are logged
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)
    assert client.get("/api/model", headers=ann.headers).status_code == 200


def test_a_pending_deletion_on_another_deployments_storage_stays_pending(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, ann: Owner) -> None:
    """``finish_pending`` (workers, ``serve``, ``gc``) refuses as the deletion itself does:
    nothing of hers goes, nothing is claimed, the refusal is logged; with the right storage
    back the deletion is finished."""
    services = on_services
    asked = her_deletion_due(services, client, ann, monkeypatch)
    ann_id = asked.id
    was = mark_as_another_deployments(services)
    rows, blobs = rows_of(services), blob_keys(services)
    caplog.set_level(logging.WARNING, logger="selfie_lora.services.erasure")
    assert services.erasure.finish_pending() == []
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)
    still = services.repo.get_user(ann_id)
    assert still is not None
    assert still.erasure_requested_at == asked.erasure_requested_at
    assert any("refusing to finish 1 pending account deletion(s)" in m
               for m in caplog.messages), caplog.messages
    services.blobs.put(DEPLOYMENT_KEY, was)
    assert [s.name for s in services.erasure.finish_pending()] == ["ann"]
    assert services.repo.get_user(ann_id) is None


class MarkerUnreachable:
    """A blob store whose marker cannot be read once ``unreachable`` is set: the object
    storage timing out at that moment."""

    def __init__(self, blobs: Any) -> None:
        self._blobs = blobs
        self.unreachable = False

    def get(self, key: str) -> bytes:
        if self.unreachable and key == DEPLOYMENT_KEY:
            raise StorageError(f"the storage timed out reading {key}")
        return self._blobs.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blobs, name)


def test_a_pending_deletion_whose_storage_cannot_be_read_stays_pending_and_gc_says_its_summary(
        on_services: Services, client: TestClient, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, ann: Owner) -> None:
    """``finish_pending`` caught only the marker naming another deployment: a StorageError
    reading it (the store unreachable) escaped, so ``gc``, which calls it after its
    collection, exited 1 with the storage's words alone, its summary never said. Now it is
    logged, nothing is claimed, and gc ends as it would with the deletion not yet due."""
    services = on_services
    asked = her_deletion_due(services, client, ann, monkeypatch)
    store = MarkerUnreachable(services.blobs)
    store.unreachable = True
    caplog.set_level(logging.WARNING, logger="selfie_lora.services.erasure")
    on_it = build_services(services.settings, blobs=store, trainers={}, generators={})
    try:
        assert on_it.erasure.finish_pending() == []
    finally:
        on_it.close()
    assert any("stay pending and are tried again" in m for m in caplog.messages), caplog.messages
    still = services.repo.get_user(asked.id)
    assert still is not None
    assert still.erasure_requested_at == asked.erasure_requested_at  # not claimed

    gc_store = MarkerUnreachable(wiring.default_blob_store(services.settings))
    monkeypatch.setattr(wiring, "default_blob_store", lambda _settings: gc_store)
    collect = gc_module.GarbageCollector.collect

    def collect_then_lose_the_store(self: gc_module.GarbageCollector, **kwargs: Any) -> Any:
        summary = collect(self, **kwargs)
        gc_store.unreachable = True  # after the collection, before the pending deletions
        return summary

    monkeypatch.setattr(gc_module.GarbageCollector, "collect", collect_then_lose_the_store)
    code, said = run("gc")
    assert gc_store.unreachable
    assert code == 0, said
    assert "deletion of user ann pending" in said
    assert "garbage collection:" in said
    assert "deleted user ann" not in said
    assert services.repo.get_user(asked.id) is not None


def test_on_object_storage_every_blob_of_hers_goes_and_his_stay(
        s3_server: S3Server, tmp_path: Path) -> None:
    """The same on S3-compatible storage: the blobs are listed and deleted in the bucket."""
    settings = make_settings(tmp_path, **s3_server.settings(s3_server.new_location()))
    with serving(settings, run_worker=True) as (client, services):
        furnish(client, services, "bob", photos=photo_zip(3, offset=10))
        bob_rows, bob_blobs = rows_of(services), blob_keys(services)
        furnish(client, services, "ann", photos=photo_zip(4))
        assert blob_keys(services) - bob_blobs
        summary = services.erasure.erase(name="ann")
        assert summary.blobs.deleted
        assert (rows_of(services), blob_keys(services)) == (bob_rows, bob_blobs)


def test_deleting_ones_own_account_deletes_that_account_not_another_of_the_same_name(
        on_services: Services, client: TestClient) -> None:
    """During a rolling upgrade from a release before 0013 an older process can make "Erin"
    beside "erin". ``DELETE /api/me`` of Erin's looked her account up by name, which finds the
    first made of the two: it deleted erin's (keys, sessions, model...), answered with her name,
    and left Erin's as it was (sec review finding 1). Now it deletes the caller's account, by
    its id."""
    services = on_services
    erin, erin_secret = services.users.create(name="erin")
    clash_id, clash_secret = legacy_user(services, "Erin",
                                         created_at=erin.created_at + timedelta(seconds=1))
    assert services.repo.get_user_by_name("Erin") == erin  # the name finds the first made
    r = client.request("DELETE", "/api/me", headers={"Authorization": f"Bearer {clash_secret}"},
                       json={"confirm": "Erin"})
    assert r.status_code == 200, r.text
    assert r.json()["deleted"]["name"] == "Erin"  # old code: "erin"
    assert services.repo.get_user(clash_id) is None
    assert services.repo.get_user(erin.id) is not None
    assert client.get("/api/keys",
                      headers={"Authorization": f"Bearer {erin_secret}"}).status_code == 200


def deleted_on_a_read_only_database(settings: Settings,
                                     monkeypatch: pytest.MonkeyPatch) -> str:
    """``users delete ann --yes`` on the test's database opened read-only (a replica's copy, a
    fail-over's standby): exit 1, the refusal said in its own words. What it printed."""
    read_only = settings.model_copy(update={
        "database_url": f"sqlite:///file:{settings.home / 'selfie-lora.db'}?mode=ro&uri=true"})
    monkeypatch.setattr(cli, "_settings", lambda: read_only)
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 1, said
    assert "the database refuses writes (read-only)" in said, said
    assert "attempt to write a readonly database" in said  # its own words, kept
    return said


def test_users_delete_on_a_read_only_database_says_so_and_that_nothing_was_deleted(
        on_services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """A read-only database file (a replica's copy, a read-only mount): the account's disabling,
    the first write, is refused before anything changed. Old code: the driver's words alone
    ("database error: attempt to write a readonly database"), not what they meant for her
    account."""
    services = on_services
    rows, blobs = rows_of(services), blob_keys(services)
    said = deleted_on_a_read_only_database(settings, monkeypatch)
    assert "nothing of ann's was deleted or disabled" in said
    assert "cut short" not in said
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)
    assert services.users.get_by_name(name="ann").disabled_at is None


def disabled_then_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``users delete ann --yes`` on a database that turned read-only once her account was
    disabled (a fail-over): exit 1, the partway line."""
    refusal = DatabaseRefusedError("database error: cannot execute DELETE in a read-only "
                                   "transaction")

    def refused(*_args: object, **_kwargs: object) -> dict[str, int]:
        raise refusal

    with monkeypatch.context() as m:
        m.setattr(SqlRepository, "delete_user_data", refused)
        code, said = run("users", "delete", "ann", "--yes")
    assert code == 1, said
    assert "partway" in said, said


def test_users_delete_run_again_on_a_read_only_database_says_the_deletion_stays_pending(
        on_services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """Found in review: a fail-over left the database read-only once ann's account was
    disabled (the partway line), and the operator ran the command again before it took writes:
    the disabling, written again, was refused, and the line said "nothing of ann's was deleted
    or disabled", though her account is disabled and her deletion pending (her rows perhaps
    gone). It says what is true now: the user read back, as a read-only database still
    answers reads."""
    services = on_services
    disabled_then_read_only(monkeypatch)
    rows, blobs = rows_of(services), blob_keys(services)
    said = deleted_on_a_read_only_database(settings, monkeypatch)
    assert "nothing of ann's was deleted or disabled" not in said  # old code: said so
    assert ("ann's deletion stays pending (the account is disabled): a worker, serve or gc "
            "finishes it once the database takes writes, or run this again then") in said, said
    assert (rows_of(services), blob_keys(services)) == (rows, blobs)
    user = services.users.get_by_name(name="ann")
    assert user.disabled_at is not None
    assert user.erasure_requested_at is not None


def test_users_delete_on_a_read_only_database_of_a_parked_deletion_says_when_it_is_tried(
        on_services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """Found in review: a parked deletion (an earlier failure that was not an outage, dated
    ``ERASURE_PARKED`` ahead) was said as finished by "a worker, serve or gc ... once the
    database takes writes", though it is tried again only at its date (up to 24 h later), or
    by this command once the cause is fixed."""
    services = on_services
    disabled_then_read_only(monkeypatch)
    resume_after = services.erasure.resume_after
    user = services.users.get_by_name(name="ann")
    # Parked as AccountEraser._park dates it.
    assert services.repo.request_erasure(user.id, at=utcnow() - resume_after + ERASURE_PARKED)
    due = services.users.get_by_name(name="ann").erasure_requested_at
    assert due is not None
    said = deleted_on_a_read_only_database(settings, monkeypatch)
    assert "finishes it once the database takes writes" not in said, said  # old code: said so
    assert ("ann's deletion stays pending (the account is disabled), parked after a failure "
            "that is not an outage: it is tried again at "
            f"{(due + resume_after).astimezone(UTC):%Y-%m-%d %H:%M} UTC") in said, said
    assert "run this again once the database takes writes and the cause is fixed" in said


def test_users_delete_on_a_read_only_database_of_a_disabled_user_says_it_stays_disabled(
        on_services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """Found in review: ann disabled earlier (``users disable``), then the command on a
    read-only database said "nothing of ann's was deleted or disabled", as if her account
    were not disabled. It says that nothing changed and that her account stays disabled."""
    services = on_services
    services.users.disable(name="ann")
    said = deleted_on_a_read_only_database(settings, monkeypatch)
    assert "nothing of ann's was deleted or disabled" not in said  # old code: said so
    assert ("this run changed nothing (ann's account stays disabled, its deletion not "
            "asked for): run this again once it takes writes") in said, said
    user = services.users.get_by_name(name="ann")
    assert user.disabled_at is not None
    assert user.erasure_requested_at is None


def test_users_delete_on_a_read_only_database_it_cannot_read_again_says_only_this_run(
        on_services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch,
        ann: Owner) -> None:
    """The disabling refused, and the account not read back either (the standby gone
    meanwhile): what it was before is not known, so the line says this run changed nothing,
    not that nothing of hers was disabled."""
    get_by_name = UserService.get_by_name
    reads: list[str] = []

    def read_once(self: UserService, *, name: str) -> User:
        reads.append(name)
        if len(reads) > 1:  # the read back after the refusal
            raise StorageUnavailableError("database error: connection refused")
        return get_by_name(self, name=name)

    monkeypatch.setattr(UserService, "get_by_name", read_once)
    said = deleted_on_a_read_only_database(settings, monkeypatch)
    assert reads == ["ann", "ann"]
    assert "nothing of ann's was deleted or disabled" not in said
    assert "this run changed nothing: run it again once the database takes writes" in said, said
    assert get_by_name(on_services.users, name="ann").disabled_at is None


@pytest.mark.parametrize("where", ["disabling", "rows"])
def test_users_delete_refused_by_a_busy_pool_is_not_said_read_only(
        on_services: Services, monkeypatch: pytest.MonkeyPatch, ann: Owner, where: str) -> None:
    """Review 3: the pool's connections all taken (``DatabaseBusyError``, ``pool_exhausted``) is
    a ``DatabaseRefusedError`` too, but passes with the load: neither read-only line is said for
    it, at the disabling nor partway; it keeps the line said before them. Nothing tested it."""
    services = on_services
    busy = DatabaseBusyError("database error: QueuePool limit of size 15 overflow 0 reached, "
                             "connection timed out, timeout 30.00")

    def refused(*_args: object, **_kwargs: object) -> object:
        raise busy

    if where == "disabling":
        monkeypatch.setattr(UserService, "disable_by_id", refused)
    else:
        monkeypatch.setattr(SqlRepository, "delete_user_data", refused)
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 1, said
    assert "read-only" not in said, said
    assert "QueuePool limit of size 15" in said, said
    assert ("the deletion was cut short" in said) == (where == "rows"), said
    assert (services.users.get_by_name(name="ann").disabled_at is None) == (where == "disabling")


def test_users_delete_cut_short_whose_retry_is_refused_too_says_the_wait_it_got(
        on_services: Services, monkeypatch: pytest.MonkeyPatch, ann: Owner) -> None:
    """Review 3: a standby refuses the write that makes the deletion due soon as it refused the
    rows' deletion: the partway line says the wait the deletion got, the dead-process one
    (README: 10 min 31 s), not 30 s. Nothing tested it."""
    refusal = DatabaseRefusedError("database error: cannot execute DELETE in a read-only "
                                   "transaction")
    read_only = False  # from the rows' deletion on, every write is refused
    request_erasure = SqlRepository.request_erasure

    def rows_refused(*_args: object, **_kwargs: object) -> dict[str, int]:
        nonlocal read_only
        read_only = True
        raise refusal

    def due_soon_refused(self: SqlRepository, user_id: str, **kwargs: Any) -> bool:
        if read_only:
            raise refusal
        return request_erasure(self, user_id, **kwargs)

    monkeypatch.setattr(SqlRepository, "delete_user_data", rows_refused)
    monkeypatch.setattr(SqlRepository, "request_erasure", due_soon_refused)
    code, said = run("users", "delete", "ann", "--yes")
    assert code == 1, said
    assert "the database refused writes (read-only) partway" in said, said
    # The dead-process wait (10 min 31 s; shorter here, the key cache's wait made none).
    resume_after = wait_text(on_services.erasure.resume_after)
    assert f"tried again in {resume_after} by a worker, serve or gc" in said, said
    assert "tried again in 30 s" not in said  # the wait it did not get
    assert on_services.users.get_by_name(name="ann").erasure_requested_at is not None


def test_users_delete_cut_short_by_a_read_only_database_says_so_and_when_it_goes_on(
        on_services: Services, monkeypatch: pytest.MonkeyPatch, ann: Owner) -> None:
    """The database turned read-only (a fail-over to a standby) once the account was disabled:
    the rows' deletion is refused. Old code: "user ann: the deletion was cut short (database
    error: ...)", the refusal a parenthesis in the middle of the line and what to do not said."""
    services = on_services
    refusal = DatabaseRefusedError("database error: cannot execute DELETE in a read-only "
                                   "transaction")

    def refused(*_args: object, **_kwargs: object) -> dict[str, int]:
        raise refusal

    monkeypatch.setattr(SqlRepository, "delete_user_data", refused)
    # Typed in another case, as a name is taken: the line names the account as it is (review
    # 3, old code: "ANN's account is disabled").
    code, said = run("users", "delete", "ANN", "--yes")
    assert code == 1, said
    assert "the database refused writes (read-only) partway" in said, said
    assert refusal.message in said
    assert "ann's account is disabled" in said
    assert "tried again in 30 s by a worker, serve or gc" in said
    assert "selfie-lora users delete ann --yes" in said
    assert services.users.get_by_name(name="ann").disabled_at is not None
