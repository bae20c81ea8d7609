"""Garbage collection end to end, on the file system and on S3-compatible object storage: two
users with trained versions, an abandoned old upload, an old generation, stale work folders and
planted orphans. A dry run deletes nothing and names exactly what a real run then deletes;
afterwards every version's weights and every used photo read back, rollback works, and a second
run finds nothing. A collection killed at any deletion leaves no row referring to a deleted
blob, and a rerun finishes the job, deleting each thing exactly once."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.domain.entities import TrainingStatus, User
from selfie_lora.domain.gc import GcPolicy, GcSummary
from selfie_lora.errors import ConflictError
from selfie_lora.services.common import utcnow
from selfie_lora.services.gc import GarbageCollector
from selfie_lora.services.generation import GenerationRequest
from selfie_lora.services.layout import (
    checkpoint_key,
    manifest_key,
    photo_key,
    reference_key,
    sample_key,
)
from selfie_lora.services.ports import BlobStore, Repository
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer, SimulatedCrash
from selfie_lora.wiring import Services, build_services
from selfie_lora.worker import Identity, Worker
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip
from tests.support.s3 import S3Server

POLICY = GcPolicy(grace=timedelta(hours=24), dataset_age=timedelta(days=7),
                  generation_age=timedelta(days=10))
# The collector's clock: two days on, so that every blob written by the test is past the grace
# period (rows are dated on purpose below).
LATER = timedelta(days=2)


def sampling() -> FakeTrainer:
    """Every training makes a sample image at step 2 of 4: it stays while the training does."""
    return FakeTrainer(sample_every=2)


@pytest.fixture(params=["fs", "s3"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    overrides: dict[str, Any] = {}
    server: S3Server | None = None
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        overrides = server.settings(server.new_location())
    svc = build_services(make_settings(tmp_path, intake_workers=1, **overrides),
                         trainers={"local": sampling()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    try:
        yield build_world(svc, server)
    finally:
        svc.close()


@dataclass
class World:
    svc: Services
    server: S3Server | None
    ann: User
    bob: User
    now: datetime  # the collector's
    datasets: tuple[str, ...] = ()
    generations: tuple[str, ...] = ()
    keys: set[str] = field(default_factory=set)  # what a collection must delete
    kept: set[str] = field(default_factory=set)  # what it must keep, though no row names it

    def collector(self, *, blobs: BlobStore | None = None, repo: Any = None,
                  at: timedelta = timedelta(0)) -> GarbageCollector:
        return GarbageCollector(repo=repo or self.svc.repo, blobs=blobs or self.svc.blobs,
                                work_dir=self.svc.settings.work_dir, policy=POLICY,
                                clock=lambda: self.now + at)

    def date(self, key: str, when: datetime) -> None:
        blobs = self.svc.blobs
        if isinstance(blobs, FileSystemBlobStore):
            os.utime(blobs.root / key, (when.timestamp(), when.timestamp()))
        else:
            assert self.server is not None
            assert self.svc.settings.storage_url is not None
            self.server.set_modified(self.svc.settings.storage_url, key, when)

    def plant(self, key: str, *, when: datetime | None = None) -> str:
        self.svc.blobs.put(key, b"left behind " + key.encode())
        if when is not None:
            self.date(key, when)
        return key

    def work_folder(self, name: str, *, when: datetime | None = None) -> str:
        folder = self.svc.settings.work_dir / name / "attempt-1"
        folder.mkdir(parents=True)
        (folder / "lora.safetensors").write_bytes(b"half a training")
        if when is not None:
            for path in (folder / "lora.safetensors", folder, folder.parent):
                os.utime(path, (when.timestamp(), when.timestamp()))
        return f"work/{name}"


def trained(svc: Services, user: User, zip_data: bytes) -> tuple[str, str]:
    """An upload trained to its end (run here, not by a worker): its dataset and training."""
    started = svc.training.upload_zip(user=user, data=zip_data)
    assert started.training is not None
    svc.training.run(started.training.id)
    done = svc.repo.get_training(started.training.id)
    assert done is not None
    assert done.status == "succeeded", done.error
    return started.dataset.id, done.id


def build_world(svc: Services, server: S3Server | None) -> World:
    ann, _ = svc.users.create(name="ann")
    bob, _ = svc.users.create(name="bob")
    w = World(svc=svc, server=server, ann=ann, bob=bob, now=utcnow() + LATER)
    _, first = trained(svc, ann, photo_zip(4, offset=0))
    trained(svc, ann, photo_zip(4, offset=2))  # a retraining: v2, photos 2 and 3 shared
    bobs, _ = trained(svc, bob, photo_zip(3, offset=10))
    # Bob's abandoned upload: never trained, old. Photo 12 is his trained set's too.
    abandoned = svc.training.upload_zip(user=bob, data=photo_zip(3, offset=12),
                                        start=False).dataset
    young = svc.training.upload_zip(user=bob, data=photo_zip(2, offset=20), start=False).dataset
    old_picture = svc.generation.generate(user=ann, request=GenerationRequest(prompt="old",
                                                                              seed=1))
    svc.generation.generate(user=ann, request=GenerationRequest(prompt="new", seed=2))
    orphan_weights = w.plant(f"weights/{'0' * 64}.safetensors",
                             when=utcnow() - timedelta(hours=1))
    # Ann's retraining, queued and never run: its photos and its work folder stay.
    queued = svc.training.upload_zip(user=ann, data=photo_zip(2, offset=30)).training
    assert queued is not None
    old = w.now - timedelta(days=30)
    with svc.engine.begin() as conn:
        conn.execute(text("UPDATE datasets SET created_at = :t WHERE id != :young"),
                     {"t": old, "young": young.id})
        conn.execute(text("UPDATE generations SET created_at = :t WHERE id = :g"),
                     {"t": old, "g": old_picture.id})

    shared = set(abandoned.photo_hashes) & set(svc.repo.get_dataset(bobs).photo_hashes)  # type: ignore[union-attr]
    assert shared, "the abandoned upload shares a photo with a trained set"
    w.datasets, w.generations = (abandoned.id,), (old_picture.id,)
    w.keys = {manifest_key(abandoned.id), reference_key(abandoned.id, "fake-embedding-v1"),
              *(photo_key(sha) for sha in set(abandoned.photo_hashes) - shared),
              *old_picture.image_keys, orphan_weights,
              w.plant(photo_key(hashlib.sha256(b"orphan").hexdigest())),
              w.plant(f"generations/{uuid.uuid4()}/0.png"),
              w.plant(manifest_key(str(uuid.uuid4()))),
              w.plant(sample_key(str(uuid.uuid4()), 2)),  # a training whose row is gone
              # Ann's first training ended with its version; a worker that died before deleting
              # its checkpoint left it.
              w.plant(checkpoint_key(first, 10)),
              w.work_folder(str(uuid.uuid4()), when=utcnow() - timedelta(days=3)),  # nobody's
              w.work_folder(first)}  # ann's first training ended; a crash left its folder
    w.kept = {w.plant(photo_key(hashlib.sha256(b"young").hexdigest()),
                      when=w.now - timedelta(hours=1)),  # an upload in flight
              w.plant("photos/README.txt"),  # not a key of ours
              w.plant(checkpoint_key(queued.id, 10)),  # a training to come resumes from it
              w.work_folder(queued.id)}
    return w


def existing(w: World, keys: set[str]) -> set[str]:
    """Those of ``keys`` (blobs, or ``work/<name>`` folders) that are still there."""
    def there(key: str) -> bool:
        if key.startswith("work/"):
            return (w.svc.settings.home / key).exists()
        return w.svc.blobs.exists(key)

    return {k for k in keys if there(k)}


def check_nothing_refers_to_a_missing_blob(w: World) -> None:
    """Every row's blobs are there: datasets' manifests and photos, versions' weights and probe
    images, generations' images."""
    svc = w.svc
    refs = svc.repo.gc_references()
    for dataset in refs.datasets:
        assert svc.blobs.exists(manifest_key(dataset.id)), dataset.id
        for sha in dataset.photo_hashes:
            assert svc.blobs.exists(photo_key(sha)), (dataset.id, sha)
    for key in refs.weights_keys:
        assert svc.blobs.exists(key), key
    for generation in refs.generations:
        for key in generation.image_keys:
            assert svc.blobs.exists(key), key
    for user in (w.ann, w.bob):
        for version in svc.models.versions(user=user):
            record = svc.likeness.report(user=user, version_id=version.id).record
            assert record is not None
            for probe in record.probes:
                assert probe.image_key is not None
                assert svc.blobs.exists(probe.image_key), probe.image_key


