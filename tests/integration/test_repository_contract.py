"""One contract suite, run against every database the repository supports."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, inspect, text, update

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.db.tables import GenerationRow
from selfie_lora.domain.accounts import (
    ERASURE_PENDING,
    AccountErasingError,
    ErasurePlan,
    HoldingsChangedError,
    UserHoldings,
)
from selfie_lora.domain.entities import (
    ApiKey,
    Dataset,
    Finding,
    GateStatus,
    Generation,
    Model,
    Recipe,
    Training,
    TrainingStatus,
    User,
    Version,
    WebSession,
)
from selfie_lora.errors import (
    STORAGE_RETRY_AFTER,
    ConflictError,
    DatabaseLockedError,
    ErrorCode,
    InvalidInputError,
    StorageError,
)
from selfie_lora.services.generation import MAX_SEED

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RECIPE = Recipe(name="local-tiny-v1", steps=10, lora_rank=4, learning_rate=1e-2, resolution=64)


# ``repo`` (tests/integration/conftest.py): a repository on every database it supports.


def seed(repo: SqlRepository, name: str = "ann") -> tuple[User, Model, Dataset]:
    user = User(id=f"u-{name}", name=name, created_at=NOW)
    repo.add_user(user)
    repo.add_api_key(ApiKey(id=f"k-{name}", user_id=user.id, name="default",
                            key_hash=f"h-{name}", prefix="sl_x", created_at=NOW))
    model = Model(id=f"m-{name}", user_id=user.id, backend="local", trigger_word="zkr47v",
                  destination=f"local/selfie-lora-{name}", trainer_version="local-tiny-v1",
                  lora_scale=1.0, lora_scale_is_custom=False, active_version_id=None,
                  created_at=NOW)
    repo.add_model(model)
    dataset = Dataset(id=f"d-{name}", user_id=user.id, images_total=2, images_accepted=2,
                      photo_hashes=("a" * 64, "b" * 64),
                      findings=(Finding("warn", "blur", "m", "a", photo="x.jpg"),),
                      accepted=True, sha256="c" * 64, created_at=NOW)
    repo.add_dataset(dataset)
    return user, model, dataset


def training(model: Model, dataset: Dataset, tid: str, *,
             status: TrainingStatus = TrainingStatus.QUEUED, offset: int = 0) -> Training:
    return Training(id=tid, model_id=model.id, dataset_id=dataset.id, backend="local",
                    status=status, is_retraining=False, trigger_word=model.trigger_word,
                    destination=model.destination, trainer_version=model.trainer_version,
                    recipe=RECIPE, preserved={"k": "v"}, created_at=NOW + timedelta(seconds=offset))

def version(model: Model, number: int, *, vid: str | None = None,
            training_id: str | None = None) -> Version:
    """Version ``number`` of ``model``, made by training ``t<number>`` unless told."""
    return Version(id=vid or f"v{number}", model_id=model.id, number=number,
                   training_id=training_id or f"t{number}", trainer_version="local-tiny-v1",
                   weights_key=f"weights/{number}", weights_sha256=str(number % 10) * 64,
                   weights_method="local:file", remote_version=None, version_mismatch=False,
                   created_at=NOW)

def with_two_versions(repo: SqlRepository) -> tuple[Model, Dataset]:
    """A user's model with versions 1 and 2, of succeeded trainings t1 and t2."""
    _user, model, dataset = seed(repo)
    for i in (1, 2):
        repo.add_training(training(model, dataset, f"t{i}", status=TrainingStatus.SUCCEEDED,
                                   offset=i))
        repo.add_version(version(model, i))
    return model, dataset




def test_migrations_create_every_table(repo: SqlRepository) -> None:
    tables = set(inspect(repo.engine).get_table_names())
    assert {"users", "models", "datasets", "trainings", "versions", "generations",
            "events", "alembic_version"} <= tables
    upgrade(repo.engine)  # running again is a no-op


