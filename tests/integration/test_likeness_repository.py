"""The repository's likeness parts on every database: probe sets, gates, alerts and records."""

from __future__ import annotations

import threading
import time

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.domain.entities import GateStatus, Probe, TrainingStatus, Version
from selfie_lora.domain.likeness import (
    MAX_PROBES,
    ImageSanity,
    LikenessStatus,
    LikenessSummary,
    ProbeResult,
    VersionLikeness,
    score_probes,
)
from selfie_lora.errors import StorageError
from tests.integration.test_repository_contract import NOW, seed, training


def version_of(repo: SqlRepository) -> Version:
    _user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED))
    version = Version(id="v1", model_id=model.id, number=1, training_id="t1",
                      trainer_version="local-tiny-v1", weights_key="k", weights_sha256="s",
                      weights_method="m", remote_version=None, version_mismatch=False,
                      created_at=NOW, gate_status=GateStatus.PENDING,
                      gate_details={"active_when_stored": None})
    repo.add_version(version)
    return version


def test_probe_sets_are_fixed_once(repo: SqlRepository) -> None:
    _user, model, _dataset = seed(repo)
    assert model.probes == ()
    first = (Probe(0, "a photo of zkr47v", 11), Probe(1, "a portrait of zkr47v", 12))
    repo.set_model_probes(model.id, first)
    repo.set_model_probes(model.id, (Probe(0, "other", 1),))
    stored = repo.get_model(model.id)
    assert stored is not None
    assert stored.probes == first
    with pytest.raises(StorageError):
        repo.set_model_probes("nope", first)


def test_gate_and_alert_round_trip(repo: SqlRepository) -> None:
    version = version_of(repo)
    assert repo.get_version(version.id) == version
    repo.set_version_gate(version.id, status=GateStatus.HELD, reason="likeness dropped",
                          details={"before": {"identity": 0.8}, "after": {"identity": 0.3}})
    repo.set_version_alert(version.id, {"kind": "likeness_drop", "delivery": None})
    held = repo.get_version(version.id)
    assert held is not None
    assert held.gate_status is GateStatus.HELD
    assert held.gate_reason == "likeness dropped"
    assert held.gate_details["after"] == {"identity": 0.3}
    assert held.alert == {"kind": "likeness_drop", "delivery": None}
    with pytest.raises(StorageError):
        repo.set_version_alert("nope", None)


def test_quality_records_round_trip_and_update(repo: SqlRepository) -> None:
    version = version_of(repo)
    pending = VersionLikeness(version_id=version.id, model_id=version.model_id,
                             status=LikenessStatus.PENDING, created_at=NOW,
                             training={"final_loss": 0.2, "steps": 10, "seconds": 1.5,
                                       "cost": None, "metrics": {"device": "cpu"}})
    repo.save_likeness(pending)  # an upsert: the first save inserts
    assert repo.get_likeness(version.id) == pending
    sanity = ImageSanity(mean=100.0, std=30.0, saturated_share=0.0, sharpness=250.0,
                         blank=False, saturated=False, nan=False)
    probes = (ProbeResult(index=0, prompt="p", seed=1, image_key="quality/x.png", faces=1,
                          face_box=(1, 2, 3, 4), embedding=(0.25, -0.5), sanity=sanity),
              ProbeResult(index=1, prompt="q", seed=2, image_key=None, sanity=sanity))
    scored = VersionLikeness(
        version_id=version.id, model_id=version.model_id, status=LikenessStatus.SCORED,
        created_at=NOW, embedding_model="dlib_face_recognition_resnet_model_v1",
        reference_dataset_id="d-ann", scores=score_probes(probes, [(0.25, -0.5)]),
        probes=probes, training=pending.training, scored_at=NOW,
    )
    repo.save_likeness(scored)
    assert repo.get_likeness(version.id) == scored
    assert repo.list_likeness(version.model_id) == [scored]
    assert repo.list_likeness("other") == []
    assert repo.get_likeness("nope") is None
    assert repo.list_likeness(version.model_id, version_ids=[version.id]) == [scored]
    assert repo.list_likeness(version.model_id, version_ids=[]) == []
    # The summary: the record but its probes' results, each probe's scale and key kept.
    [summary] = repo.list_likeness_summaries(version.model_id)
    assert summary == LikenessSummary(
        version_id=scored.version_id, model_id=scored.model_id, status=scored.status,
        created_at=scored.created_at, embedding_model=scored.embedding_model,
        reference_dataset_id=scored.reference_dataset_id, scores=scored.scores,
        training=scored.training, error=scored.error, scored_at=scored.scored_at,
        probe_marks=scored.probe_marks)
    assert [m.image_key for m in summary.probe_marks] == ["quality/x.png", None]
    assert repo.list_likeness_summaries("other") == []