def check_everything_used_reads_back(w: World) -> None:
    svc = w.svc
    for user in (w.ann, w.bob):
        model = svc.models.get(user=user)
        for version in svc.models.versions(user=user):
            data = svc.models.weights(user=user, version_id=version.id)
            assert hashlib.sha256(data).hexdigest() == version.weights_sha256
            assert svc.likeness.probe_image(user=user, version_id=version.id,
                                            index=0).startswith(b"\x89PNG")
        for t in svc.repo.list_trainings(model.id):
            if t.status is TrainingStatus.SUCCEEDED:  # its sample image stays with it
                assert svc.training.sample_image(user=user, training_id=t.id,
                                                 step=2).startswith(b"\xff\xd8")
            for photo in svc.intake.photos(user=user, dataset_id=t.dataset_id):
                stream = svc.intake.photo(user=user, dataset_id=t.dataset_id, index=photo.index)
                assert hashlib.sha256(b"".join(stream.chunks)).hexdigest() == photo.sha256
    # Rollback to ann's first version, and generating with it; the comparison of her two.
    first = svc.models.version(user=w.ann, version_id="1")
    assert svc.models.activate(user=w.ann, version_id="1").model.active_version_id == first.id
    made = svc.generation.generate(user=w.ann, request=GenerationRequest(prompt="rolled back"))
    assert made.version_id == first.id
    assert svc.likeness.compare(user=w.ann, a="1", b="2").a.id == first.id


