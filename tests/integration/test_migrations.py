"""Migrations on databases that already hold data, on SQLite and PostgreSQL: up, down and up
again; and the schema they make is the one the tables declare."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, text

from selfie_lora.adapters.db.migrate import alembic_config, at_head, head_revision, upgrade
from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.db.tables import Base
from selfie_lora.domain.entities import GateStatus, User
from selfie_lora.errors import ConfigError, ConflictError, ErrorCode
from selfie_lora.services.users import UserService, hash_api_key
from tests.support.backends import DATABASES, database_url, fresh_engine

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=DATABASES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    e = fresh_engine(database_url(request.param, tmp_path))
    yield e
    e.dispose()


def migrate(engine: Engine, target: str, *, down: bool = False) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(cfg, target)


def insert_a_version(engine: Engine) -> None:
    """User ann, her model (scale 0.8) and its version 1 'v' of training 't', in SQL of
    the first schema (later migrations keep it valid)."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, api_key_hash, created_at) "
                          "VALUES ('u', 'ann', 'h', :t)"), {"t": NOW})
        conn.execute(text(
            "INSERT INTO models (id, user_id, backend, trigger_word, destination, trainer_version,"
            " lora_scale, lora_scale_is_custom, active_version_id, created_at) VALUES ('m', 'u',"
            " 'local', 'zkr47v', 'local/x', 'local-tiny-v1', 0.8, true, 'v', :t)"), {"t": NOW})
        conn.execute(text(
            "INSERT INTO datasets (id, user_id, images_total, images_accepted, photo_hashes,"
            " findings, accepted, sha256, created_at) VALUES ('d', 'u', 1, 1, '[]', '[]', true,"
            " 's', :t)"), {"t": NOW})
        conn.execute(text(
            "INSERT INTO trainings (id, model_id, dataset_id, backend, status, is_retraining,"
            " trigger_word, destination, trainer_version, recipe, preserved, step, total_steps,"
            " cancel_requested, history, created_at) VALUES ('t', 'm', 'd', 'local', 'succeeded',"
            " false, 'zkr47v', 'local/x', 'local-tiny-v1', :recipe, '{}', 1, 1, false, '[]', :t)"),
            {"t": NOW, "recipe": '{"name": "local-tiny-v1", "steps": 1, "lora_rank": 4, '
                                 '"learning_rate": 0.01, "resolution": 64}'})
        conn.execute(text(
            "INSERT INTO versions (id, model_id, number, training_id, trainer_version,"
            " weights_key, weights_sha256, weights_method, version_mismatch, created_at)"
            " VALUES ('v', 'm', 1, 't', 'local-tiny-v1', 'k', 'sha', 'file', false, :t)"),
            {"t": NOW})


def test_0002_keeps_old_versions_active_and_adds_the_likeness_tables(engine: Engine) -> None:
    migrate(engine, "0001")
    insert_a_version(engine)
    migrate(engine, "head")
    tables = set(inspect(engine).get_table_names())
    assert "version_quality" in tables
    repo = SqlRepository(engine)
    version = repo.get_version("v")
    assert version is not None
    assert version.gate_status is GateStatus.PASSED  # activated under the old rule
    assert version.gate_reason is None
    assert version.alert is None
    model = repo.get_model("m")
    assert model is not None
    assert model.probes == ()  # filled in at its next scoring
    assert (model.lora_scale, model.active_version_id) == (0.8, "v")
    assert repo.list_likeness("m") == []

    migrate(engine, "0001", down=True)
    assert "version_quality" not in set(inspect(engine).get_table_names())
    columns = {c["name"] for c in inspect(engine).get_columns("versions")}
    assert "gate_status" not in columns
    migrate(engine, "head")
    again = SqlRepository(engine).get_version("v")
    assert again is not None
    assert again.gate_status is GateStatus.PASSED


