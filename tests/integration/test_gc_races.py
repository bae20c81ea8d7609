"""Garbage collection against writers that refer to a blob again while it is collected: no blob
a committed row refers to is deleted (found in review: photos uploaded again while the
collector was deleting them, weights identical to an orphan's). The collector looks at each
blob's age again just before deleting it, a writer's ``if_absent`` put makes the blob it finds
fresh, and once its row has committed a writer writes again what is gone. Each race is driven
deterministically through a blob store that runs the other side at the moment that loses
data."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.domain.entities import Dataset, TrainingStatus, User
from selfie_lora.domain.gc import GcPolicy, GcSummary
from selfie_lora.services.common import utcnow
from selfie_lora.services.gc import GarbageCollector
from selfie_lora.services.layout import PREFIXES, manifest_key, photo_key, weights_key
from selfie_lora.services.ports import TrainingJob
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer, fake_safetensors
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip
from tests.support.s3 import S3Server

POLICY = GcPolicy(grace=timedelta(hours=24), dataset_age=timedelta(days=7))
MONTH_AGO = timedelta(days=30)


class Store:
    """The blob store the services use: the real one, with hooks a test sets."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.after_put: Any = None  # (key, data) -> None
        self.after_put_file: Any = None  # (key) -> None
        self.before_delete: Any = None  # (key) -> None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        wrote = bool(self.inner.put(key, data, if_absent=if_absent))
        if self.after_put is not None:
            self.after_put(key, data)
        return wrote

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> bool:
        wrote = bool(self.inner.put_file(key, path, if_absent=if_absent))
        if self.after_put_file is not None:
            self.after_put_file(key)
        return wrote

    def delete(self, key: str) -> None:
        if self.before_delete is not None:
            self.before_delete(key)
        self.inner.delete(key)


@dataclass
class Rig:
    svc: Services
    store: Store
    server: S3Server | None
    url: str | None
    trainer: FakeTrainer
    bob: User

    def date(self, key: str, when: datetime) -> None:
        if self.server is None:
            assert isinstance(self.store.inner, FileSystemBlobStore)
            os.utime(self.store.inner.root / key, (when.timestamp(), when.timestamp()))
        else:
            assert self.url is not None
            self.server.set_modified(self.url, key, when)

    def collector(self, *, blobs: Any = None) -> GarbageCollector:
        # By default not the hooked store: the collector is the other side of each race.
        return GarbageCollector(repo=self.svc.repo, blobs=blobs or self.store.inner,
                                work_dir=self.svc.settings.work_dir, policy=POLICY)

    def photos_read_back(self, dataset: Dataset) -> None:
        """Every photo and original its manifest names is there, with its bytes."""
        blobs = self.svc.blobs
        manifest = json.loads(blobs.get(manifest_key(dataset.id)))
        assert [p["sha256"] for p in manifest["photos"]] == list(dataset.photo_hashes)
        for photo in manifest["photos"]:
            assert hashlib.sha256(blobs.get(photo_key(photo["sha256"]))).hexdigest() \
                == photo["sha256"]
            assert photo["original"], "the rig keeps originals"
            assert hashlib.sha256(blobs.get(photo["original"])).hexdigest() \
                == photo["original"].removeprefix("originals/").split(".")[0]


