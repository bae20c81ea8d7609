"""The repository's garbage-collection parts on every database: the references, deleting a
dataset only while nothing refers to it (a training that starts meanwhile wins), generations past
their age, and the job lease that lets one collector run at a time."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import make_url

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.domain.entities import Generation, TrainingStatus, Version
from selfie_lora.domain.gc import DatasetRef, GcPolicy, GenerationRef, TrainingRef
from selfie_lora.domain.likeness import LikenessStatus, VersionLikeness
from selfie_lora.errors import ConflictError
from selfie_lora.services.gc import GarbageCollector
from tests.integration.test_repository_contract import NOW, seed, training
from tests.support.backends import database_url, fresh_engine

DAY = timedelta(days=1)


def test_the_references_name_everything_rows_refer_to(repo: SqlRepository) -> None:
    user, model, trained = seed(repo)
    repo.add_training(training(model, trained, "t1", status=TrainingStatus.SUCCEEDED))
    repo.add_training(training(model, trained, "t2", offset=1))
    # Canceled before its version: resume can still continue it, so its checkpoints stay.
    repo.add_training(training(model, trained, "t3", status=TrainingStatus.CANCELED, offset=2))
    repo.add_version(Version(id="v1", model_id=model.id, number=1, training_id="t1",
                             trainer_version="x", weights_key="weights/1.safetensors",
                             weights_sha256="1" * 64, weights_method="m", remote_version=None,
                             version_mismatch=False, created_at=NOW))
    idle = dataclasses.replace(trained, id="d-idle", photo_hashes=("e" * 64,))
    liked = dataclasses.replace(trained, id="d-liked", photo_hashes=())
    for dataset in (idle, liked):
        repo.add_dataset(dataset)
    repo.save_likeness(VersionLikeness(version_id="v1", model_id=model.id,
                                       status=LikenessStatus.SCORED, created_at=NOW,
                                       reference_dataset_id="d-liked"))
    repo.add_generation(Generation(id="g1", user_id=user.id, model_id=model.id, version_id="v1",
                                   prompt="p", lora_scale=1.0, seed=None,
                                   image_keys=("generations/g1/0.png",), created_at=NOW))

    refs = repo.gc_references()
    assert sorted(refs.datasets, key=lambda d: d.id) == [
        DatasetRef("d-ann", NOW, ("a" * 64, "b" * 64), trained=True),
        DatasetRef("d-idle", NOW, ("e" * 64,), trained=False),
        DatasetRef("d-liked", NOW, (), trained=True),  # a likeness record's reference photos
    ]
    assert refs.generations == (GenerationRef("g1", NOW, ("generations/g1/0.png",)),)
    assert sorted(refs.trainings, key=lambda t: t.id) == [
        TrainingRef("t1", NOW, ended=True),
        TrainingRef("t2", NOW + timedelta(seconds=1), ended=False),
        TrainingRef("t3", NOW + timedelta(seconds=2), ended=True, resumable=True)]
    assert refs.version_ids == {"v1"}
    assert refs.weights_keys == {"weights/1.safetensors"}
    assert refs.model_ids == {model.id}


def test_a_dataset_is_deleted_only_when_old_and_unused(repo: SqlRepository) -> None:
    _user, model, used = seed(repo)
    repo.add_training(training(model, used, "t1", status=TrainingStatus.FAILED))
    idle = dataclasses.replace(used, id="d-idle")
    repo.add_dataset(idle)

    assert not repo.delete_dataset_if_unused(used.id, created_before=NOW + DAY)  # trained
    assert not repo.delete_dataset_if_unused(idle.id, created_before=NOW)  # not old enough
    assert repo.delete_dataset_if_unused(idle.id, created_before=NOW + DAY)
    assert repo.get_dataset(idle.id) is None
    assert not repo.delete_dataset_if_unused(idle.id, created_before=NOW + DAY)  # gone already
    assert repo.get_dataset(used.id) == used


def test_a_training_started_on_a_dataset_while_it_is_collected_wins(
        repo: SqlRepository) -> None:
    _user, model, dataset = seed(repo)
    inserted = threading.Event()
    outcome: list[bool] = []

    def collect() -> None:
        inserted.wait(5)
        outcome.append(repo.delete_dataset_if_unused(dataset.id, created_before=NOW + DAY))

    collector = threading.Thread(target=collect)
    collector.start()
    with repo.atomic() as tx:  # the training's transaction: in, not yet committed
        tx.add_training(training(model, dataset, "t1"))
        inserted.set()
        time.sleep(0.3)  # the collector's delete runs (or waits) now
    collector.join(10)
    assert outcome == [False]
    assert repo.get_dataset(dataset.id) == dataset
    assert repo.get_training("t1") is not None


def test_generations_past_their_age_are_deleted(repo: SqlRepository) -> None:
    user, model, dataset = seed(repo)
    repo.add_training(training(model, dataset, "t1", status=TrainingStatus.SUCCEEDED))
    repo.add_version(Version(id="v1", model_id=model.id, number=1, training_id="t1",
                             trainer_version="x", weights_key="weights/1", weights_sha256="1",
                             weights_method="m", remote_version=None, version_mismatch=False,
                             created_at=NOW))
    for i in range(3):
        repo.add_generation(Generation(id=f"g{i}", user_id=user.id, model_id=model.id,
                                       version_id="v1", prompt="p", lora_scale=1.0, seed=i,
                                       image_keys=(), created_at=NOW + i * DAY))
    assert repo.delete_generations(["g0", "g1", "g2", "nope"], created_before=NOW + DAY) == 1
    assert [g.id for g in repo.list_generations(user.id)] == ["g2", "g1"]
    assert repo.delete_generations([], created_before=NOW + DAY) == 0


def test_one_holder_of_a_job_lease_at_a_time(repo: SqlRepository) -> None:
    minute = timedelta(minutes=1)
    assert repo.get_job("gc") is None
    assert repo.claim_job("gc", owner="a", now=NOW, expires_at=NOW + minute)
    assert not repo.claim_job("gc", owner="b", now=NOW, expires_at=NOW + minute)
    assert repo.claim_job("gc", owner="a", now=NOW, expires_at=NOW + minute)  # a again: its own
    assert repo.renew_job("gc", owner="a", expires_at=NOW + 2 * minute)
    assert not repo.claim_job("gc", owner="b", now=NOW + minute, expires_at=NOW + 3 * minute)
    # Expired: another takes it over, and the first one's renewals and release fail.
    assert repo.claim_job("gc", owner="b", now=NOW + 3 * minute, expires_at=NOW + 4 * minute)
    assert not repo.renew_job("gc", owner="a", expires_at=NOW + 9 * minute)
    repo.release_job("gc", owner="a", now=NOW, finished=True)
    job = repo.get_job("gc")
    assert job is not None
    assert (job.owner, job.expires_at, job.last_started_at, job.last_finished_at) == (
        "b", NOW + 4 * minute, NOW + 3 * minute, None)
    repo.release_job("gc", owner="b", now=NOW + 5 * minute, finished=True)
    job = repo.get_job("gc")
    assert job is not None
    assert (job.owner, job.expires_at, job.last_finished_at) == (None, None, NOW + 5 * minute)


def test_a_job_lease_of_a_dead_owner_is_taken_over_only_while_it_holds_it(
        repo: SqlRepository) -> None:
    minute = timedelta(minutes=1)
    assert repo.claim_job("gc", owner="dead", now=NOW, expires_at=NOW + 10 * minute)
    # Named as the dead owner: taken although unexpired.
    assert repo.claim_job("gc", owner="b", now=NOW, expires_at=NOW + minute, take_over="dead")
    # The dead owner no longer holds it: naming it takes nothing from b.
    assert not repo.claim_job("gc", owner="c", now=NOW, expires_at=NOW + minute,
                              take_over="dead")
    job = repo.get_job("gc")
    assert job is not None
    assert (job.owner, job.expires_at) == ("b", NOW + minute)


def test_a_job_is_due_only_an_interval_after_its_last_start(repo: SqlRepository) -> None:
    hour = timedelta(hours=1)
    assert repo.claim_job("gc", owner="a", now=NOW, expires_at=NOW + hour, due_before=NOW)
    repo.release_job("gc", owner="a", now=NOW + hour, finished=False)  # failed: still counts
    later = NOW + 2 * hour
    assert not repo.claim_job("gc", owner="b", now=later, expires_at=later + hour,
                              due_before=later - 6 * hour)
    assert repo.claim_job("gc", owner="b", now=later, expires_at=later + hour,
                          due_before=later - hour)
    assert repo.get_job("other") is None  # one lease per job name


def test_of_concurrent_first_claims_exactly_one_wins(repo: SqlRepository) -> None:
    barrier = threading.Barrier(4)
    won: list[str] = []

    def claim(owner: str) -> None:
        barrier.wait()
        if repo.claim_job("gc", owner=owner, now=NOW, expires_at=NOW + DAY):
            won.append(owner)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    job = repo.get_job("gc")
    assert job is not None
    assert job.owner == won[0]


def test_a_collection_forgets_webhook_ids_a_day_after_they_came(repo: SqlRepository,
                                                                tmp_path: Path) -> None:
    from selfie_lora.adapters.storage.fs import FileSystemBlobStore
    from selfie_lora.domain.gc import WEBHOOK_MEMORY, GcPolicy
    from selfie_lora.services.gc import GarbageCollector

    assert repo.record_webhook("msg_old", now=NOW - WEBHOOK_MEMORY - timedelta(minutes=1))
    assert repo.record_webhook("msg_recent", now=NOW - WEBHOOK_MEMORY + timedelta(minutes=1))
    collector = GarbageCollector(repo=repo, blobs=FileSystemBlobStore(tmp_path / "blobs"),
                                 work_dir=tmp_path / "work", policy=GcPolicy(grace=DAY),
                                 clock=lambda: NOW)
    dry = collector.collect(dry_run=True)
    assert dry.webhook_ids == 0
    assert repo.record_webhook("msg_old", now=NOW) is False  # a dry run forgets nothing

    summary = collector.collect()
    assert summary.webhook_ids == 1
    assert "  webhooks     forgot 1 id(s) received over 1 day(s) ago" in summary.lines()
    assert repo.record_webhook("msg_recent", now=NOW) is False  # still refused as a replay
    # Forgotten: its signed timestamp, more than 5 minutes off, is what refuses it now.
    assert repo.record_webhook("msg_old", now=NOW) is True
    assert collector.collect().webhook_ids == 0


@pytest.mark.postgres
def test_times_read_from_a_session_in_another_time_zone_are_utc(tmp_path: Path) -> None:
    """A PostgreSQL session whose TimeZone is not UTC (the server's or the role's setting) hands
    back its own offset: the lease's expiry came back at +09:00 and the collector's 'another
    garbage collection is running ... until HH:MM:SS UTC' showed Tokyo's hour as UTC."""
    url = make_url(database_url("postgres", tmp_path)).update_query_dict(
        {"options": "-c timezone=Asia/Tokyo"})
    engine = fresh_engine(url.render_as_string(hide_password=False))
    try:
        upgrade(engine)
        repo = SqlRepository(engine)
        expiry = NOW + timedelta(minutes=10)
        assert repo.claim_job("gc", owner="worker-1", now=NOW, expires_at=expiry)
        job = repo.get_job("gc")
        assert job is not None
        assert job.expires_at is not None
        assert job.expires_at.tzinfo is UTC
        assert job.expires_at.hour == expiry.hour
        collector = GarbageCollector(repo=repo, blobs=FileSystemBlobStore(tmp_path / "blobs"),
                                     work_dir=tmp_path / "work",
                                     policy=GcPolicy(grace=timedelta(hours=1)),
                                     clock=lambda: NOW + timedelta(minutes=1))
        with pytest.raises(ConflictError) as caught:
            collector.collect()
        assert f"until {expiry:%Y-%m-%d %H:%M:%S} UTC" in caught.value.message
    finally:
        engine.dispose()