def test_0005_moves_each_users_key_to_api_keys_and_it_keeps_working(engine: Engine) -> None:
    migrate(engine, "0004")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, api_key_hash, created_at) "
                          "VALUES ('u', 'ann', :h, :t)"), {"t": NOW, "h": hash_api_key("sl_old")})
    migrate(engine, "head")
    users = UserService(repo=SqlRepository(engine))
    ann = users.authenticate(api_key="sl_old")
    assert ann.name == "ann"
    (key,) = users.keys(user=ann)
    assert (key.name, key.revoked_at) == ("default", None)
    _new, secret = users.rotate_key(user=ann, key_id=key.id)
    assert users.authenticate(api_key=secret) == ann
    migrate(engine, "0004", down=True)  # the newest key that works goes back to the user row
    with engine.begin() as conn:
        stored = conn.execute(text("SELECT api_key_hash FROM users WHERE id = 'u'")).scalar_one()
    assert stored == hash_api_key(secret)
    migrate(engine, "head")
    assert UserService(repo=SqlRepository(engine)).authenticate(api_key=secret).name == "ann"


def test_0008_reads_a_dataset_stored_before_it_with_no_face_boxes(engine: Engine) -> None:
    migrate(engine, "0007")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, api_key_hash, created_at) "
                          "VALUES ('u', 'ann', 'h', :t)"),
                     {"t": NOW})
        conn.execute(text(
            "INSERT INTO datasets (id, user_id, images_total, images_accepted, photo_hashes,"
            " findings, accepted, sha256, created_at) VALUES ('d', 'u', 2, 2, :hashes, '[]',"
            " true, 's', :t)"), {"t": NOW, "hashes": f'["{"a" * 64}", "{"b" * 64}"]'})
    migrate(engine, "head")
    repo = SqlRepository(engine)
    old = repo.get_dataset("d")
    assert old is not None
    assert old.face_boxes == ()
    assert [old.face_box(i) for i in range(2)] == [None, None]
    repo.add_dataset(replace(old, id="d2", face_boxes=((0.25, 0.125, 0.75, 0.875), None)))
    assert repo.get_dataset("d2").face_boxes == ((0.25, 0.125, 0.75, 0.875), None)  # type: ignore[union-attr]

    migrate(engine, "0007", down=True)
    assert "face_boxes" not in {c["name"] for c in inspect(engine).get_columns("datasets")}
    migrate(engine, "head")
    assert SqlRepository(engine).get_dataset("d2").face_boxes == ()  # type: ignore[union-attr]


def test_0011_stores_seeds_past_2_31_and_long_weights_methods(engine: Engine) -> None:
    """PostgreSQL's INTEGER and VARCHAR(200) refused them; up, down (cut to what the old columns
    hold) and up again, on a database that holds a generation of before."""
    migrate(engine, "0010")
    insert_a_version(engine)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO generations (id, user_id, model_id, version_id, prompt, lora_scale, seed,"
            " image_keys, created_at) VALUES ('g0', 'u', 'm', 'v', 'p', 1.0, 7, '[]', :t)"),
            {"t": NOW})
    migrate(engine, "head")
    long_method = "replicate weights: tar member " + "x" * 300
    with engine.begin() as conn:
        conn.execute(text("UPDATE trainings SET weights_method = :m"), {"m": long_method})
        conn.execute(text("UPDATE versions SET weights_method = :m"), {"m": long_method})
        conn.execute(text(
            "INSERT INTO generations (id, user_id, model_id, version_id, prompt, lora_scale, seed,"
            " image_keys, created_at) VALUES ('g1', 'u', 'm', 'v', 'p', 1.0, :seed, '[]', :t)"),
            {"t": NOW, "seed": 2**32 - 1})
    repo = SqlRepository(engine)
    assert repo.get_generation("g0").seed == 7  # type: ignore[union-attr]
    assert repo.get_generation("g1").seed == 2**32 - 1  # type: ignore[union-attr]
    assert repo.get_version("v").weights_method == long_method  # type: ignore[union-attr]
    assert repo.get_training("t").weights_method == long_method  # type: ignore[union-attr]

    migrate(engine, "0010", down=True)
    with engine.connect() as conn:
        seeds = {row.id: row.seed for row in conn.execute(text("SELECT id, seed FROM generations"))}
        methods = conn.execute(text("SELECT weights_method FROM versions")).scalars().all()
    if engine.dialect.name == "postgresql":  # SQLite kept its columns, and what they hold
        assert seeds == {"g0": 7, "g1": None}
        assert methods == [long_method[:200]]
    migrate(engine, "head")
    assert SqlRepository(engine).get_generation("g0").seed == 7  # type: ignore[union-attr]


