"""What the command line prints of a photo check."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from selfie_lora.console import literal, print_report
from selfie_lora.dataset.prepare import PreparedPhoto
from selfie_lora.domain.entities import Finding
from selfie_lora.services.intake import IntakeReport


def _report(*, trainable: bool, kept: int, total: int,
            findings: tuple[Finding, ...] = (), reasons: tuple[str, ...] = ()) -> IntakeReport:
    photos = tuple(PreparedPhoto(name=f"p{i}.jpg", sha256="0" * 64, data=b"", width=64,
                                 height=64) for i in range(kept))
    return IntakeReport(images_total=total, accepted=photos, findings=findings,
                        trainable=trainable,
                        verdict={"quality": "good" if trainable else "poor",
                                 "score": 80 if trainable else 25, "reasons": list(reasons)},
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


def test_a_set_refused_as_too_small_does_not_say_none_is_usable() -> None:
    """3 good photos, 5 needed: "3 of 3 photos pass their own checks, but the set is refused, so
    none is usable" was followed by its reason "3 usable photos; at least 5 are needed"."""
    few = Finding("reject", "too_few_photos", "3 usable photos; at least 5 are needed",
                  "add 2 or more clear photos of your face")
    report = _report(trainable=False, kept=3, total=3, findings=(few,), reasons=(few.message,))
    said = _printed(report)
    assert "none is usable" not in said
    assert ("3 of 3 photos pass their own checks, but the set is refused: not trainable"
            in said), said
    assert "- 3 usable photos; at least 5 are needed" in said


def _intake(*, trainable: bool, prepared: int, total: int,
            findings: tuple[Finding, ...]) -> IntakeReport:
    from selfie_lora.dataset.checks import SetReport
    from selfie_lora.dataset.pipeline import IntakeResult
    from selfie_lora.domain.recipes import CheckTarget

    photos = tuple(PreparedPhoto(name=f"p{i}.jpg", sha256="0" * 64, data=b"", width=64,
                                 height=64) for i in range(prepared))
    rejected = tuple(sorted({f.photo for f in findings if f.photo and f.severity == "reject"
                             and f.code != "not_an_image"}))
    report = SetReport(trainable=trainable, quality="fair" if trainable else "poor", score=60,
                       reasons=(), findings=findings, accepted=tuple(p.name for p in photos),
                       rejected=rejected)
    result = IntakeResult(images_total=total, prepared=photos, findings=findings, report=report)
    return IntakeReport.from_result(result, notes=(), target=CheckTarget.TINY, resolution=64)


def test_the_verdicts_counts_add_up_to_the_upload_and_say_what_the_text_says() -> None:
    """A text file among 8 photos: the verdict said accepted 8, rejected 0 of images_total 9
    (undecodable files were left out of "rejected"); a set of two people said accepted 14 where
    the text said "none is usable"."""
    text = Finding("reject", "not_an_image", "notes.txt is not a photo", "upload photos",
                   photo="notes.txt")
    one_text = _intake(trainable=True, prepared=8, total=9, findings=(text,)).verdict
    assert (one_text["accepted"], one_text["rejected"]) == (8, 1)
    several = Finding("reject", "several_people", "2 different people", "upload one person's")
    refused = _intake(trainable=False, prepared=14, total=14, findings=(several,))
    assert (refused.verdict["accepted"], refused.verdict["rejected"]) == (0, 14)
    assert refused.verdict["passed_own_checks"] == 14
    assert "14 of 14 photos pass their own checks, but the set is refused" in _printed(refused)


@pytest.mark.parametrize("text", ["/tmp/photos\\", "/tmp/photos\\\\", "C:\\a\\", "\\",
                                  "no[/such]\\", "[bold]x\\[/bold]\\", "plain", ""])
@pytest.mark.parametrize("around", ["{} (after)", "[bold]{}[/bold] after", "{}", "[red]{}[/red]"])
def test_a_text_is_printed_as_it_is_whatever_it_ends_in(text: str, around: str) -> None:
    """rich's escape doubled a final backslash, and rich printed both where no tag followed:
    a folder '/tmp/photos\\' was shown as '/tmp/photos\\\\', which does not paste back."""
    out = Console(record=True, width=400)
    out.print(around.format(literal(text)), highlight=False)
    assert out.export_text() == re.sub(r"\[/?(bold|red)\]", "", around).format(text) + "\n"