@pytest.fixture(params=["fs", "s3"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    server: S3Server | None = None
    url: str | None = None
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        url = server.new_location()
        inner: Any = server.store(url, tmp_path / "cache")
    else:
        inner = FileSystemBlobStore(tmp_path / "blobs")
    store = Store(inner)
    trainer = FakeTrainer()
    svc = build_services(make_settings(tmp_path, intake_workers=1, keep_originals=True),
                         trainers={"local": trainer}, face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()}, blobs=store)  # type: ignore[arg-type]
    try:
        bob, _ = svc.users.create(name="bob")
        yield Rig(svc=svc, store=store, server=server, url=url, trainer=trainer, bob=bob)
    finally:
        svc.close()


def test_photos_uploaded_again_while_the_collector_deletes_them_are_kept(rig: Rig) -> None:
    """The reviewer's case: an abandoned old upload is collected; bob uploads the same photos
    again while the collector is in its deletion loop, and the new dataset's row commits after
    the collector's last reading of the references."""
    svc = rig.svc
    old = svc.training.upload_zip(user=rig.bob, data=photo_zip(3, offset=12),
                                  start=False).dataset
    when = utcnow() - MONTH_AGO
    with svc.engine.begin() as conn:
        conn.execute(text("UPDATE datasets SET created_at = :t"), {"t": when})
    shared: set[str] = set()
    for prefix in PREFIXES:
        for info in rig.store.inner.list(prefix):
            rig.date(info.key, when)
            if prefix in ("photos", "originals"):
                shared.add(info.key)
    assert len(shared) == 6

    again: list[Dataset] = []

    def upload_again(_key: str) -> None:
        if not again:
            again.append(svc.training.upload_zip(user=rig.bob, data=photo_zip(3, offset=12),
                                                 start=False).dataset)

    rig.store.before_delete = upload_again
    summary = rig.collector(blobs=rig.store).collect()  # its first deletion runs the upload
    rig.store.before_delete = None

    assert summary.datasets == (old.id,)
    assert svc.repo.get_dataset(old.id) is None
    assert again, "the upload ran during the deletions"
    assert svc.repo.get_dataset(again[0].id) is not None
    assert set(summary.kept) == shared
    assert not shared & set(summary.keys)
    rig.photos_read_back(again[0])


def test_weights_identical_to_an_orphans_are_kept_for_the_version(rig: Rig) -> None:
    """An earlier training left weights that no version names (old, an orphan); a new training
    makes the very same bytes. A collection that runs between the new weights' put and the
    commit of their version's row must not delete them."""
    svc = rig.svc
    orphan: list[str] = []

    def plant_the_orphan(job: TrainingJob) -> None:
        data = fake_safetensors({"training_id": job.training_id,
                                 "trigger_word": job.trigger_word,
                                 "trainer_version": job.trainer_version})
        key = weights_key(hashlib.sha256(data).hexdigest())
        rig.store.inner.put(key, data)
        rig.date(key, utcnow() - timedelta(days=10))
        orphan.append(key)

    summaries: list[GcSummary] = []

    def collect_before_the_version(key: str) -> None:
        if key.startswith("weights/") and not summaries:
            summaries.append(rig.collector().collect())

    rig.trainer.on_train = plant_the_orphan
    rig.store.after_put_file = collect_before_the_version
    started = svc.training.upload_zip(user=rig.bob, data=photo_zip(3))
    assert started.training is not None
    svc.training.run(started.training.id)

    assert summaries, "a collection ran between the weights' put and the version's commit"
    done = svc.repo.get_training(started.training.id)
    assert done is not None
    assert done.status is TrainingStatus.SUCCEEDED, done.error
    version = svc.models.versions(user=rig.bob)[0]
    assert version.weights_key == orphan[0]
    assert orphan[0] not in summaries[0].keys
    data = svc.models.weights(user=rig.bob, version_id=version.id)
    assert hashlib.sha256(data).hexdigest() == version.weights_sha256


@pytest.mark.parametrize("start", [False, True])
def test_photos_deleted_before_their_dataset_row_commits_are_written_again(
        rig: Rig, start: bool) -> None:
    """What the collector's last look cannot close: its deletion lands after an upload wrote
    the photos again and before the upload's row commits. The upload, once its row has
    committed, writes again what is gone; a training started on the upload runs on them."""
    svc = rig.svc
    deleted: list[str] = []

    def collected_meanwhile(key: str, data: bytes) -> None:
        if key.startswith("datasets/") and key.endswith("/manifest.json") and not deleted:
            for photo in json.loads(data)["photos"]:
                for gone in (photo["key"], photo["original"]):
                    rig.store.inner.delete(gone)
                    deleted.append(gone)

    rig.store.after_put = collected_meanwhile
    uploaded = svc.training.upload_zip(user=rig.bob, data=photo_zip(3), start=start)
    rig.store.after_put = None

    assert len(deleted) == 6
    rig.photos_read_back(uploaded.dataset)
    if start:
        assert uploaded.training is not None
        svc.training.run(uploaded.training.id)
        done = svc.repo.get_training(uploaded.training.id)
        assert done is not None
        assert done.status is TrainingStatus.SUCCEEDED, done.error


def test_weights_deleted_before_their_version_row_commits_are_written_again(rig: Rig) -> None:
    svc = rig.svc
    deleted: list[str] = []

    def collected_meanwhile(key: str) -> None:
        if key.startswith("weights/") and not deleted:
            rig.store.inner.delete(key)
            deleted.append(key)

    rig.store.after_put_file = collected_meanwhile
    started = svc.training.upload_zip(user=rig.bob, data=photo_zip(3))
    assert started.training is not None
    svc.training.run(started.training.id)

    assert deleted
    done = svc.repo.get_training(started.training.id)
    assert done is not None
    assert done.status is TrainingStatus.SUCCEEDED, done.error
    version = svc.models.versions(user=rig.bob)[0]
    assert version.weights_key == deleted[0]
    data = svc.models.weights(user=rig.bob, version_id=version.id)
    assert hashlib.sha256(data).hexdigest() == version.weights_sha256