def test_0012_adds_the_deployment_row_empty_on_a_database_with_data(engine: Engine) -> None:
    """An upgraded deployment gets no id from the migration (the first server or worker to
    start makes it and binds the store); down and up again."""
    migrate(engine, "0011")
    insert_a_version(engine)
    migrate(engine, "head")
    repo = SqlRepository(engine)
    assert repo.get_deployment_id() is None
    assert repo.ensure_deployment_id("d-1", now=NOW) == "d-1"
    assert repo.get_version("v") is not None
    migrate(engine, "0011", down=True)
    assert "deployment" not in inspect(engine).get_table_names()
    migrate(engine, "head")
    assert SqlRepository(engine).get_deployment_id() is None


def insert_users(engine: Engine, *names: str) -> None:
    """Users of the 0012 schema, one a second apart in the order given."""
    with engine.begin() as conn:
        for i, name in enumerate(names):
            conn.execute(text("INSERT INTO users (id, name, api_key_hash, created_at) VALUES "
                              "(:id, :name, :h, :t)"),
                         {"id": f"u{i}", "name": name, "h": f"h{i}",
                          "t": NOW.replace(second=i)})


def test_0013_folds_the_names_a_database_holds_and_keeps_their_accounts(engine: Engine) -> None:
    """Names differing only in case become one name: those already there are found by any case,
    and a new one that folds to a taken name is refused by the database itself."""
    migrate(engine, "0012")
    insert_users(engine, "Ann", "bob.", "carol")
    migrate(engine, "head")
    repo = SqlRepository(engine)
    assert repo.get_user_by_name("ann").id == "u0"  # type: ignore[union-attr]
    assert repo.get_user_by_name("BOB.").id == "u1"  # type: ignore[union-attr]
    assert repo.get_user_by_name("bob") is None  # 'bob.' is not 'bob'
    with pytest.raises(ConflictError) as taken:
        repo.add_user(User(id="u9", name="ANN", created_at=NOW))
    assert taken.value.code is ErrorCode.USER_EXISTS
    # A user written without the folded name (an older process, mid-upgrade) is still found.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, api_key_hash, created_at) VALUES "
                          "('u8', 'dave', 'h8', :t)"), {"t": NOW})
    assert repo.get_user_by_name("dave").id == "u8"  # type: ignore[union-attr]
    migrate(engine, "0012", down=True)
    assert "name_folded" not in {c["name"] for c in inspect(engine).get_columns("users")}
    migrate(engine, "head")
    assert SqlRepository(engine).get_user_by_name("DAVE").id == "u8"  # type: ignore[union-attr]


def test_0013_refuses_a_database_whose_names_differ_only_in_case(engine: Engine) -> None:
    """Which of two people keeps 'ann' is the operator's call: the upgrade names the accounts,
    says how to rename, and changes nothing."""
    migrate(engine, "0012")
    insert_users(engine, "ann", "Ann", "bob", "BOB", "Bob", "carol")
    with pytest.raises(ConfigError) as refused:
        upgrade(engine)
    message = refused.value.message
    assert "'ann' and 'Ann'" in message
    assert "'bob' and 'BOB' and 'Bob'" in message
    assert "carol" not in message
    assert "UPDATE users SET name = 'Ann-2' WHERE name = 'Ann'" in message
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0012"
    assert "name_folded" not in {c["name"] for c in inspect(engine).get_columns("users")}
    # Renamed as it says, the upgrade goes through and every account is there.
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET name = 'Ann-2' WHERE name = 'Ann'"))
        conn.execute(text("UPDATE users SET name = 'BOB-2' WHERE name = 'BOB'"))
        conn.execute(text("UPDATE users SET name = 'Bob-3' WHERE name = 'Bob'"))
    upgrade(engine)
    repo = SqlRepository(engine)
    assert [repo.get_user_by_name(n).id for n in ("ANN", "ann-2", "bob", "bob-2", "bob-3")] == [  # type: ignore[union-attr]
        "u0", "u1", "u2", "u3", "u4"]