def test_a_summary_of_a_record_with_more_probes_than_a_set_has_keeps_them_all(
        repo: SqlRepository) -> None:
    # Records are made of a probe set (MAX_PROBES at most), but a summary that dropped probes
    # past the ones taken apart in the database would call a stale record current.
    version = version_of(repo)
    probes = tuple(ProbeResult(index=i, prompt="p", seed=i, image_key=f"quality/{i}.png",
                               embedding=(0.1, 0.2), lora_scale=1.0)
                   for i in range(MAX_PROBES + 2))
    record = VersionLikeness(version_id=version.id, model_id=version.model_id,
                             status=LikenessStatus.SCORED, created_at=NOW, probes=probes)
    repo.save_likeness(record)
    [summary] = repo.list_likeness_summaries(version.model_id)
    assert summary.probe_marks == record.probe_marks
    assert len(summary.probe_marks) == MAX_PROBES + 2


def test_two_scorers_storing_a_version_s_first_record_at_once_both_store_it(
        repo: SqlRepository) -> None:
    """The worker and ``selfie-lora compare`` store the same version's first record at once:
    save_likeness was UPDATE-then-INSERT, both found no row and both INSERTed, and on PostgreSQL
    the second failed on the primary key (ConflictError). The upsert waits for the first and
    replaces its record."""
    version = version_of(repo)
    first = VersionLikeness(version_id=version.id, model_id=version.model_id,
                            status=LikenessStatus.FAILED, created_at=NOW, error="first")
    second = VersionLikeness(version_id=version.id, model_id=version.model_id,
                             status=LikenessStatus.FAILED, created_at=NOW, error="second")
    inserted = threading.Event()
    errors: list[BaseException] = []

    def first_scorer() -> None:
        try:
            with repo.atomic() as tx:
                tx.save_likeness(first)
                inserted.set()
                time.sleep(0.5)  # the second scorer's save starts while this row is uncommitted
        except BaseException as exc:  # the test asserts on it below
            errors.append(exc)
            inserted.set()

    thread = threading.Thread(target=first_scorer)
    thread.start()
    try:
        assert inserted.wait(10)
        repo.save_likeness(second)
    finally:
        thread.join(10)
    assert errors == []
    assert repo.get_likeness(version.id) == second


def test_a_call_beside_the_open_transaction_fails_fast_instead_of_waiting(
    repo: SqlRepository,
) -> None:
    # On SQLite a second transaction from the thread holding one waits the whole busy timeout.
    _user, model, _dataset = seed(repo)
    with repo.atomic() as tx:
        assert tx.get_model(model.id) == model
        with pytest.raises(RuntimeError, match="atomic"):
            repo.get_model(model.id)
        with pytest.raises(RuntimeError, match="atomic"), repo.atomic():
            pass
    assert repo.get_model(model.id) == model  # released with the transaction


def test_the_model_overview_is_the_model_its_active_version_and_its_record(
        repo: SqlRepository) -> None:
    version = version_of(repo)
    assert repo.get_model_overview("u-ann") == (repo.get_model(version.model_id), None, None)
    repo.set_model_active_version(version.model_id, version.id)
    model = repo.get_model(version.model_id)
    assert repo.get_model_overview("u-ann") == (model, version, None)
    record = VersionLikeness(version_id=version.id, model_id=version.model_id,
                             status=LikenessStatus.PENDING, created_at=NOW)
    repo.save_likeness(record)
    assert repo.get_model_overview("u-ann") == (model, version, record)
    _bob, bobs_model, _dataset = seed(repo, "bob")
    assert repo.get_model_overview("u-bob") == (bobs_model, None, None)
    assert repo.get_model_overview("nobody") is None
    with repo.atomic() as tx:
        assert tx.get_model_overview("u-ann") == (model, version, record)