def test_the_deployment_id_is_made_once_and_racing_makers_agree(repo: SqlRepository) -> None:
    # The id binds the blob store to this database (services.deployment): processes that start
    # at once on a database that has none must all end up with the same one.
    assert repo.get_deployment_id() is None
    barrier = threading.Barrier(4)
    got: list[str] = []

    def ensure(candidate: str) -> None:
        barrier.wait()
        got.append(repo.ensure_deployment_id(candidate, now=NOW))

    threads = [threading.Thread(target=ensure, args=(f"id-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4
    assert len(set(got)) == 1
    assert got[0] in {f"id-{i}" for i in range(4)}
    assert repo.get_deployment_id() == got[0]
    assert repo.ensure_deployment_id("another", now=NOW) == got[0]


def test_the_deployment_s_storage_is_recorded_once_and_racing_binders_agree(
        repo: SqlRepository) -> None:
    # The storage id (services.deployment): processes that bind their stores at once agree on
    # the first one's; only ``replace`` (the store holds the database's own blobs) changes it.
    repo.ensure_deployment_id("d-1", now=NOW)
    assert repo.get_deployment_storage_id() is None
    barrier = threading.Barrier(4)
    got: list[str] = []

    def bind(candidate: str) -> None:
        barrier.wait()
        got.append(repo.bind_deployment_storage(candidate))

    threads = [threading.Thread(target=bind, args=(f"s-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1
    assert repo.get_deployment_storage_id() == got[0]
    assert repo.bind_deployment_storage("other") == got[0]
    assert repo.bind_deployment_storage("other", replace=True) == "other"


def test_round_trips(repo: SqlRepository) -> None:
    user, model, dataset = seed(repo)
    assert repo.get_user_by_name("ann") == user
    assert repo.get_user_by_key_hash("h-ann", at=NOW) == user
    assert repo.get_model_for_user(user.id) == model
    assert repo.get_dataset(dataset.id) == dataset
    assert repo.latest_accepted_dataset(user.id) == dataset
    t = training(model, dataset, "t1")
    repo.add_training(t)
    assert repo.get_training("t1") == t
    assert repo.get_user_by_name("nobody") is None


def test_a_datasets_face_boxes_round_trip_aligned_with_its_photos(repo: SqlRepository) -> None:
    user, _model, plain = seed(repo)
    assert repo.get_dataset(plain.id) == plain
    assert repo.get_dataset(plain.id).face_boxes == ()  # type: ignore[union-attr]
    boxed = dataclasses.replace(plain, id="d-boxed", created_at=NOW + timedelta(seconds=1),
                                face_boxes=((0.125, 0.2, 0.6875, 0.8), None))
    repo.add_dataset(boxed)
    read = repo.get_dataset("d-boxed")
    assert read == boxed
    assert read is not None
    assert [read.face_box(i) for i in range(2)] == [(0.125, 0.2, 0.6875, 0.8), None]
    assert repo.latest_accepted_dataset(user.id) == boxed


def test_at_most_one_active_training_per_model_in_the_database(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1"))
    with pytest.raises(ConflictError):
        repo.add_training(training(model, dataset, "t2", status=TrainingStatus.PROCESSING))
    done = dataclasses.replace(repo.get_training("t1"), status=TrainingStatus.FAILED)  # type: ignore[arg-type]
    repo.save_training(done)
    repo.add_training(training(model, dataset, "t3", offset=1))  # slot free again
    # Terminal trainings do not count, however many.
    repo.save_training(dataclasses.replace(repo.get_training("t3"),  # type: ignore[arg-type]
                                           status=TrainingStatus.SUCCEEDED))
    repo.add_training(training(model, dataset, "t4", offset=2))
    assert [t.id for t in repo.list_trainings(model.id)] == ["t4", "t3", "t1"]
    assert [t.id for t in repo.active_trainings()] == ["t4"]
    assert repo.count_trainings_by_status() == {"queued": 1, "succeeded": 1, "failed": 1}


def test_concurrent_inserts_leave_one_active_training(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def insert(i: int) -> None:
        barrier.wait()
        try:
            repo.add_training(training(model, dataset, f"c{i}"))
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]
    assert len(repo.active_trainings()) == 1


def test_one_model_per_user(repo: SqlRepository) -> None:
    _user, model, _dataset = seed(repo)
    with pytest.raises(ConflictError):
        repo.add_model(dataclasses.replace(model, id="m-other", destination="local/other"))


def test_atomic_rolls_back_everything(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1"))
    def both() -> None:
        with repo.atomic() as tx:
            tx.add_event(model_id=model.id, kind="x", data={})
            tx.add_training(training(model, dataset, "t2"))

    with pytest.raises(ConflictError):
        both()
    assert repo.list_events(model.id) == []
    assert repo.get_training("t2") is None


def test_a_write_inside_atomic_is_read_back_by_the_same_transaction(repo: SqlRepository) -> None:
    # Outside atomic() a write's UPDATE runs in a session of its own, with nothing to keep in
    # step; inside, the rows read earlier in the transaction are in its session and a read
    # after the write must not hand back what they held before it.
    _user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1"))
    repo.add_version(version(model, 1))
    with repo.atomic() as tx:
        before = tx.get_training("t1", for_update=True)
        assert before is not None
        assert tx.get_model(model.id) is not None
        assert tx.get_version("v1") is not None
        tx.save_training(dataclasses.replace(before, status=TrainingStatus.PROCESSING,
                                             remote_id="r-1"))
        tx.set_model_lora_scale(model.id, 0.7, is_custom=True)
        tx.set_version_gate("v1", status=GateStatus.HELD, reason="dropped", details={"d": 1})
        after = tx.get_training("t1")
        now = tx.get_model(model.id)
        held = tx.get_version("v1")
    assert after is not None
    assert (after.status, after.remote_id) == (TrainingStatus.PROCESSING, "r-1")
    assert now is not None
    assert (now.lora_scale, now.lora_scale_is_custom) == (0.7, True)
    assert held is not None
    assert (held.gate_status, held.gate_reason) == (GateStatus.HELD, "dropped")
    outside = repo.get_training("t1")
    assert outside is not None
    assert outside.remote_id == "r-1"


def test_targeted_model_updates_do_not_clobber_each_other(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    stale = repo.get_model(model.id)
    repo.set_model_lora_scale(model.id, 0.6, is_custom=True)
    repo.add_training(training(model, dataset, "t1"))
    repo.add_version(version(model, 1))
    assert stale is not None
    repo.set_model_active_version(stale.id, "v1")
    now = repo.get_model(model.id)
    assert now is not None
    assert (now.lora_scale, now.lora_scale_is_custom, now.active_version_id) == (0.6, True, "v1")
    repo.set_model_pin(model.id, backend="local", trainer_version="local-flux-v1",
                       destination=model.destination)
    now = repo.get_model(model.id)
    assert now is not None
    assert (now.backend, now.trainer_version) == ("local", "local-flux-v1")
    assert now.lora_scale == 0.6


def test_a_users_training_is_read_with_its_version_and_never_another_users(
        repo: SqlRepository) -> None:
    from dataclasses import replace

    ann, model, dataset = seed(repo, "ann")
    bob, bobs_model, bobs_dataset = seed(repo, "bob")
    assert repo.get_user_training(ann.id, None) is None  # a model, no training yet
    first = training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED)
    repo.add_training(first)
    repo.add_version(version(model, 1))
    repo.save_training(replace(first, version_id="v1"))
    repo.add_training(training(model, dataset, "t2", offset=60))
    repo.add_training(training(bobs_model, bobs_dataset, "t3", offset=120))

    latest = repo.get_user_training(ann.id, None)
    assert latest is not None
    assert (latest[0].id, latest[1]) == ("t2", None)  # the newest, which has no version yet
    chosen = repo.get_user_training(ann.id, "t1")
    assert chosen is not None
    assert (chosen[0].id, chosen[0].version_id) == ("t1", "v1")
    assert chosen[1] is not None
    assert chosen[1].number == 1
    assert repo.get_user_training(ann.id, "t3") is None  # bob's
    assert repo.get_user_training(bob.id, None) is not None
    assert repo.get_user_training(bob.id, "t1") is None
    assert repo.get_user_training("nobody", None) is None


def test_an_override_is_recorded_beside_the_gates_decision(repo: SqlRepository) -> None:
    with_two_versions(repo)
    repo.set_version_gate("v2", status=GateStatus.HELD, reason="likeness dropped",
                          details={"before": {"identity": 0.9}})
    repo.set_version_override("v2", {"by": "user", "replaced_version_id": "v1"})
    v2 = repo.get_version("v2")
    assert v2 is not None
    assert (v2.gate_status, v2.gate_reason) == (GateStatus.HELD, "likeness dropped")
    assert v2.gate_details == {"before": {"identity": 0.9},
                               "override": {"by": "user", "replaced_version_id": "v1"}}
    with pytest.raises(StorageError):
        repo.set_version_override("nope", {})


def test_a_due_alert_is_claimed_by_one_process_at_a_time(repo: SqlRepository) -> None:
    with_two_versions(repo)
    repo.set_version_alert("v1", {"kind": "likeness_drop"}, due_at=NOW + timedelta(minutes=1))
    repo.set_version_alert("v2", {"kind": "not_scored"}, due_at=NOW)
    assert repo.due_alerts(NOW - timedelta(seconds=1), limit=10) == []
    assert repo.due_alerts(NOW + timedelta(minutes=1), limit=10) == ["v2", "v1"]  # longest due
    assert repo.due_alerts(NOW + timedelta(minutes=1), limit=1) == ["v2"]

    later = NOW + timedelta(minutes=5)
    claimed = repo.claim_alert("v2", now=NOW, until=later)
    assert claimed is not None
    assert claimed.alert == {"kind": "not_scored"}
    assert repo.claim_alert("v2", now=NOW, until=later) is None  # taken
    assert repo.claim_alert("v1", now=NOW, until=later) is None  # not due yet
    assert repo.due_alerts(NOW + timedelta(minutes=1), limit=10) == ["v1"]
    assert repo.claim_alert("v2", now=later, until=later + timedelta(minutes=5)) is not None

    # Many processes at once: one wins.
    repo.set_version_alert("v1", {"kind": "likeness_drop"}, due_at=NOW)
    start = threading.Barrier(6)
    won: list[bool] = []

    def claim() -> None:
        start.wait()
        won.append(repo.claim_alert("v1", now=NOW, until=later) is not None)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(won) == [False] * 5 + [True]

    repo.set_version_alert("v1", {"kind": "likeness_drop", "delivery": {"delivered": True}})
    stored = repo.get_version("v1")
    assert stored is not None
    assert stored.alert == {"kind": "likeness_drop", "delivery": {"delivered": True}}
    assert "v1" not in repo.due_alerts(NOW + timedelta(days=365), limit=10)


def test_an_alert_s_outcome_is_recorded_only_under_the_claim_that_sent_it(
        repo: SqlRepository) -> None:
    with_two_versions(repo)
    alert = {"alert_id": "likeness_drop:v1", "delivery": None}
    repo.set_version_alert("v1", alert, due_at=NOW)
    # Microseconds, as a clock gives them: the compare-and-set is on the exact time stored.
    first = NOW + timedelta(minutes=5, microseconds=123457)
    second = first + timedelta(minutes=5, microseconds=1)
    assert repo.claim_alert("v1", now=NOW, until=first) is not None
    # The first sender's claim runs out while it sends; a second one takes the alert over.
    assert repo.claim_alert("v1", now=first, until=second) is not None

    failed = {**alert, "delivery": {"delivered": False, "attempts": 1}}
    delivered = {**alert, "delivery": {"delivered": True, "attempts": 1}}
    assert not repo.record_alert_delivery("v1", failed, claim=first,
                                          due_at=first + timedelta(minutes=1))
    stored = repo.get_version("v1")
    assert stored is not None
    assert stored.alert == alert  # nothing written
    assert repo.due_alerts(second - timedelta(microseconds=1), limit=10) == []  # still claimed
    assert repo.due_alerts(second, limit=10) == ["v1"]

    assert repo.record_alert_delivery("v1", delivered, claim=second, due_at=None)
    stored = repo.get_version("v1")
    assert stored is not None
    assert stored.alert == delivered
    # Recorded (no due time): no claim matches it any more, and the record stands.
    assert not repo.record_alert_delivery("v1", failed, claim=second,
                                          due_at=second + timedelta(minutes=1))
    assert not repo.record_alert_delivery("v1", failed, claim=first,
                                          due_at=first + timedelta(minutes=1))
    stored = repo.get_version("v1")
    assert stored is not None
    assert stored.alert == delivered
    assert repo.due_alerts(NOW + timedelta(days=365), limit=10) == []
    assert not repo.record_alert_delivery("nope", delivered, claim=second, due_at=None)


def test_save_training_never_clears_a_cancel_request(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1"))
    stale = repo.get_training("t1")
    repo.request_cancel("t1")
    assert stale is not None
    repo.save_training(dataclasses.replace(stale, step=3))
    now = repo.get_training("t1")
    assert now is not None
    assert now.cancel_requested is True
    assert now.step == 3


def test_a_training_keeps_the_marker_of_its_remote_create(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1"))
    assert repo.get_training("t1").remote_marker is None  # type: ignore[union-attr]
    stored = repo.get_training("t1")
    assert stored is not None
    marker = "https://api.replicate.com/v1/files/" + "f" * 200  # longer than an id column
    repo.save_training(dataclasses.replace(stored, remote_create_started=True,
                                           remote_marker=marker))
    again = repo.get_training("t1")
    assert again is not None
    assert again.remote_marker == marker
    assert again.remote_create_started is True


def test_remote_cancels_pending_are_listed_until_cleared(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    ended = dataclasses.replace(training(model, dataset, "t1", status=TrainingStatus.FAILED),
                                remote_id="r1", remote_cancel_pending=True)
    repo.add_training(ended)
    repo.add_training(dataclasses.replace(
        training(model, dataset, "t2", status=TrainingStatus.CANCELED, offset=1), remote_id="r2"))
    assert [t.id for t in repo.remote_cancels_pending()] == ["t1"]
    assert repo.get_training("t1").remote_cancel_pending  # type: ignore[union-attr]
    repo.clear_remote_cancel("t1")
    assert repo.remote_cancels_pending() == []
    assert not repo.get_training("t1").remote_cancel_pending  # type: ignore[union-attr]


def test_the_largest_seed_and_a_long_weights_method_are_stored(repo: SqlRepository) -> None:
    """The API takes seeds up to 2**32-1, and the weights method is built from the trainer's
    output (file names in Replicate's archive): PostgreSQL refused a seed past 2**31-1
    (INTEGER) and a method past 200 characters (VARCHAR(200)), after the work was done."""
    user, model, dataset = seed(repo)
    method = "replicate weights: tar member output/" + "flux_train_replicate_" * 12 + "/lora"
    repo.add_training(dataclasses.replace(
        training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED), weights_method=method))
    repo.add_version(dataclasses.replace(version(model, 1), weights_method=method))
    repo.add_generation(Generation(id="g1", user_id=user.id, model_id=model.id, version_id="v1",
                                   prompt="p", lora_scale=1.0, seed=MAX_SEED,
                                   image_keys=("generations/g1/0.png",), created_at=NOW))
    assert repo.get_training("t1").weights_method == method  # type: ignore[union-attr]
    assert repo.get_version("v1").weights_method == method  # type: ignore[union-attr]
    assert repo.get_generation("g1").seed == MAX_SEED  # type: ignore[union-attr]


def test_a_generation_s_withheld_pictures_are_stored(repo: SqlRepository) -> None:
    """The batch places of the pictures the generator withheld are kept with the generation
    (the gallery names them), and a generation without any reads back none."""
    user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED))
    repo.add_version(version(model, 1))
    repo.add_generation(Generation(id="g1", user_id=user.id, model_id=model.id, version_id="v1",
                                   prompt="p", lora_scale=1.0, seed=7,
                                   image_keys=("generations/g1/0.png", "generations/g1/2.png"),
                                   created_at=NOW, withheld=(1, 3)))
    repo.add_generation(Generation(id="g2", user_id=user.id, model_id=model.id, version_id="v1",
                                   prompt="p", lora_scale=1.0, seed=7,
                                   image_keys=("generations/g2/0.png",), created_at=NOW))
    assert repo.get_generation("g1").withheld == (1, 3)  # type: ignore[union-attr]
    assert repo.get_generation("g2").withheld == ()  # type: ignore[union-attr]
    assert {g.id: g.withheld for g in repo.list_generations(user.id)} == {"g1": (1, 3), "g2": ()}


def test_a_nul_is_invalid_input_and_other_refused_values_storage_errors(
        repo: SqlRepository) -> None:
    """PostgreSQL refuses a NUL in any text, a lookup's included: the input's fault, a 422, not
    the database failing (a 500). A value past a column's bound stays a storage error: a check
    this code missed, not the client's fault. SQLite holds both."""
    seed(repo)
    nul_user = User(id="u-nul", name="b\x00b", created_at=NOW)
    long_user = User(id="u-long", name="b" * 101, created_at=NOW)  # users.name: VARCHAR(100)
    if repo.engine.dialect.name == "postgresql":
        with pytest.raises(InvalidInputError) as refused:
            repo.get_training("x\x00")
        assert refused.value.code == ErrorCode.UNSTORABLE_TEXT
        with pytest.raises(InvalidInputError):
            repo.add_user(nul_user)
        with pytest.raises(StorageError, match=r"^database error: "):
            repo.add_user(long_user)
    else:
        assert repo.get_training("x\x00") is None
        repo.add_user(nul_user)
        repo.add_user(long_user)
    assert repo.get_user_by_name("ann") is not None  # the database goes on answering


def test_versions_newest_first_and_numbers_unique(repo: SqlRepository) -> None:
    model, dataset = with_two_versions(repo)
    assert [v.number for v in repo.list_versions(model.id)] == [2, 1]
    repo.add_training(training(model, dataset, "t3", status=TrainingStatus.SUCCEEDED))
    with pytest.raises(ConflictError):
        repo.add_version(version(model, 2, vid="v3", training_id="t3"))


def test_versions_are_read_by_id_within_their_model_only(repo: SqlRepository) -> None:
    model, _dataset = with_two_versions(repo)
    _bob, bobs, _ = seed(repo, "bob")
    assert {v.number for v in repo.versions_by_ids(model.id, ["v2", "gone"])} == {2}
    assert {v.id for v in repo.versions_by_ids(model.id, {"v1", "v2"})} == {"v1", "v2"}
    assert repo.versions_by_ids(bobs.id, ["v1"]) == []  # ann's
    assert repo.versions_by_ids(model.id, []) == []


def test_remote_id_lookup_and_events(repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    t = dataclasses.replace(training(model, dataset, "t1"), remote_id="r-123")
    repo.add_training(t)
    found = repo.get_training_by_remote_id("r-123")
    assert found is not None
    assert found.id == "t1"
    repo.add_event(model_id=model.id, kind="training_queued", data={"a": 1})
    repo.add_event(model_id=model.id, kind="training_succeeded", data={"b": [1, 2]})
    assert [e["kind"] for e in repo.list_events(model.id)] == ["training_queued",
                                                               "training_succeeded"]
    repo.add_event(model_id=model.id, kind="training_queued", data={})
    assert repo.count_events(model.id, kind="training_queued") == 2
    assert repo.count_events(model.id, kind="version_activated") == 0
    assert repo.count_events("another-model", kind="training_queued") == 0


def test_api_keys_authenticate_until_revoked(repo: SqlRepository) -> None:
    ann, _model, _dataset = seed(repo)
    later = NOW + timedelta(seconds=2)
    assert repo.get_user_by_key_hash("h-ann", at=NOW) == ann
    second = ApiKey(id="k2", user_id=ann.id, name="ci", key_hash="h-2", prefix="sl_y",
                    created_at=NOW + timedelta(seconds=1))
    repo.add_api_key(second)
    assert [k.id for k in repo.list_api_keys(ann.id)] == ["k-ann", "k2"]
    assert repo.get_api_key("k2") == second
    assert repo.get_api_key("no-such-key") is None
    repo.revoke_api_key("k-ann", at=later)
    assert repo.get_user_by_key_hash("h-ann", at=later) is None
    assert repo.get_user_by_key_hash("h-ann", at=NOW) == ann  # it worked until then
    assert repo.get_user_by_key_hash("h-2", at=later) == ann
    revoked = repo.list_api_keys(ann.id)[0]
    assert revoked.revoked_at == later
    repo.revoke_api_key("k-ann", at=NOW + timedelta(days=1))  # a second revoke changes nothing
    assert repo.list_api_keys(ann.id)[0].revoked_at == later
    with pytest.raises(ConflictError):  # a key hash is unique
        repo.add_api_key(dataclasses.replace(second, id="k3"))


def test_a_write_conflict_says_no_words_of_the_database(
        repo: SqlRepository, caplog: pytest.LogCaptureFixture) -> None:
    """The API answers a conflict's message as it is (409 ``write_conflict``): it was the
    driver's text, "conflicting write: UNIQUE constraint failed: api_keys.key_hash" (on
    PostgreSQL the constraint's name and a DETAIL with the other row's values)."""
    ann, _model, _dataset = seed(repo)
    with caplog.at_level("INFO", logger="selfie_lora.adapters.db.repository"), \
            pytest.raises(ConflictError) as raised:
        repo.add_api_key(ApiKey(id="k-same-hash", user_id=ann.id, name="ci", key_hash="h-ann",
                                prefix="sl_z", created_at=NOW))
    assert raised.value.code is ErrorCode.WRITE_CONFLICT
    said = raised.value.message.lower()
    assert [w for w in ("unique", "constraint", "duplicate", "api_keys", "key_hash", "h-ann")
            if w in said] == [], said
    assert "send the request again" in said
    # The operator's words, in the log.
    assert any("key_hash" in r.getMessage() for r in caplog.records), caplog.text


def test_a_replaced_api_key_works_until_its_end_and_a_revocation_cuts_it_short(
        repo: SqlRepository) -> None:
    ann, _model, _dataset = seed(repo)
    end = NOW + timedelta(minutes=10)
    repo.add_api_key(ApiKey(id="k2", user_id=ann.id, name="default", key_hash="h-2",
                            prefix="sl_y", created_at=NOW))
    with repo.atomic() as tx:
        assert tx.get_api_key("k-ann", for_update=True) is not None
        tx.replace_api_key("k-ann", by="k2", stops_at=end)
    replaced = repo.get_api_key("k-ann")
    assert replaced is not None
    assert (replaced.replaced_by, replaced.revoked_at) == ("k2", end)
    assert repo.get_user_by_key_hash("h-ann", at=end - timedelta(seconds=1)) == ann
    assert repo.get_user_by_key_hash("h-ann", at=end) is None
    repo.revoke_api_key("k-ann", at=NOW + timedelta(minutes=1))  # a revocation: at once
    assert repo.get_user_by_key_hash("h-ann", at=NOW + timedelta(minutes=1)) is None
    cut = repo.get_api_key("k-ann")
    assert cut is not None
    assert cut.revoked_at == NOW + timedelta(minutes=1)


def test_passwords_sessions_and_sign_in_failures(repo: SqlRepository) -> None:
    ann, _model, _dataset = seed(repo)
    bob, _m, _d = seed(repo, "bob")
    assert repo.get_password_hash(ann.id) is None
    repo.set_user_password(ann.id, "$argon2id$x")
    assert repo.get_password_hash(ann.id) == "$argon2id$x"
    assert repo.get_password_hash(bob.id) is None
    with pytest.raises(StorageError):
        repo.set_user_password("nobody", "h")

    def session(sid: str, user: User, *, days: int) -> WebSession:
        return WebSession(id=sid, user_id=user.id, csrf_token=f"csrf-{sid}", created_at=NOW,
                          expires_at=NOW + timedelta(days=days))

    for s in (session("s1", ann, days=1), session("s2", ann, days=10),
              session("s3", bob, days=1)):
        repo.add_session(s)
    assert repo.get_session("s1") == session("s1", ann, days=1)
    assert repo.get_session("nope") is None
    repo.delete_session("s1")
    assert repo.get_session("s1") is None
    assert repo.delete_sessions(expired_before=NOW + timedelta(days=2)) == 1  # bob's s3
    assert repo.get_session("s2") is not None
    assert repo.delete_sessions(user_id=ann.id) == 1
    assert repo.get_session("s2") is None
    with pytest.raises(ValueError, match="never every session"):
        repo.delete_sessions()

    repo.add_sign_in_failure(["name:ann", "client:1.2.3.4"], at=NOW)
    repo.add_sign_in_failure(["name:ann"], at=NOW + timedelta(minutes=5))
    assert sorted(repo.sign_in_failures("name:ann", since=NOW - timedelta(seconds=1))) == [
        NOW, NOW + timedelta(minutes=5)]
    assert repo.sign_in_failures("name:ann", since=NOW) == [NOW + timedelta(minutes=5)]
    assert repo.sign_in_failures("client:1.2.3.4", since=NOW - timedelta(seconds=1)) == [NOW]
    assert repo.prune_sign_in_failures(before=NOW + timedelta(minutes=1)) == 2
    assert repo.sign_in_failures("name:ann", since=NOW - timedelta(days=1)) == [
        NOW + timedelta(minutes=5)]
    # An attempt reserved under its keys' locks, then taken back (a correct password).
    with repo.atomic() as tx:
        tx.lock_sign_in_keys(["name:bob", "client:5.6.7.8"])
        pending = tx.add_sign_in_failure(["name:bob", "client:5.6.7.8"], at=NOW)
    assert len(set(pending)) == 2
    assert repo.sign_in_failures("name:bob", since=NOW - timedelta(seconds=1)) == [NOW]
    assert repo.delete_sign_in_failures(pending) == 2
    assert repo.delete_sign_in_failures([]) == 0
    assert repo.sign_in_failures("name:bob", since=NOW - timedelta(days=1)) == []
    assert repo.sign_in_failures("client:5.6.7.8", since=NOW - timedelta(days=1)) == []


def test_reads_do_not_wait_for_a_writer_and_see_the_last_commit(repo: SqlRepository) -> None:
    # On SQLite a read that took the write lock waited for every writer (up to the 30 s busy
    # timeout, then failed): each read of the API queued behind the others and the worker.
    ann, model, _dataset = seed(repo)
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with repo.atomic() as tx:
            tx.set_model_lora_scale(model.id, 0.5, is_custom=True)
            writing.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(30)
        seen: list[object] = []
        reader = threading.Thread(target=lambda: seen.append(repo.get_model_overview(ann.id)))
        reader.start()
        reader.join(10)  # a guard against a hang, not a speed limit
        assert not reader.is_alive(), "a read waited for the open write transaction"
        assert seen == [(model, None, None)]  # the last commit, not the open transaction
    finally:
        release.set()
        thread.join()
    changed = repo.get_model(model.id)
    assert changed is not None
    assert changed.lora_scale == 0.5



def test_every_failure_of_the_database_is_a_storage_error(repo: SqlRepository) -> None:
    """Not only the driver's OperationalError: sqlalchemy's own errors (here its pool, which
    stayed exhausted past its timeout, as PostgreSQL's 15 connections can under load) and the
    driver's others (here a table that is not there: ProgrammingError on PostgreSQL). A vendor
    error that passes the repository ends whatever meets it unexpectedly: it killed the
    heartbeat of a running training, whose lease was then taken over."""
    ann, _model, _dataset = seed(repo)
    url = repo.engine.url.render_as_string(hide_password=False)
    one_connection = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.05)
    try:
        tight = SqlRepository(one_connection)
        # The only connection, held meanwhile.
        with one_connection.connect(), pytest.raises(StorageError, match=r"^database error: "):
            tight.get_user(ann.id)
        assert tight.get_user(ann.id) == ann  # the pool is back
        with one_connection.begin() as conn:
            conn.execute(text("DROP TABLE web_sessions"))
        with pytest.raises(StorageError, match=r"^database error: "):
            tight.get_session("s1")
    finally:
        one_connection.dispose()


def test_model_owners_are_listed_oldest_first_up_to_the_limit(repo: SqlRepository) -> None:
    assert repo.list_model_owners(limit=2) == []
    ann, _model, _dataset = seed(repo, "ann")
    assert repo.list_model_owners(limit=2) == [ann.id]
    bob, _model, _dataset = seed(repo, "bob")
    repo.add_user(User(id="u-cat", name="cat", created_at=NOW))  # no model: not listed
    assert repo.list_model_owners(limit=2) == [ann.id, bob.id]
    assert repo.list_model_owners(limit=1) == [ann.id]


def test_users_are_listed_with_their_working_keys_and_disabled_and_enabled(
        repo: SqlRepository) -> None:
    ann, _m, _d = seed(repo)
    seed(repo, "bob")
    repo.add_api_key(ApiKey(id="k-ann-2", user_id=ann.id, name="laptop", key_hash="h-ann-2",
                            prefix="sl_y", created_at=NOW))
    repo.revoke_api_key("k-bob", at=NOW)
    repo.set_user_password(ann.id, "$argon2id$x")
    listed = repo.list_users(at=NOW + timedelta(seconds=1))
    assert [(u.user.name, u.keys, u.has_password) for u in listed] == [
        ("ann", 2, True), ("bob", 0, False)]
    assert listed[0].user.disabled_at is None
    repo.set_user_disabled(ann.id, at=NOW)
    assert repo.get_user(ann.id) == dataclasses.replace(ann, disabled_at=NOW)
    assert repo.get_user_by_key_hash("h-ann", at=NOW) == dataclasses.replace(
        ann, disabled_at=NOW)
    assert repo.list_users(at=NOW)[0].user.disabled_at == NOW
    repo.set_user_disabled(ann.id, at=None)
    assert repo.get_user(ann.id) == ann
    with pytest.raises(StorageError):
        repo.set_user_disabled("nobody", at=NOW)


def test_a_deletion_asked_for_is_found_pending_once_due_and_claimed_by_one_alone(
        repo: SqlRepository) -> None:
    """``AccountEraser.finish_pending``'s claim: the first of two finishers moves the time on,
    the second (its view of the row older) changes nothing."""
    ann, _m, _d = seed(repo)
    bob, _m2, _d2 = seed(repo, "bob")
    assert repo.pending_erasures(requested_before=NOW + timedelta(days=1)) == []
    assert repo.request_erasure(ann.id, at=NOW)
    assert not repo.request_erasure("nobody", at=NOW)
    assert repo.get_user(ann.id) == dataclasses.replace(ann, erasure_requested_at=NOW)
    assert repo.list_users(at=NOW)[0].user.erasure_requested_at == NOW
    assert repo.pending_erasures(requested_before=NOW - timedelta(seconds=1)) == []
    due = NOW + timedelta(minutes=1)
    assert [u.name for u in repo.pending_erasures(requested_before=due)] == ["ann"]
    later = NOW + timedelta(minutes=2)
    assert repo.request_erasure(ann.id, at=later, requested_before=due)
    assert not repo.request_erasure(ann.id, at=later, requested_before=due)  # claimed
    assert not repo.request_erasure(bob.id, at=later, requested_before=due)  # never asked
    assert repo.pending_erasures(requested_before=due) == []
    assert [u.name for u in repo.pending_erasures(requested_before=later)] == ["ann"]


def test_every_pending_deletion_is_read_without_a_bound_however_far_ahead_it_is_dated(
        repo: SqlRepository) -> None:
    """``pending_erasures()`` with no ``requested_before``: every deletion asked for, one
    dated years ahead (a machine whose clock ran fast) too, and no account never asked for.
    ``AccountEraser`` read them all with a bound a year ahead, which missed such a one."""
    ann, _m, _d = seed(repo)
    seed(repo, "bob")
    cy, _m3, _d3 = seed(repo, "cy")
    assert repo.pending_erasures() == []
    ahead = NOW + timedelta(days=3 * 365)
    assert repo.request_erasure(ann.id, at=ahead)
    assert repo.request_erasure(cy.id, at=NOW)
    assert [u.name for u in repo.pending_erasures()] == ["cy", "ann"]  # oldest first
    assert [u.name for u in repo.pending_erasures(requested_before=NOW)] == ["cy"]
    assert repo.pending_erasures(requested_before=None) == repo.pending_erasures()


def test_a_users_rows_are_read_and_deleted_and_no_one_elses(repo: SqlRepository) -> None:
    """``users delete``: what a user owns, then every row of theirs in one transaction (the
    foreign keys never refuse: children first), then the user; another user's rows stay."""
    ann, model, dataset = seed(repo, "ann")
    bob, bobs_model, bobs_dataset = seed(repo, "bob")
    repo.add_training(training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED))
    repo.add_version(version(model, 1))
    repo.set_model_active_version(model.id, "v1")
    repo.add_training(training(model, dataset, "t2", offset=60))
    repo.add_training(training(bobs_model, bobs_dataset, "t3"))
    repo.add_version(version(bobs_model, 1, vid="bv1", training_id="t3"))
    for user, model_, vid in ((ann, model, "v1"), (bob, bobs_model, "bv1")):
        repo.add_generation(Generation(id=f"g-{user.name}", user_id=user.id,
                                       model_id=model_.id, version_id=vid, prompt="p",
                                       lora_scale=1.0, seed=1,
                                       image_keys=(f"generations/g-{user.name}/0.png",),
                                       created_at=NOW))
        repo.add_event(model_id=model_.id, kind="k", data={})
        repo.add_session(WebSession(id=f"s-{user.name}", user_id=user.id, csrf_token="c",
                                    created_at=NOW, expires_at=NOW + timedelta(days=1)))

    held = repo.user_holdings(ann.id)
    assert held.model_id == model.id
    assert held.dataset_ids == (dataset.id,)
    assert held.photo_hashes == ("a" * 64, "b" * 64)
    assert sorted(held.training_ids) == ["t1", "t2"]
    assert held.active_training_ids == ("t2",)
    assert (held.version_ids, held.weights_keys) == (("v1",), ("weights/1",))
    assert (held.generation_ids, held.image_keys) == (("g-ann",), ("generations/g-ann/0.png",))

    bobs = repo.user_holdings(bob.id)
    assert repo.erasure_plan(ann.id) is None
    plan = ErasurePlan(keys=("photos/aa", "weights/1"), prefixes=("generations/g-ann",),
                       work_folders=("t1", "t2"))
    rows = repo.delete_user_data(ann.id, plan=plan, held=held)
    assert rows == {"generations": 1, "versions": 1, "trainings": 2, "events": 1,
                    "models": 1, "datasets": 1, "api keys": 1, "browser sessions": 1}
    assert repo.user_holdings(ann.id).empty
    # Stored with the rows' deletion: a run killed now finds what the blobs were.
    assert repo.erasure_plan(ann.id) == plan
    assert repo.erasure_plan(bob.id) is None
    # Again: nothing left, no error.
    assert repo.delete_user_data(ann.id, plan=plan, held=UserHoldings()) == {}
    assert repo.erasure_plan(ann.id) == plan
    assert repo.delete_user(ann.id)
    assert repo.erasure_plan(ann.id) is None
    assert not repo.delete_user(ann.id)
    assert repo.get_user_by_name("ann") is None
    assert repo.user_holdings(bob.id) == bobs
    assert repo.get_user_by_name("bob") is not None
    assert repo.get_session("s-bob") is not None
    assert len(repo.list_api_keys(bob.id)) == 1


def test_a_generation_committed_while_the_users_rows_are_deleted_is_seen_by_the_deletion(
        repo: SqlRepository) -> None:
    """A generation of the user committed while ``delete_user_data`` runs (one finishing as its
    account is deleted): the deletion waits for it and sees it (on SQLite the write lock
    orders them). Not in the holdings its plan was made from, it is refused and deletes
    nothing, and planned again it goes with the rest. On PostgreSQL the deletion's statements
    had not seen it, and its delete of the versions failed on the generation's foreign key (a
    409 ``write_conflict``, the deletion parked)."""
    ann, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED))
    repo.add_version(version(model, 1))
    held = repo.user_holdings(ann.id)
    written, release = threading.Event(), threading.Event()

    def generate() -> None:
        with repo.atomic() as tx:
            tx.add_generation(Generation(
                id="g1", user_id=ann.id, model_id=model.id, version_id="v1", prompt="p",
                lora_scale=1.0, seed=1, image_keys=("generations/g1/0.png",), created_at=NOW))
            written.set()
            release.wait(10)

    generator = threading.Thread(target=generate)
    generator.start()
    assert written.wait(10)
    outcome: dict[str, object] = {}

    def delete() -> None:
        try:
            outcome["rows"] = repo.delete_user_data(ann.id, plan=ErasurePlan(), held=held)
        except Exception as exc:  # shown by the assertion below
            outcome["error"] = exc

    deleter = threading.Thread(target=delete)
    deleter.start()
    deleter.join(0.5)  # it waits for the generation (SQLite's lock, PostgreSQL's row lock)
    release.set()
    generator.join(10)
    deleter.join(30)
    # Not a foreign key's write conflict (a ConflictError too): the generation was seen.
    assert type(outcome.get("error")) is HoldingsChangedError, outcome
    assert repo.user_holdings(ann.id).generation_ids == ("g1",)  # nothing deleted
    assert repo.erasure_plan(ann.id) is None
    assert repo.delete_user_data(ann.id, plan=ErasurePlan(),
                                 held=repo.user_holdings(ann.id)) == {
        "generations": 1, "versions": 1, "trainings": 1, "models": 1, "datasets": 1,
        "api keys": 1}
    assert repo.user_holdings(ann.id).empty
    assert repo.delete_user(ann.id)


@pytest.mark.parametrize("late", ["generation", "photo set", "more pictures"])
def test_the_users_rows_are_deleted_only_with_the_holdings_their_plan_was_made_from(
        repo: SqlRepository, late: str) -> None:
    """A row saved after the holdings were read (a generation finishing, an upload's photo
    set), or a generation naming a picture they do not: the deletion, given those holdings,
    deletes nothing (its plan would not name that row's blobs, which would then stay in
    storage named by nothing) and stores no plan; given the holdings as they are, it goes."""
    ann, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED))
    repo.add_version(version(model, 1))
    keys: tuple[str, ...] = ("generations/g1/0.png",)
    if late == "more pictures":
        repo.add_generation(Generation(
            id="g1", user_id=ann.id, model_id=model.id, version_id="v1", prompt="p",
            lora_scale=1.0, seed=1, image_keys=keys, created_at=NOW))
        held = repo.user_holdings(ann.id)
        keys = (*keys, "generations/g1/1.png")
        with repo.engine.begin() as c:  # as if read before its second picture was named
            c.execute(update(GenerationRow).where(GenerationRow.id == "g1")
                      .values(image_keys=list(keys)))
    else:
        held = repo.user_holdings(ann.id)
    if late == "generation":
        repo.add_generation(Generation(
            id="g1", user_id=ann.id, model_id=model.id, version_id="v1", prompt="p",
            lora_scale=1.0, seed=1, image_keys=keys, created_at=NOW))
    elif late == "photo set":
        repo.add_dataset(dataclasses.replace(dataset, id="d-late", photo_hashes=("e" * 64,)))
    now = repo.user_holdings(ann.id)
    with pytest.raises(HoldingsChangedError):
        repo.delete_user_data(ann.id, plan=ErasurePlan(keys=("photos/x",)), held=held)
    assert repo.user_holdings(ann.id) == now
    assert repo.erasure_plan(ann.id) is None
    assert len(repo.list_api_keys(ann.id)) == 1
    assert repo.delete_user_data(ann.id, plan=ErasurePlan(keys=("photos/x",)), held=now)
    assert repo.user_holdings(ann.id).empty
    assert repo.erasure_plan(ann.id) == ErasurePlan(keys=("photos/x",))


def test_no_photo_set_model_or_upload_claim_is_stored_for_a_user_being_deleted(
        repo: SqlRepository) -> None:
    """Once a user's deletion was asked for (or the user is gone), their photo set, model or
    upload claim is refused where it is written (403 'being deleted'): stored after the
    deletion took the user's rows, it made the removal of the user's row fail on its foreign
    key."""
    ann, model, dataset = seed(repo)
    bob, _bobs_model, _bobs_dataset = seed(repo, "bob")
    repo.request_erasure(ann.id, at=NOW)
    late = dataclasses.replace(dataset, id="d-late")
    with pytest.raises(AccountErasingError) as refused:
        repo.add_dataset(late)
    assert refused.value.http_status == 403
    assert refused.value.message == ERASURE_PENDING
    with pytest.raises(AccountErasingError):
        repo.claim_upload(ann.id, token="t", now=NOW, expires_at=NOW + timedelta(minutes=5))
    repo.delete_user_data(ann.id, plan=ErasurePlan(), held=repo.user_holdings(ann.id))
    with pytest.raises(AccountErasingError):
        repo.add_model(dataclasses.replace(model, id="m-late"))
    with pytest.raises(AccountErasingError):
        repo.add_dataset(late)
    assert repo.user_holdings(ann.id).empty
    assert repo.delete_user(ann.id)  # nothing left naming her
    with pytest.raises(AccountErasingError):  # gone: refused alike
        repo.add_dataset(late)
    # Another user's are stored as before.
    repo.add_dataset(dataclasses.replace(dataset, id="d-bob-2", user_id=bob.id))
    assert repo.claim_upload(bob.id, token="t", now=NOW,
                             expires_at=NOW + timedelta(minutes=5)) is None


def test_a_photo_set_being_stored_as_the_deletion_is_asked_for_is_seen_by_the_deletion(
        repo: SqlRepository) -> None:
    """A photo set whose transaction is open as the user's deletion is asked for: the marking
    waits for it (the user's row share-locked; SQLite's write lock), so the holdings the
    deletion reads after it name the set; one begun after the marking is refused."""
    ann, _model, dataset = seed(repo)
    written, release = threading.Event(), threading.Event()

    def upload() -> None:
        with repo.atomic() as tx:
            tx.add_dataset(dataclasses.replace(dataset, id="d-open"))
            written.set()
            release.wait(10)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert written.wait(10)
    marker = threading.Thread(target=lambda: repo.request_erasure(ann.id, at=NOW))
    marker.start()
    marker.join(0.5)
    assert marker.is_alive()  # waits for the photo set's transaction
    release.set()
    uploader.join(10)
    marker.join(10)
    assert "d-open" in repo.user_holdings(ann.id).dataset_ids
    with pytest.raises(AccountErasingError):
        repo.add_dataset(dataclasses.replace(dataset, id="d-after"))


def test_dataset_sizes_are_the_accepted_counts_of_those_that_exist_in_one_read(
        repo: SqlRepository) -> None:
    _user, _model, dataset = seed(repo)
    many = [dataclasses.replace(dataset, id=f"d{i}", images_accepted=i) for i in range(1000)]
    with repo.atomic() as tx:  # one commit, not a thousand: 12-16 s of the test's run
        for d in many:
            tx.add_dataset(d)
    assert repo.dataset_sizes([]) == {}
    assert repo.dataset_sizes([dataset.id, "d7", "gone"]) == {dataset.id: 2, "d7": 7}
    # More ids than one IN (...) binds.
    assert repo.dataset_sizes([d.id for d in many]) == {d.id: d.images_accepted for d in many}


def test_trainings_page_newest_first_by_time_then_id_through_ties(repo: SqlRepository) -> None:
    # The training log's pages: trainings made at one instant are ordered by id, so a page
    # boundary between two of them neither repeats nor drops one.
    _user, model, dataset = seed(repo)
    for tid, offset in (("t1", 0), ("t2", 5), ("t3", 5), ("t4", 5), ("t5", 9)):
        repo.add_training(training(model, dataset, tid, offset=offset,
                                   status=TrainingStatus.SUCCEEDED))
    pages: list[list[str]] = []
    before = None
    while True:
        page = repo.list_trainings_page(model.id, limit=2, before=before)
        pages.append([t.id for t in page])
        if len(page) < 2:
            break
        before = page[-1]
    assert pages == [["t5", "t4"], ["t3", "t2"], ["t1"]]
    assert repo.list_trainings_page("other", limit=2) == []


def test_a_database_says_whether_it_takes_writes(repo: SqlRepository) -> None:
    # /readyz's question (a hot standby after a fail-over, default_transaction_read_only set):
    # asked of PostgreSQL itself, here as a connection its URL's options make read only.
    assert repo.takes_writes()
    # With the database's clock, in the same statement (/readyz's clock check on PostgreSQL).
    before = datetime.now(UTC)
    writes, at = repo.takes_writes_at()
    assert writes
    assert at.tzinfo is not None
    assert abs((at - before).total_seconds()) < 5, (at, before)
    if repo.engine.dialect.name != "postgresql":
        return  # SQLite: a read-only file is said by its first write, not asked
    url = repo.engine.url.update_query_dict(
        {"options": "-c default_transaction_read_only=on"})
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        assert not SqlRepository(engine).takes_writes()
        assert not SqlRepository(engine).takes_writes_at()[0]
    finally:
        engine.dispose()


@contextmanager
def _user_row_locked(repo: SqlRepository, user_id: str) -> Iterator[None]:
    """A write of ``user_id``'s row left open in a transaction of its own: its row lock held on
    PostgreSQL, the database's one write lock on SQLite (taken by the engine's BEGIN IMMEDIATE)."""
    with repo.engine.connect() as holder, holder.begin():
        holder.execute(text("UPDATE users SET name = name WHERE id = :id"), {"id": user_id})
        yield


def _waiting_briefly(repo: SqlRepository, **timeouts: Any) -> Engine:
    """Another engine on ``repo``'s database whose waits for a lock are short: SQLite's busy
    timeout (30 s in ``make_engine``) or PostgreSQL's lock_timeout, 100 ms; ``timeouts`` go to
    ``make_engine`` (a statement timeout)."""
    url = repo.engine.url
    if repo.engine.dialect.name == "postgresql":
        if not timeouts:
            url = url.update_query_dict({"options": "-c lock_timeout=100"})
        return make_engine(url.render_as_string(hide_password=False), **timeouts)
    engine = make_engine(url.render_as_string(hide_password=False))

    @event.listens_for(engine, "connect")
    def _short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA busy_timeout=100")  # after make_engine's own 30 s

    return engine


def _kept_waiting(repo: SqlRepository, user_id: str, engine: Engine) -> DatabaseLockedError:
    """The error of a locking read of ``user_id`` through ``engine`` while another transaction
    holds the row (``_user_row_locked``); the same read goes through once that ends."""
    waiting = SqlRepository(engine)
    with _user_row_locked(repo, user_id), pytest.raises(DatabaseLockedError) as caught:
        waiting.get_user(user_id, for_update=True)
    assert waiting.get_user(user_id, for_update=True) is not None  # over with the lock
    return caught.value


def _busy(refused: DatabaseLockedError) -> None:
    """``refused`` is answered as the database busy (503 with Retry-After), and a worker's loops
    say it once as a refusal of its own, not this process's pool."""
    assert refused.message.startswith("database error: ")
    assert (refused.http_status, refused.code, refused.retry_after) == (
        503, ErrorCode.STORAGE_UNAVAILABLE, STORAGE_RETRY_AFTER)
    assert not refused.pool_exhausted


def test_a_lock_held_past_the_database_s_wait_is_the_database_busy(repo: SqlRepository) -> None:
    """SQLite's write lock held by another connection past the busy timeout ("database is
    locked", SQLITE_BUSY) and PostgreSQL's row lock past lock_timeout (55P03,
    lock_not_available) were a plain StorageError: a 500 storage_error to a client and a
    traceback at every round of a worker's loops, where the pool's wait running out (the same
    database busy) is a 503 with Retry-After, said once."""
    ann, _model, _dataset = seed(repo)
    engine = _waiting_briefly(repo)
    try:
        refused = _kept_waiting(repo, ann.id, engine)
    finally:
        engine.dispose()
    _busy(refused)
    assert refused.lock  # the loops' advice names the lock alone (review 7)
    cause = refused.__cause__
    assert cause is not None
    if repo.engine.dialect.name == "postgresql":
        assert getattr(getattr(cause, "orig", None), "sqlstate", None) == "55P03"
    else:
        assert "database is locked" in refused.message
        assert getattr(getattr(cause, "orig", None), "sqlite_errorcode", 0) & 0xFF == 5


def test_a_statement_past_its_timeout_is_the_database_busy(repo: SqlRepository) -> None:
    """PostgreSQL's statement_timeout (57014, query_canceled), here a statement that waits for
    a row lock with no lock_timeout: the database busy, as a lock's wait above."""
    if repo.engine.dialect.name != "postgresql":
        # Review 4: a bare return counted a pass that had checked nothing.
        pytest.skip("SQLite has no statement timeout: its busy timeout is the lock's test above")
    ann, _model, _dataset = seed(repo)
    engine = _waiting_briefly(repo, statement_timeout_s=0.2)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "0"
        refused = _kept_waiting(repo, ann.id, engine)
    finally:
        engine.dispose()
    _busy(refused)
    assert not refused.lock  # a timeout or a cancel: the three causes (review 7)
    assert getattr(getattr(refused.__cause__, "orig", None), "sqlstate", None) == "57014"
    assert "statement timeout" in refused.message


def test_a_statement_cancelled_from_outside_is_the_database_busy_too(repo: SqlRepository) -> None:
    """Review 4 (RISK 2): an operator's pg_cancel_backend (or a pooler's query_timeout) raises
    the statement_timeout's own code, 57014, so it is a DatabaseLockedError as well (a 503, said
    once by a loop, whose advice names a cancel among its causes: test_loop_refusals); the
    words alone tell the two apart, and lc_messages may translate them."""
    if repo.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no cancel of a statement by another session")
    ann, _model, _dataset = seed(repo)
    engine = make_engine(repo.engine.url.render_as_string(hide_password=False))
    caught: list[BaseException] = []

    def wait_for_the_row() -> None:
        try:
            SqlRepository(engine).get_user(ann.id, for_update=True)
        except BaseException as exc:  # handed to the test's thread
            caught.append(exc)

    waiter = threading.Thread(target=wait_for_the_row)
    try:
        with _user_row_locked(repo, ann.id):
            waiter.start()
            pause = threading.Event()
            for _poll in range(500):  # up to ~10 s for the read to queue on the row lock
                with repo.engine.connect() as conn:
                    pids = conn.execute(text(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database() AND pid <> pg_backend_pid()")).all()
                    if pids:
                        conn.execute(text("SELECT pg_cancel_backend(:pid)"),
                                     {"pid": pids[0][0]})
                        break
                pause.wait(0.02)
            else:
                raise AssertionError("the read never waited on the row lock")
            waiter.join(timeout=10)
    finally:
        engine.dispose()
    assert not waiter.is_alive()
    [refused] = caught
    assert isinstance(refused, DatabaseLockedError), refused
    _busy(refused)
    assert not refused.lock
    assert getattr(getattr(refused.__cause__, "orig", None), "sqlstate", None) == "57014"