def test_the_migrations_make_the_schema_the_tables_declare(engine: Engine) -> None:
    migrate(engine, "head")
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_upgrade_runs_what_is_pending_and_knows_when_nothing_is(engine: Engine) -> None:
    assert not at_head(engine)
    migrate(engine, "0005")
    assert not at_head(engine)  # an older schema is not mistaken for the newest
    upgrade(engine)
    assert at_head(engine)
    assert "password_hash" in {c["name"] for c in inspect(engine).get_columns("users")}
    upgrade(engine)  # again: nothing pending, nothing changes
    assert at_head(engine)


def test_an_upgrade_says_from_which_schema_to_which_and_nothing_when_none_ran(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The upgrade is for good: the operator learns from the log which process ran it, when,
    and from which revision (old code: one debug line, also when nothing was migrated)."""
    import logging

    from selfie_lora.adapters.db import migrate as migrate_module

    caplog.set_level(logging.DEBUG, logger=migrate_module.__name__)
    where = engine.url.render_as_string(hide_password=True)
    head = head_revision()

    def said() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == migrate_module.__name__]

    upgrade(engine)  # a new, empty database: its schema is made, nothing is upgraded
    assert said() == [(logging.INFO, f"created the database schema at {head}: {where}")]
    migrate(engine, "0018", down=True)
    caplog.clear()
    upgrade(engine)
    assert said() == [(logging.WARNING, (
        f"database schema upgraded from 0018 to {head}: {where}; a release older than this one "
        "refuses it from now on: see README 'Rolling back to the previous release'"))]
    caplog.clear()
    upgrade(engine)  # at head: nothing ran, nothing is said
    assert said() == []
    # Another process upgraded it while this one waited for the lock: it says so, in debug only.
    migrate_module._migrate(engine)
    assert said() == [(logging.DEBUG,
                       f"database already at {head} (upgraded by another process): {where}")]


@pytest.mark.postgres
@pytest.mark.timeout(90)  # without the lock the racing upgrades deadlock rather than fail
def test_processes_starting_together_upgrade_one_at_a_time(tmp_path: Path) -> None:
    """Every API server and worker upgrades at start-up; on PostgreSQL they often start at the
    same moment (a deployment's first start). Without the lock, two would create the same
    tables and one would crash."""
    import threading

    from selfie_lora.adapters.db.repository import make_engine

    url = database_url("postgres", tmp_path)
    fresh_engine(url).dispose()  # an empty schema
    engines = [make_engine(url) for _ in range(4)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def start_up(e: Engine) -> None:
        start.wait()
        try:
            upgrade(e)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start_up, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert all(at_head(e) for e in engines)
    finally:
        for e in engines:
            e.dispose()


# Old code: Alembic's traceback ("Can't locate revision identified by '0099'") from every
# command, exit status 1 for the CLI's crash and 3 for uvicorn's.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [
    ["users", "keys", "list", "ann"], ["worker"], ["serve", "--no-worker", "--port", "0"]],
    ids=["users", "worker", "serve"])
def test_a_schema_newer_than_this_release_stops_every_command_in_one_line(
        engine: Engine, tmp_path: Path, command: list[str]) -> None:
    import os
    import subprocess
    import sys

    upgrade(engine)
    with engine.begin() as conn:  # what a newer release's migration left
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_LORA_")}
    env.update({"SELFIE_LORA_HOME": str(tmp_path / "home"), "COLUMNS": "200",
                "SELFIE_LORA_DATABASE_URL": engine.url.render_as_string(hide_password=False),
                # The code of this checkout, whatever the environment's install points at.
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parents[2] / "src"),
                     env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    script = Path(sys.executable).parent / "selfie-lora"
    done = subprocess.run([str(script), *command], env=env, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"error: the database's schema (0099) is newer than this release's ({head_revision()}): "
        "upgrade "
        "selfie-lora here to the release that upgraded the database (every process of a "
        "deployment runs the same one); nothing was changed"], done.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [("0099",)]


def test_at_head_refuses_a_revision_it_does_not_know(engine: Engine) -> None:
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(ConfigError, match=r"schema \(0099\) is newer than this release's"):
        upgrade(engine)


def insert_unfolded(engine: Engine, id_: str, name: str, *, second: int = 0,
                    folded: str | None = None) -> None:
    """A user as the release before 0013 writes it (it knows no name_folded), or, with
    ``folded``, as this one does."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, name_folded, api_key_hash, created_at) "
                          "VALUES (:id, :name, :folded, :h, :t)"),
                     {"id": id_, "name": name, "folded": folded, "h": f"unused:{id_}",
                      "t": NOW.replace(second=second)})