def test_a_dry_run_names_exactly_what_a_real_run_deletes(world: World) -> None:
    w = world
    dry = w.collector().collect(dry_run=True)
    assert dry.dry_run
    assert (dry.datasets, dry.generations) == (w.datasets, w.generations)
    assert set(dry.keys) == w.keys
    assert existing(w, w.keys) == w.keys, "a dry run deletes nothing"
    assert w.svc.repo.get_dataset(w.datasets[0]) is not None
    assert w.svc.repo.get_generation(w.generations[0]) is not None

    done = w.collector().collect()
    assert not done.dry_run
    assert (done.datasets, done.generations) == (w.datasets, w.generations)
    assert sorted(done.keys) == sorted(dry.keys)
    assert existing(w, w.keys) == set()
    assert existing(w, w.kept) == w.kept
    assert w.svc.repo.get_dataset(w.datasets[0]) is None
    assert w.svc.repo.get_generation(w.generations[0]) is None
    assert done.totals() == dry.totals()

    check_nothing_refers_to_a_missing_blob(w)
    check_everything_used_reads_back(w)
    assert w.collector().collect().empty, "a second run finds nothing"


@dataclass
class Crashing:
    """A blob store (or repository) that dies, as the process would, at its n-th deletion."""

    inner: Any
    after: int
    deleted: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete(self, key: str) -> None:
        self._tick(key)
        self.inner.delete(key)
        self.deleted.append(key)

    def delete_generations(self, ids: Any, **kwargs: Any) -> int:
        self._tick("generation rows")
        return int(self.inner.delete_generations(ids, **kwargs))

    def _tick(self, what: str) -> None:
        if self.after <= 0:
            raise SimulatedCrash(f"the collector died before deleting {what}")
        self.after -= 1


