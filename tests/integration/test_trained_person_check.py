"""A retraining's photos compared with the person the model was trained on, with dlib's real
analyzer on real photos: another person's set is warned about before a training is spent on it
(the likeness gate would hold the version back), the same person's new photos and a first upload
are not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from selfie_lora.dataset.checks import NOT_THE_TRAINED_PERSON, CheckPolicy
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.domain.entities import User, Version
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.services.intake import IntakeReport, IntakeService
from selfie_lora.services.layout import reference_key
from tests.support.likeness import Rig, photo_generator, same_person
from tests.support.photos import FIXTURES


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(root=tmp_path, generator=photo_generator(same_person()))
    yield r
    r.close()


def intake_of(rig: Rig, *, gate_enabled: bool = True) -> IntakeService:
    return IntakeService(
        repo=rig.repo, blobs=rig.blobs, limits=UploadLimits(),
        policy=CheckPolicy(min_photos=1, max_photos=50), analyzer=rig.faces,
        defaults=lambda: TrainingDefaults(backend="local", trainer_version="local-tiny-v1",
                                          owner="local", replicate_recipe="replicate-person-v1",
                                          probe_count=rig.probe_count),
        workers=1, gate_enabled=gate_enabled,
    )


def files(*names: str) -> list[UploadedFile]:
    return [UploadedFile(name=n, data=(FIXTURES / n).read_bytes()) for n in names]


def train_on(rig: Rig, intake: IntakeService, user: User, *names: str) -> Version:
    """Upload ``names`` through the intake (which stores their faces) and train on them."""
    dataset = intake.ingest_files(user=user, files=files(*names))
    assert rig.blobs.exists(reference_key(dataset.id, rig.faces.model_name))
    return rig.train_dataset(user, dataset.id)


def trained_person_findings(report: IntakeReport) -> list[str]:
    return [f.message for f in report.findings if f.code == NOT_THE_TRAINED_PERSON]


def test_another_person_s_photos_after_a_version_are_warned_about(rig: Rig) -> None:
    intake = intake_of(rig)
    ann = rig.user()
    v1 = train_on(rig, intake, ann, "obama.jpg", "obama2.jpg")
    assert rig.model(ann).active_version_id == v1.id
    report = intake.check_files(files=files("people/p07-01.jpg", "people/p07-02.jpg"), user=ann)
    found = [f for f in report.findings if f.code == NOT_THE_TRAINED_PERSON]
    assert len(found) == 1, report.findings
    finding = found[0]
    assert finding.photo is None  # about the set
    assert finding.severity == "warn"
    assert finding.message.startswith(
        "these photos do not look like the person your model was trained on (version 1;")
    assert "held back by the likeness gate" in finding.message
    assert "upload photos of the same person" in finding.advice
    # A warning: the set itself can be trained on, and the verdict's reasons name it.
    assert report.trainable
    assert any(r.startswith("these photos do not look like") for r in report.verdict["reasons"])
    # Stored with the dataset when uploaded anyway.
    dataset = intake.ingest_files(user=ann, files=files("biden.jpg"))
    assert [f.code for f in dataset.findings if f.code == NOT_THE_TRAINED_PERSON] == [
        NOT_THE_TRAINED_PERSON]


def test_without_the_gate_the_warning_does_not_say_the_gate_holds_the_version(rig: Rig) -> None:
    """SELFIE_LORA_QUALITY_GATE=false: the new version is activated at once, held by nothing."""
    ann = rig.user()
    train_on(rig, intake_of(rig), ann, "obama.jpg", "obama2.jpg")
    report = intake_of(rig, gate_enabled=False).check_files(
        files=files("people/p07-01.jpg", "people/p07-02.jpg"), user=ann)
    [message] = trained_person_findings(report)
    assert "held back" not in message
    assert message.endswith("a retraining on them would learn another face")


def test_the_same_person_s_new_photos_are_not_warned_about(rig: Rig) -> None:
    intake = intake_of(rig)
    ann = rig.user()
    train_on(rig, intake, ann, "obama.jpg", "obama2.jpg")
    report = intake.check_files(files=files("obama3.jpg"), user=ann)
    assert report.trainable
    assert trained_person_findings(report) == []


def test_a_first_upload_has_nothing_to_be_compared_with(rig: Rig) -> None:
    intake = intake_of(rig)
    ann = rig.user()
    train_on(rig, intake, ann, "obama.jpg", "obama2.jpg")
    bob = rig.user("bob")  # no model, no version: ann's person is not his
    report = intake.check_files(files=files("people/p07-01.jpg", "people/p07-02.jpg"), user=bob)
    assert report.trainable
    assert trained_person_findings(report) == []
    # Nor does the photo check without a user (selfie-lora check) compare with anyone.
    assert trained_person_findings(intake.check_files(files=files("biden.jpg"))) == []