def folded_names(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id, name_folded FROM users")).all())  # type: ignore[arg-type]


# Old code: 'carol' was made beside 'Carol' (two accounts), and the older one was found only by
# its exact name.
def test_a_user_an_older_release_signed_up_mid_upgrade_holds_its_name_whatever_the_case(
        engine: Engine) -> None:
    upgrade(engine)
    insert_unfolded(engine, "old-carol", "Carol")
    repo = SqlRepository(engine)
    assert [repo.get_user_by_name(n).id for n in ("Carol", "carol", "CAROL")] == [  # type: ignore[union-attr]
        "old-carol"] * 3
    with pytest.raises(ConflictError) as taken:
        UserService(repo=repo).create(name="carol")
    assert taken.value.code is ErrorCode.USER_EXISTS
    with pytest.raises(ConflictError) as taken:  # the repository itself, for a racing sign-up
        repo.add_user(User(id="new-carol", name="carol", created_at=NOW))
    assert taken.value.code is ErrorCode.USER_EXISTS
    # The next start fills the folded name in: from then on the unique index holds it.
    upgrade(engine)
    assert folded_names(engine) == {"old-carol": "carol"}
    assert repo.get_user_by_name("cArOl").id == "old-carol"  # type: ignore[union-attr]


# Old code: the lookup took whichever row came first ('carol', the newer), and nothing at start
# noticed the two accounts.
def test_two_accounts_an_older_release_made_mid_upgrade_stop_the_start_as_0013_does(
        engine: Engine) -> None:
    upgrade(engine)
    insert_unfolded(engine, "old-carol", "Carol", second=1)  # by the older release
    insert_unfolded(engine, "new-carol", "carol", second=2, folded="carol")  # by this one
    repo = SqlRepository(engine)
    assert repo.get_user_by_name("carol").id == "old-carol"  # type: ignore[union-attr]  # the first made
    with pytest.raises(ConfigError) as refused:
        upgrade(engine)
    message = refused.value.message
    assert "'Carol' and 'carol'" in message, message
    assert "UPDATE users SET name = 'carol-2' WHERE name = 'carol'" in message, message
    assert folded_names(engine) == {"old-carol": None, "new-carol": "carol"}  # nothing changed
    with engine.begin() as conn:  # renamed as it says, the start goes through
        conn.execute(text("UPDATE users SET name = 'carol-2', name_folded = 'carol-2' "
                          "WHERE name = 'carol'"))
    upgrade(engine)
    assert folded_names(engine) == {"old-carol": "carol", "new-carol": "carol-2"}


# Old code: it said "rename 'AAA...A' (100 characters) to 'AAA...A-2'", which PostgreSQL refuses
# (VARCHAR(100)).
def test_0013_s_suggested_name_fits_the_column(engine: Engine) -> None:
    import re

    migrate(engine, "0012")
    insert_users(engine, "a" * 100, "A" * 100)
    with pytest.raises(ConfigError) as refused:
        upgrade(engine)
    update = re.search(r"UPDATE users SET name = '([^']*)' WHERE name = '[^']*'",
                       refused.value.message)
    assert update is not None, refused.value.message
    assert len(update.group(1)) <= 100
    with engine.begin() as conn:
        conn.execute(text(update.group(0)))
    upgrade(engine)
    assert SqlRepository(engine).get_user_by_name(update.group(1)) is not None


def test_0023_adds_when_a_deletion_was_asked_for_null_on_every_user_so_far(
        engine: Engine) -> None:
    """No account is taken for a deletion under way by the upgrade; one marked afterwards is
    found pending; down and up again."""
    migrate(engine, "0022")
    insert_users(engine, "ann", "bob")
    migrate(engine, "head")
    repo = SqlRepository(engine)
    assert [u.erasure_requested_at for u in map(repo.get_user, ("u0", "u1"))] == [None, None]
    assert repo.pending_erasures(requested_before=NOW.replace(year=2100)) == []
    assert repo.request_erasure("u0", at=NOW)
    assert [u.name for u in repo.pending_erasures(requested_before=NOW)] == ["ann"]
    migrate(engine, "0022", down=True)
    assert "erasure_requested_at" not in {c["name"] for c in inspect(engine).get_columns("users")}
    migrate(engine, "head")
    assert SqlRepository(engine).pending_erasures(requested_before=NOW.replace(year=2100)) == []


def test_0023_marks_a_user_the_previous_release_left_half_deleted_as_pending(
        engine: Engine) -> None:
    """A user whose row holds 0022's erasure plan (a deletion killed after her rows went) is a
    deletion asked for when she was disabled (now if unknown): due at once, so the next
    collection finishes it and ``users enable`` refuses it; the others stay NULL."""
    migrate(engine, "0022")
    insert_users(engine, "ann", "bob", "carol")
    disabled = NOW.replace(hour=5)
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET disabled_at = :t, erasure_plan = :plan "
                          "WHERE id = 'u0'"),
                     {"t": disabled, "plan": '{"keys": ["photos/x.jpg"], "prefixes": [], '
                                             '"work_folders": []}'})
        conn.execute(text("UPDATE users SET erasure_plan = :plan WHERE id = 'u1'"),
                     {"plan": '{"keys": [], "prefixes": [], "work_folders": []}'})
    before = datetime.now(UTC)
    migrate(engine, "head")
    repo = SqlRepository(engine)
    ann, bob, carol = map(repo.get_user, ("u0", "u1", "u2"))
    assert ann.erasure_requested_at == disabled
    assert bob.erasure_requested_at is not None
    assert bob.erasure_requested_at >= before
    assert carol.erasure_requested_at is None
    assert [u.name for u in repo.pending_erasures(requested_before=datetime.now(UTC))] == [
        "ann", "bob"]