@pytest.mark.parametrize("at", ["rows", 0, 4, 8])
def test_a_collection_killed_anywhere_is_finished_by_the_next_exactly_once(
        tmp_path: Path, at: str | int) -> None:
    svc = build_services(make_settings(tmp_path, intake_workers=1),
                         trainers={"local": sampling()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    try:
        w = build_world(svc, None)
        blob_count = len([k for k in w.keys if not k.startswith("work/")])
        assert isinstance(at, str) or at < blob_count
        blobs = Crashing(svc.blobs, after=10**6 if at == "rows" else int(at))
        repo = Crashing(svc.repo, after=0 if at == "rows" else 10**6)
        with pytest.raises(SimulatedCrash):
            w.collector(blobs=blobs, repo=repo).collect()
        check_nothing_refers_to_a_missing_blob(w)
        if at == "rows":  # died between the dataset row and the generation rows
            assert w.svc.repo.get_dataset(w.datasets[0]) is None
            assert w.svc.repo.get_generation(w.generations[0]) is not None

        rerun = Crashing(svc.blobs, after=10**6)
        summary = w.collector(blobs=rerun, at=timedelta(minutes=11)).collect()
        assert set(summary.keys) == w.keys - set(blobs.deleted)
        deletions = blobs.deleted + rerun.deleted
        assert len(deletions) == len(set(deletions)) == blob_count, "each exactly once"
        assert existing(w, w.keys) == set()
        assert existing(w, w.kept) == w.kept
        check_nothing_refers_to_a_missing_blob(w)
        check_everything_used_reads_back(w)
        assert w.collector(at=timedelta(minutes=12)).collect().empty
    finally:
        svc.close()


def test_one_collector_at_a_time(tmp_path: Path) -> None:
    svc = build_services(make_settings(tmp_path), trainers={}, generators={},
                         face_analyzer=one_person_analyzer())
    try:
        now = utcnow()

        def collector(owner: str, at: timedelta = timedelta(0)) -> GarbageCollector:
            return GarbageCollector(repo=svc.repo, blobs=svc.blobs,
                                    work_dir=svc.settings.work_dir, policy=POLICY,
                                    interval=timedelta(hours=6), owner=owner,
                                    clock=lambda: now + at)

        assert svc.repo.claim_job("gc", owner="w1", now=now, expires_at=now + timedelta(minutes=10))
        with pytest.raises(ConflictError, match="another garbage collection is running by w1"):
            collector("cli").collect()
        assert collector("w2").run_due() is None  # not its turn
        svc.repo.release_job("gc", owner="w1", now=now, finished=True)
        # Due only six hours after the last start, whoever ran it.
        assert collector("w2", timedelta(hours=1)).run_due() is None
        ran = collector("w2", timedelta(hours=7)).run_due()
        assert isinstance(ran, GcSummary)
        assert ran.empty
        job = svc.repo.get_job("gc")
        assert job is not None
        assert (job.owner, job.last_finished_at) == (None, now + timedelta(hours=7))
        assert collector("w3", timedelta(hours=8)).run_due() is None
    finally:
        svc.close()


def test_a_photo_uploaded_again_while_it_is_collected_is_kept(tmp_path: Path) -> None:
    svc = build_services(make_settings(tmp_path, intake_workers=1),
                         trainers={"local": sampling()}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    try:
        w = build_world(svc, None)
        abandoned = svc.repo.get_dataset(w.datasets[0])
        assert abandoned is not None
        again = next(k for k in sorted(w.keys) if k.startswith("photos/")
                     and k.removeprefix("photos/").removesuffix(".jpg") in abandoned.photo_hashes)

        class UploadMeanwhile:
            """The references as the collector reads them, and an upload of bob's that brings
            one of the abandoned photos again, committed after the collector's first look."""

            calls = 0

            def __getattr__(self, name: str) -> Any:
                return getattr(svc.repo, name)

            def gc_references(self) -> Any:
                UploadMeanwhile.calls += 1
                if UploadMeanwhile.calls == 2:
                    svc.repo.add_dataset(dataclasses.replace(
                        abandoned, id=str(uuid.uuid4()), created_at=utcnow(),
                        photo_hashes=(again.removeprefix("photos/").removesuffix(".jpg"),),
                        face_boxes=()))
                return svc.repo.gc_references()

        summary = w.collector(repo=UploadMeanwhile()).collect()
        assert again in summary.kept
        assert set(summary.keys) == w.keys - {again}
        assert svc.blobs.exists(again)
    finally:
        svc.close()


def test_a_worker_collects_when_it_is_due_and_logs_the_summary(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from selfie_lora.worker import Identity, Worker

    caplog.set_level(logging.INFO, logger="selfie_lora.services.gc")
    svc = build_services(make_settings(tmp_path, gc_interval_hours=6), trainers={},
                         generators={}, face_analyzer=one_person_analyzer())
    try:
        key = f"generations/{uuid.uuid4()}/0.png"
        svc.blobs.put(key, b"png")
        assert isinstance(svc.blobs, FileSystemBlobStore)
        two_days_ago = (utcnow() - timedelta(days=2)).timestamp()
        os.utime(svc.blobs.root / key, (two_days_ago, two_days_ago))
        worker = Worker(training=svc.training, queue=svc.queue, identity=Identity(name="w-test"),
                        threads=1, gc=svc.gc, gc_check_seconds=0.05)
        svc.gc.owner = "w-test"
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while svc.blobs.exists(key) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            worker.stop()
        assert not svc.blobs.exists(key)
        job = svc.repo.get_job("gc")
        assert job is not None
        assert job.last_finished_at is not None
        assert job.owner is None
        assert "orphans      deleted 1 blob(s), 3 B" in caplog.text
    finally:
        svc.close()


@dataclass
class OnDisk:
    """No users, no rows: a file-system store with files planted by hand, and its collector."""

    blobs: FileSystemBlobStore
    collector: GarbageCollector
    repo: Repository

    def plant(self, rel: str, *, days: int) -> Path:
        """A file at ``rel`` under the store's folder, ``days`` old, put there by hand."""
        path = self.blobs.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"bytes")
        old = (utcnow() - timedelta(days=days)).timestamp()
        os.utime(path, (old, old))
        return path


@pytest.fixture
def on_disk(tmp_path: Path) -> Iterator[OnDisk]:
    svc = build_services(make_settings(tmp_path), trainers={}, face_analyzer=one_person_analyzer(),
                         generators={})
    try:
        assert isinstance(svc.blobs, FileSystemBlobStore)
        yield OnDisk(blobs=svc.blobs, collector=GarbageCollector(
            repo=svc.repo, blobs=svc.blobs, work_dir=svc.settings.work_dir, policy=POLICY),
            repo=svc.repo)
    finally:
        svc.close()


def test_a_key_the_store_refuses_is_kept_and_named_and_stops_nothing(on_disk: OnDisk) -> None:
    # A folder copied by hand ("copy of g") matches the layout's generation pattern but not the
    # store's keys: planned as an orphan, its deletion raised StorageError on every run, so
    # nothing sorted after it was ever collected, and the dry run promised what the run did not.
    foreign = on_disk.plant("generations/copy of g/0.png", days=30)
    on_disk.plant("generations/zz/0.png", days=30)
    dry = on_disk.collector.collect(dry_run=True)
    done = on_disk.collector.collect()
    assert dry.keys == done.keys == ("generations/zz/0.png",)
    for summary in (dry, done):
        assert any("'generations/copy of g/0.png'" in note for note in summary.notes)
    assert foreign.exists()
    assert not on_disk.blobs.exists("generations/zz/0.png")
    assert on_disk.collector.collect().empty


def test_a_key_obstore_cannot_name_is_kept_and_named_and_stops_nothing(
        s3_server: S3Server, tmp_path: Path) -> None:
    # Another tool's "photos//x.jpg" (an empty segment) made obstore refuse the whole listing:
    # every collection failed with 'object storage could not list', for ever.
    location = s3_server.new_location()
    svc = build_services(make_settings(tmp_path, **s3_server.settings(location)), trainers={},
                         face_analyzer=one_person_analyzer(), generators={})
    try:
        for foreign in ("photos//x.jpg", "generations/abc//0.png"):
            s3_server.put_raw(location, foreign)
        old = utcnow() - timedelta(days=30)
        for orphan in ("generations/abc/1.png", "generations/zz/0.png"):
            svc.blobs.put(orphan, b"left behind")
            s3_server.set_modified(location, orphan, old)
        collector = GarbageCollector(repo=svc.repo, blobs=svc.blobs,
                                     work_dir=svc.settings.work_dir, policy=POLICY)
        dry = collector.collect(dry_run=True)
        done = collector.collect()
        assert dry.keys == done.keys == ("generations/abc/1.png", "generations/zz/0.png")
        for summary in (dry, done):
            assert any("'photos//x.jpg'" in note and "'generations/abc//0.png'" in note
                       for note in summary.notes)
        assert not svc.blobs.exists("generations/zz/0.png")
        assert collector.collect().empty
    finally:
        svc.close()


def test_a_collection_removes_what_a_killed_write_left(on_disk: OnDisk) -> None:
    # A worker killed while storing a checkpoint leaves its temporary file, hidden from listings:
    # nothing removed it, however old.
    left = on_disk.plant("checkpoints/t1/.tmp-k1ll3d", days=90)
    assert not on_disk.collector.collect(dry_run=True).notes
    assert left.exists(), "a dry run deletes nothing"
    done = on_disk.collector.collect()
    assert not left.exists()
    assert "removed 1 temporary file(s) left by writes killed midway" in done.notes


def test_a_collection_removes_the_photos_an_earlier_releases_killed_delete_left_in_tmp(
        on_disk: OnDisk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The release before held a users delete's photos in /tmp/selfie-lora-erase-*, with no
    # manifest: one its kill left there (a deleted user's faces) stayed for ever (ops review 6).
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    old, young = tmp / "selfie-lora-erase-old1", tmp / "selfie-lora-erase-young"
    other = tmp / "someone-elses"
    for folder in (old, young, other):
        folder.mkdir()
        (folder / "0").write_bytes(b"her photo")
    long_ago = (utcnow() - timedelta(days=2)).timestamp()
    for path in (old / "0", old, other / "0", other):
        os.utime(path, (long_ago, long_ago))
    done = on_disk.collector.collect()
    assert not old.exists()
    assert young.exists()  # perhaps a live erase of that release's
    assert other.exists()
    assert any(note.startswith("removed 1 folder(s) selfie-lora-erase-*") for note in done.notes)
    young_made = (utcnow() - timedelta(days=2)).timestamp()
    for path in (young / "0", young):
        os.utime(path, (young_made, young_made))
    machine = GarbageCollector(repo=on_disk.repo, blobs=on_disk.blobs,
                               work_dir=tmp_path / "work", policy=POLICY,
                               interval=timedelta(hours=6))
    summary = machine.run_machine_due()  # a worker's or API server's pass over its machine
    assert summary is not None
    assert not young.exists()


def test_every_machine_drops_its_cached_copies_of_deleted_blobs(
        s3_server: S3Server, tmp_path: Path) -> None:
    # A user's erasure (or a collection) deleted weights from the bucket, but every machine's
    # blob cache kept its copy for ever (evicted only past its bound).
    location = s3_server.new_location()
    svc = build_services(make_settings(tmp_path, **s3_server.settings(location)), trainers={},
                         face_analyzer=one_person_analyzer(), generators={})
    try:
        there = s3_server.store(location, tmp_path / "there" / "blob-cache")
        later = utcnow() + LATER

        def collector(blobs: BlobStore, owner: str, work_dir: Path) -> GarbageCollector:
            return GarbageCollector(repo=svc.repo, blobs=blobs, work_dir=work_dir,
                                    policy=POLICY, interval=timedelta(hours=6), owner=owner,
                                    clock=lambda: later)

        def cached_everywhere(key: str) -> list[Path]:
            svc.blobs.put(key, b"weights")
            s3_server.set_modified(location, key, utcnow() - timedelta(days=3))
            paths = []
            for blobs in (svc.blobs, there):
                with blobs.local_copy(key) as path:
                    paths.append(path)
            assert all(p.exists() for p in paths)
            return paths

        mine, theirs = cached_everywhere(f"weights/{'0' * 64}.safetensors")
        assert collector(svc.blobs, "here", svc.settings.work_dir).collect(force=True).keys == (
            f"weights/{'0' * 64}.safetensors",)
        assert not mine.exists()
        # The other machine lost the lease to this collection: its own pass drops its copy.
        other = collector(there, "there", tmp_path / "there" / "work")
        done = other.run_due()
        assert done is not None
        assert "removed 1 cached copy(ies) of deleted blobs from this machine" in done.notes
        assert not theirs.exists()
        # An erasure deletes without a collection; the next one, wherever it runs, drops the
        # copies it left on other machines.
        mine, theirs = cached_everywhere(f"weights/{'1' * 64}.safetensors")
        svc.blobs.delete(f"weights/{'1' * 64}.safetensors")
        assert not mine.exists()
        assert theirs.exists()
        assert "removed 1 cached copy(ies) of deleted blobs from this machine" in (
            collector(there, "cli", tmp_path / "there" / "work").collect().notes)
        assert not theirs.exists()
    finally:
        svc.close()


def test_an_api_server_drops_its_cached_copies_of_deleted_blobs(
        s3_server: S3Server, tmp_path: Path) -> None:
    # An API server (serve --no-worker) caches the weights its generations use, but had no
    # collection: a deleted user's weights stayed in its blob cache, the LRU bound aside.
    location = s3_server.new_location()
    svc = build_services(make_settings(tmp_path, **s3_server.settings(location)), trainers={},
                         face_analyzer=one_person_analyzer(), generators={})
    try:
        api_cache = s3_server.store(location, tmp_path / "api" / "blob-cache")
        key = f"weights/{'2' * 64}.safetensors"
        svc.blobs.put(key, b"weights")
        with api_cache.local_copy(key) as cached:
            pass
        svc.blobs.delete(key)  # a worker's erasure, or another machine's users delete
        assert cached.exists()
        gc = GarbageCollector(repo=svc.repo, blobs=api_cache, work_dir=tmp_path / "api" / "work",
                              policy=POLICY, interval=timedelta(hours=6), owner="api")
        api = Worker(training=svc.training, queue=svc.queue, identity=Identity(name="api"),
                     threads=0, gc=gc)
        api.collect_garbage()
        assert not cached.exists()
        assert svc.repo.get_job("gc") is None  # its machine's part only: no lease taken
        # Once per interval, as a worker's pass over its machine.
        assert gc.run_machine_due() is None
    finally:
        svc.close()
