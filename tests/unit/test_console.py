"""What the command line prints of a photo check."""

from __future__ import annotations

from rich.console import Console

from selfie_lora.console import print_report
from selfie_lora.dataset.prepare import PreparedPhoto
from selfie_lora.domain.entities import Finding
from selfie_lora.services.intake import IntakeReport


def _report(*, trainable: bool, kept: int, total: int,
            findings: tuple[Finding, ...] = ()) -> IntakeReport:
    photos = tuple(PreparedPhoto(name=f"p{i}.jpg", sha256="0" * 64, data=b"", width=64,
                                 height=64) for i in range(kept))
    return IntakeReport(images_total=total, accepted=photos, findings=findings,
                        trainable=trainable,
                        verdict={"quality": "good" if trainable else "poor",
                                 "score": 80 if trainable else 25, "reasons": []},
                        target="tiny", resolution=64)


def _printed(report: IntakeReport) -> str:
    out = Console(record=True, width=400)
    print_report(report, title="photos", out=out)
    return " ".join(out.export_text().split())


def test_a_set_refused_as_a_whole_does_not_call_its_photos_usable() -> None:
    """6 photos of two people: each passed its own checks, the set was refused for
    several_people, and the summary read "6 of 6 photos usable: not trainable"."""
    several = Finding("reject", "several_people", "these photos show 2 different people: ...",
                      "upload only the photos of the one person the model is for")
    said = _printed(_report(trainable=False, kept=6, total=6, findings=(several,)))
    assert "6 of 6 photos usable" not in said
    assert ("6 of 6 photos pass their own checks, but the set is refused, so none is usable: "
            "not trainable") in said
    assert "4 of 5 photos usable: trainable" in _printed(_report(trainable=True, kept=4, total=5))
    assert "0 of 4 photos usable: not trainable" in _printed(
        _report(trainable=False, kept=0, total=4))


def test_photos_rejected_only_against_the_set_still_pass_their_own_checks() -> None:
    """10 photos: 4 refused for their own faults, 2 only as someone else, 4 usable and the set
    refused for too few: the summary said "4 of 10 photos pass their own checks" (the accepted
    ones) where 6 did."""
    own = tuple(Finding("reject", "blurry", "blurry", "use a sharp photo", photo=f"b{i}.jpg")
                for i in range(4))
    other = tuple(Finding("reject", "different_person", "someone else", "use only yours",
                          photo=f"s{i}.jpg") for i in range(2))
    few = Finding("reject", "too_few_photos", "4 usable photos; at least 5 are needed", "add")
    report = _report(trainable=False, kept=4, total=10, findings=(*own, *other, few))
    assert report.passed_own_checks == 6
    assert "6 of 10 photos pass their own checks, but the set is refused" in _printed(report)