def _users_indexes(engine: Engine) -> dict[str, list[str | None]]:
    return {str(ix["name"]): list(ix["column_names"]) for ix in inspect(engine).get_indexes("users")}


@contextmanager
def _statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL ``engine`` is given while the block runs, each with its parameters."""
    issued: list[tuple[str, Any]] = []

    def record(_conn: object, _cursor: object, statement: str, parameters: Any,
               _context: object, _executemany: bool) -> None:
        issued.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield issued
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_0025_indexes_when_a_deletion_was_asked_for(engine: Engine) -> None:
    """The periodic check's due deletions (``finish_pending``) and ``gc``'s pending ones filter
    users on ``erasure_requested_at`` and sort by it, which no index held: each read went
    through every user. The index is made, dropped down to 0024, and made again."""
    migrate(engine, "0024")
    insert_users(engine, "ann", "bob")
    migrate(engine, "head")
    assert _users_indexes(engine).get("ix_users_erasure_requested_at") == [
        "erasure_requested_at"]  # old code: no such index
    repo = SqlRepository(engine)
    assert repo.request_erasure("u1", at=NOW)
    # Both of the repository's reads, as it issues them (a query drifting from the index, a
    # lower() or a join, would be seen): SQLite's plan searches by the index for each, not
    # only walks the table in its order.
    with _statements(engine) as issued:
        assert [u.name for u in repo.pending_erasures(requested_before=NOW)] == ["bob"]
        assert [u.name for u in repo.pending_erasures()] == ["bob"]
    reads = [(sql, params) for sql, params in issued if "erasure_requested_at" in sql]
    assert len(reads) == 2, issued
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            for sql, params in reads:
                plan = " ".join(str(row[-1]) for row in
                                conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
                assert "SEARCH users USING INDEX ix_users_erasure_requested_at" in plan, (sql, plan)
    migrate(engine, "0024", down=True)
    assert "ix_users_erasure_requested_at" not in _users_indexes(engine)
    migrate(engine, "head")
    assert "ix_users_erasure_requested_at" in _users_indexes(engine)
    assert [u.name for u in SqlRepository(engine).pending_erasures()] == ["bob"]


def test_0026_indexes_a_version_s_likeness_gate(engine: Engine) -> None:
    """The reconcile pass (every 10 s, on every worker and ``serve``) reads the versions left
    undecided (``undecided_versions_of_ended_trainings``: ``gate_status`` pending), which no
    index held: each pass went through every version. The index is made, dropped down to 0025,
    and made again."""
    migrate(engine, "0025")
    insert_a_version(engine)  # training 't' succeeded, its version 'v' passed (the default)
    migrate(engine, "head")
    versions = {str(ix["name"]): list(ix["column_names"])
                for ix in inspect(engine).get_indexes("versions")}
    assert versions.get("ix_versions_gate_status") == ["gate_status"]  # old code: none
    repo = SqlRepository(engine)
    assert repo.undecided_versions_of_ended_trainings(limit=10) == []
    with engine.begin() as conn:
        conn.execute(text("UPDATE versions SET gate_status = 'pending' WHERE id = 'v'"))
    # The repository's read as it issues it (a query drifting from the index would be seen):
    # SQLite's plan searches versions by the index, not a walk of the table.
    with _statements(engine) as issued:
        found = repo.undecided_versions_of_ended_trainings(limit=10)
    assert [(v.id, t.id) for v, t in found] == [("v", "t")]
    reads = [(sql, params) for sql, params in issued if "gate_status" in sql]
    assert len(reads) == 1, issued
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            sql, params = reads[0]
            plan = " ".join(str(row[-1]) for row in
                            conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "SEARCH versions USING INDEX ix_versions_gate_status" in plan, (sql, plan)
    migrate(engine, "0025", down=True)
    assert "ix_versions_gate_status" not in {
        ix["name"] for ix in inspect(engine).get_indexes("versions")}
    migrate(engine, "head")
    assert "ix_versions_gate_status" in {
        ix["name"] for ix in inspect(engine).get_indexes("versions")}
    assert [v.id for v, _t in SqlRepository(engine).undecided_versions_of_ended_trainings(
        limit=10)] == ["v"]


def test_the_migration_log_line_masks_a_password_given_as_a_query_parameter(
        caplog: pytest.LogCaptureFixture) -> None:
    """The socket form has no other place for a password than the query; it was logged."""
    import logging

    from sqlalchemy import create_engine

    from selfie_lora.adapters.db import migrate as migrate_module

    caplog.set_level(logging.DEBUG, logger=migrate_module.__name__)
    for url, where in [
        ("postgresql+psycopg://u@db:5432/prod?password=s3cret",
         "postgresql+psycopg://u@db:5432/prod?password=***"),
        ("postgresql+psycopg:///prod?host=/run/pg&password=s3cret",
         "postgresql+psycopg:///prod?host=/run/pg&password=***"),
    ]:
        caplog.clear()
        unconnected = create_engine(url)  # the line is made from its URL alone
        migrate_module._log_migration(unconnected, before=["0018"], after=["0023"])
        [record] = [r for r in caplog.records if r.name == migrate_module.__name__]
        assert "s3cret" not in record.getMessage()
        assert record.getMessage().startswith(f"database schema upgraded from 0018 to 0023: {where};")
