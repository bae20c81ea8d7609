"""The face boxes the intake finds reach the trainer: upload -> dataset (stored with its boxes)
-> training job (each photo with its box), through the services with the fake face analyzer and
trainer. A dataset stored before the boxes were kept trains with none."""

from __future__ import annotations

from dataclasses import replace

import pytest

from selfie_lora.services.layout import photo_key
from selfie_lora.testing.fakes import FakeTrainer
from selfie_lora.wiring import Services
from tests.support.photos import synthetic_photo


def test_the_boxes_the_intake_found_reach_the_training_job(
        services: Services, fake_trainer: FakeTrainer) -> None:
    user, _ = services.users.create(name="ann")
    photos = [(f"p{i}.jpg", synthetic_photo(i)) for i in range(3)]
    queued = services.training.upload_files(user=user, files=photos).training
    assert queued is not None
    dataset = services.intake.latest(user=user)
    assert dataset is not None
    # The fake analyzer's face is about the middle half of each 128 px photo (the intake
    # refines it on a crop around the first find); the face-centred crop (a face of 64 px wants
    # 152) is the whole photo, so the box is about that half, in the crop's fractions.
    assert len(dataset.face_boxes) == len(dataset.photo_hashes) == 3
    for box in dataset.face_boxes:
        assert box == pytest.approx((0.25, 0.25, 0.75, 0.75), abs=0.02)
    services.training.run(queued.id)
    (job,) = fake_trainer.jobs
    assert [p.face_box for p in job.photos] == list(dataset.face_boxes)
    assert [p.data for p in job.photos] == [services.blobs.get(photo_key(sha))
                                            for sha in dataset.photo_hashes]

    # Stored before the boxes were kept: the same photos, no boxes, an unweighted loss.
    bob, _ = services.users.create(name="bob")
    old = replace(dataset, id="d-old", user_id=bob.id, face_boxes=())
    services.repo.add_dataset(old)
    again = services.training.start(user=bob, dataset_id=old.id).training
    services.training.run(again.id)
    assert [p.face_box for p in fake_trainer.jobs[-1].photos] == [None, None, None]
