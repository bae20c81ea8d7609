"""The checks of the set as a whole: near-duplicates and a different person leave it, then its
count and variety are judged and :func:`check_set` gives the verdict; :func:`describe` puts
it in a few lines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from selfie_lora.dataset.checks.analysis import (
    FloatArray,
    PhotoAnalysis,
    Quality,
    SetReport,
    SetStats,
    TrainedPerson,
)
from selfie_lora.dataset.checks.duplicates import (
    NEAR_DUPLICATE,
    duplicate_findings,
    near_duplicate_pairs,
)
from selfie_lora.dataset.checks.policy import CheckPolicy
from selfie_lora.domain.entities import Finding

logger = logging.getLogger(__name__)

# The code of the finding on a photo of someone other than the set's person (``_identity``).
DIFFERENT_PERSON = "different_person"
# The codes of the findings ``check_set`` gives a photo by judging it against the rest of the
# set, not on its own: a near-duplicate of another photo, a photo of someone else.
AGAINST_THE_SET = frozenset({NEAR_DUPLICATE, DIFFERENT_PERSON})
# The code of the finding on a set whose person is not the one the user's model was trained on
# (``_trained_person``).
NOT_THE_TRAINED_PERSON = "not_the_trained_person"


def _distances(vectors: FloatArray) -> FloatArray:
    diff = vectors[:, None, :] - vectors[None, :, :]
    result: FloatArray = np.sqrt((diff**2).sum(axis=-1))
    return result


def _groups(pair: FloatArray, *, policy: CheckPolicy) -> list[list[int]]:
    """The photos (indices) that show one person, largest group first: groups are merged while
    every face of one is within the pair distance of every face of the other (complete
    linkage: a stranger a little like one of the user's photos does not chain two people
    into one group). The closest two groups merge first; of equally close ones, the first
    pair in (group, later group) order."""
    groups = [[i] for i in range(len(pair))]
    # The linkage of each two groups (the largest distance between their photos), kept as a
    # matrix updated on each merge: comparing every two groups' members again on each merge
    # took O(n^3) Python steps (7.8 s for 200 photos, which one upload may hold).
    linkage = np.array(pair, dtype=np.float64, copy=True)
    later = np.triu(np.ones(linkage.shape, dtype=bool), k=1)
    while len(groups) > 1:
        # NaN compares false: such a pair never merges, as max() over it was NaN before.
        eligible = later & (linkage <= policy.identity_pair_distance)
        if not eligible.any():
            break
        # argmin over the row-major order: the first of the closest pairs.
        a, b = divmod(int(np.argmin(np.where(eligible, linkage, np.inf))), len(groups))
        groups[a] = sorted(groups[a] + groups.pop(b))
        linkage[a] = np.maximum(linkage[a], linkage[b])
        linkage[:, a] = linkage[a]
        linkage = np.delete(np.delete(linkage, b, axis=0), b, axis=1)
        later = later[:-1, :-1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def _several_people(photos: Sequence[PhotoAnalysis], groups: Sequence[Sequence[int]]
                    ) -> Finding | None:
    """One finding for a set of two or more people, none of them a clear majority: telling each
    photo that it shows "someone else" left the user not knowing which photos go together."""
    people = [g for g in groups if len(g) >= 2]
    if len(people) < 2 or len(people[0]) >= 2 * len(people[1]):
        return None
    listed = " / ".join(", ".join(photos[i].name for i in g) for g in people)
    return Finding(
        "reject", "several_people",
        f"these photos show {len(people)} different people: {listed}",
        "upload only the photos of the one person the model is for")


def _crowd(photo: PhotoAnalysis, centre: FloatArray, distance: float, *,
           policy: CheckPolicy) -> Finding | None:
    """The finding of a photo with more than one face whose main (largest) face does not look
    like the set, or None when it does or the photo shows one face. The main face is the one
    trained on: when it is a friend's, keeping the photo trains the friend's face."""
    if distance <= policy.identity_centre_warn:
        return None
    others = [float(np.linalg.norm(np.asarray(f.embedding, dtype=np.float64) - centre))
              for f in photo.faces[1:] if f.embedding is not None]
    if not others:
        return None
    if min(others) <= policy.identity_centre_warn:
        return Finding(
            "reject", DIFFERENT_PERSON,
            f"the largest face in {photo.name} is someone else's (distance {distance:.2f}); you "
            f"seem to be a smaller face in it (distance {min(others):.2f}): the photo would "
            "train the other person's face",
            "crop the photo to your face alone and upload the crop, or use another photo",
            photo=photo.name)
    return Finding(
        "reject" if distance > policy.identity_centre_distance else "warn", DIFFERENT_PERSON,
        f"the largest face in {photo.name}, the one used for training, looks less like the "
        f"other photos (distance {distance:.2f})",
        "if that face is not yours, the photo would train the other person's face: crop the "
        "photo to your face alone, or leave it out", photo=photo.name)


# Rejections that leave a face's embedding unreliable: such a photo is not compared (see
# check_set). A face too small for the training resolution is not among them: its embedding
# (taken from a 150 px chip) still tells people apart, and leaving such strangers out lowered
# the recall of bench/checks_eval.py.
_UNRELIABLE_FACE = frozenset({"blurry", "underexposed", "overexposed"})


def _identity(photos: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> list[Finding]:
    with_id = [p for p in photos if p.embedding is not None]
    n = len(with_id)
    if n < 2:
        return []
    vectors = np.asarray([p.embedding for p in with_id], dtype=np.float64)
    pair = _distances(vectors)
    groups = _groups(pair, policy=policy)
    several = _several_people(with_id, groups)
    if several is not None:
        return [several]
    # The user is the group holding most of the photos: the others are judged against it alone,
    # so two photos of one stranger no longer pull the centre towards each other.
    main = groups[0] if len(groups[0]) * 2 > n else list(range(n))
    group_of = {i: g for g in groups for i in g}
    findings: list[Finding] = []
    advice = "use only photos of the one person the model is for"
    if n >= policy.centre_min_photos:
        for i, photo in enumerate(with_id):
            # The centre of the OTHER photos: the photo judged does not pull it towards itself.
            others = vectors[[j for j in main if j != i]]
            centre = np.median(others, axis=0)
            distance = float(np.linalg.norm(vectors[i] - centre))
            # Outside the user's group, and alike with another photo outside it: a second person
            # seen twice, refused as soon as it is not clearly like the user.
            repeated = i not in main and len(group_of[i]) >= 2
            crowd = _crowd(photo, centre, distance, policy=policy)
            if crowd is not None:
                findings.append(crowd)
            elif distance > policy.identity_centre_distance or (
                    repeated and distance > policy.identity_centre_warn):
                findings.append(Finding(
                    "reject", DIFFERENT_PERSON,
                    f"{photo.name} seems to show someone else than the other photos "
                    f"(distance {distance:.2f})", advice, photo=photo.name,
                ))
            elif distance > policy.identity_centre_warn:
                findings.append(Finding(
                    "warn", DIFFERENT_PERSON,
                    f"the face in {photo.name} looks less like the other photos "
                    f"(distance {distance:.2f})",
                    # "keep it" contradicted a photo's own rejection (cut off, say).
                    "check that this is the same person" if photo.rejected else
                    "check that this is the same person; if it is, keep it", photo=photo.name,
                ))
        return findings
    if n == 2:
        if pair[0, 1] > policy.identity_pair_distance:
            # Two photos, two faces: there is no telling which one is the user.
            findings.extend(Finding(
                "warn", DIFFERENT_PERSON,
                f"{with_id[0].name} and {with_id[1].name} seem to show different people "
                f"(distance {pair[0, 1]:.2f})", advice, photo=p.name,
            ) for p in with_id)
        return findings
    for i, photo in enumerate(with_id):
        far = [j for j in range(n) if j != i and pair[i, j] > policy.identity_pair_distance]
        # Far from most others, while those others agree among themselves.
        rest = [j for j in range(n) if j != i]
        rest_agree = all(pair[a, b] <= policy.identity_pair_distance
                         for a in rest for b in rest if a < b)
        if len(far) * 2 > n - 1 and rest_agree:
            findings.append(Finding(
                "reject", DIFFERENT_PERSON,
                f"{photo.name} seems to show someone else than the other photos "
                f"(distance {min(pair[i, j] for j in far):.2f} or more)", advice, photo=photo.name,
            ))
    return findings


def _trained_person(kept: Sequence[PhotoAnalysis], trained: TrainedPerson, *,
                    policy: CheckPolicy) -> Finding | None:
    """The finding of a set whose person is not the one the model was trained on: the median
    face of the kept photos against the median face of that version's training photos, over
    the distance at which the set check calls a photo someone else's
    (``identity_centre_distance``). Medians on both sides, as ``_identity`` takes them: one odd
    photo on either side does not move them. A warning, not a refusal: the set itself can be
    trained on, and a user who means the model for this person now (the first training was on
    the wrong photos) must be able to train it; the likeness gate holds such a version back
    until the user activates it."""
    faces = [p.embedding for p in kept if p.embedding is not None]
    if not faces or not trained.embeddings:
        return None
    here = np.median(np.asarray(faces, dtype=np.float64), axis=0)
    there = np.median(np.asarray(trained.embeddings, dtype=np.float64), axis=0)
    if here.shape != there.shape:  # another face model's embeddings: not comparable
        return None
    distance = float(np.linalg.norm(here - there))
    if distance <= policy.identity_centre_distance:
        return None
    held = ("a retraining on them would be held back by the likeness gate, your model staying "
            f"at version {trained.version}" if trained.gated else
            "a retraining on them would learn another face")
    return Finding(
        "warn", NOT_THE_TRAINED_PERSON,
        f"these photos do not look like the person your model was trained on (version "
        f"{trained.version}; distance {distance:.2f}): {held}",
        "upload photos of the same person; if the model is now meant for this person, train "
        "anyway and make the new version the active one on the Versions page "
        "(or selfie-lora activate)")


def _spread(values: Sequence[float]) -> float:
    return float(np.std(np.asarray(values, dtype=np.float64)))


def _variety(kept: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> tuple[list[Finding],
                                                                               SetStats]:
    metrics = [p.metrics for p in kept if p.metrics is not None]
    stats = SetStats(photos=len(kept))
    if len(metrics) < policy.variety_min_photos:
        return [], stats
    yaws = [m.yaw for m in metrics if m.yaw is not None]
    pitches = [m.pitch for m in metrics if m.pitch is not None]
    stats = SetStats(
        photos=len(kept),
        yaw_spread=_spread(yaws) if len(yaws) >= 2 else None,
        pitch_spread=_spread(pitches) if len(pitches) >= 2 else None,
        framing_spread=_spread([math.log(max(m.face_fraction, 1e-3)) for m in metrics]),
        lighting_spread=_spread([m.face_luma for m in metrics]),
        side_light_spread=_spread([m.light_asymmetry for m in metrics]),
        background_spread=float(np.median(
            [d for i, row in enumerate(_distances(np.asarray([m.background for m in metrics])))
             for d in row[i + 1:]])),
    )
    out: list[Finding] = []
    if stats.yaw_spread is not None and stats.yaw_spread < policy.min_yaw_spread_deg:
        out.append(Finding(
            "warn", "little_pose_variety",
            f"your face is turned the same way in every photo (spread {stats.yaw_spread:.0f} deg)",
            "add photos with your head turned a little left and right, and a few in profile"))
    if stats.pitch_spread is not None and stats.pitch_spread < policy.min_pitch_spread_deg:
        out.append(Finding(
            "info", "little_pitch_variety",
            "you look at the camera from the same height in every photo",
            "add a few photos looking slightly up or down"))
    if stats.framing_spread is not None and stats.framing_spread < policy.min_framing_spread:
        close = float(np.median([m.face_fraction for m in metrics])) >= 0.25
        out.append(Finding(
            "warn", "little_framing_variety",
            f"all photos are {'close-ups' if close else 'framed alike'}",
            "mix close-ups with some head-and-shoulders and half-body photos" if close else
            "mix half-body photos with some close-ups of your face"))
    if (stats.lighting_spread is not None and stats.lighting_spread < policy.min_lighting_spread
            and stats.side_light_spread is not None
            and stats.side_light_spread < policy.min_side_light_spread):
        out.append(Finding(
            "info", "little_lighting_variety",
            "the light on your face is alike in every photo",
            "add photos in other light: daylight outdoors, indoors, evening"))
    if (stats.background_spread is not None
            and stats.background_spread < policy.min_background_spread):
        out.append(Finding(
            "warn", "little_background_variety",
            "the background looks the same in every photo",
            "take photos in different places: the model would otherwise learn the background "
            "as part of you"))
    return out, stats


_COUNT_CODES = frozenset({"too_few_photos", "few_photos", "many_photos", "too_many_photos"})


def _usable(count: int) -> str:
    # Read by people: "1 usable photo", "0 usable photos", never "photo(s)".
    return f"{count} usable photo{'' if count == 1 else 's'}"


def _verdict(*, kept: int, total: int, photo_warned: int, set_findings: Sequence[Finding],
             several: bool, trainable: bool, policy: CheckPolicy
             ) -> tuple[Quality, int, tuple[str, ...]]:
    """A 0-100 score from the deductions below, its quality word and the main reasons
    (``several``: the set was refused for showing several people)."""
    deductions: list[tuple[float, str]] = []
    too_few = [f.message for f in set_findings if f.code == "too_few_photos"]
    # With several people the count mixes their photos: its reason would contradict the refusal.
    if several:
        pass  # the refusal is the reason; the photos to count are the one person's
    elif kept < policy.recommended_min:
        # Below the minimum the set is refused for it: the reason says so, not what works best.
        deductions.append((45.0 * (policy.recommended_min - kept) / policy.recommended_min,
                           too_few[0] if too_few else
                           f"{_usable(kept)}: {policy.recommended_min}-"
                           f"{policy.recommended_max} work best"))
    elif kept > policy.recommended_max:
        deductions.append((min(10.0, float(kept - policy.recommended_max)),
                           f"{kept} photos: more than {policy.recommended_max} adds little"))
    left_out = total - kept
    if left_out:
        deductions.append((min(15.0, 3.0 * left_out),
                           f"{left_out} photo{'' if left_out == 1 else 's'} left out"))
    if kept and photo_warned:
        deductions.append((25.0 * photo_warned / kept,
                           f"{photo_warned} of {kept} kept photo{'' if kept == 1 else 's'} "
                           f"{'has a warning' if photo_warned == 1 else 'have warnings'}"))
    for finding in set_findings:
        # The count has its own deduction above; the variety findings weigh here.
        if finding.code in _COUNT_CODES:
            continue
        if finding.photo is None:
            weight = {"reject": 30.0, "warn": 8.0}.get(finding.severity, 2.0)
            deductions.append((weight, finding.message))
    score = max(0.0, 100.0 - sum(d for d, _ in deductions))
    if not trainable:
        score = min(score, 25.0)
    deductions.sort(key=lambda d: -d[0])
    reasons = tuple(text for _, text in deductions[:4])
    if not trainable:
        reasons = ("the set cannot be trained on as it is", *reasons)
    quality: Quality
    if not trainable or score < 50:
        quality = "poor"
    elif score >= 85 and kept >= policy.recommended_min:
        quality = "excellent"  # never with fewer photos than recommended, however clean
    elif score >= 70:
        quality = "good"
    else:
        quality = "fair"
    return quality, round(score), reasons


def check_set(analyses: Sequence[PhotoAnalysis], *, policy: CheckPolicy,
              unreadable: int = 0, trained: TrainedPerson | None = None) -> SetReport:
    """Judge the set: near-duplicates and strangers first (they leave the set), then count,
    variety, whether it shows the person ``trained`` (the user's model, if any) and the verdict
    on what is left. ``unreadable``: photos of the upload that could not be decoded (they count
    as left out in the score)."""
    photos = sorted(analyses, key=lambda a: a.order)
    findings: list[Finding] = [f for a in photos for f in a.findings]
    pairs = near_duplicate_pairs(photos, policy=policy)
    copies = {photos[i].name for i, _, _ in pairs}
    # A face refused as blurred or badly exposed is not compared: its embedding is
    # unreliable (the user's own blurred photo measured 0.54 from the others, "someone else"),
    # it would pull the centre the others are judged against, and "someone else" on top of its
    # real reason misled. Photos refused for other reasons (cut off, too small) keep the
    # comparison: a stranger's photo is still named as one (bench/checks_eval.py's recall).
    identity = _identity([p for p in photos if p.name not in copies and not any(
        f.severity == "reject" and f.code in _UNRELIABLE_FACE for f in p.findings)],
                         policy=policy)
    # The duplicates are worded once identity is known: "keep only X" named a stranger's photo
    # that the identity check then rejected.
    strangers = {f.photo for f in identity if f.severity == "reject" and f.photo}
    cross = [*duplicate_findings(photos, pairs, refused=strangers), *identity]
    findings.extend(f for f in cross if f.photo is not None)
    rejected_names = {f.photo for f in findings if f.severity == "reject" and f.photo}
    kept = [p for p in photos if p.name not in rejected_names]
    # Findings of the whole set from the identity check (several people in it).
    set_findings: list[Finding] = [f for f in cross if f.photo is None]
    count = len(kept)
    # A set refused for showing several people: its count and variety mix two people's photos,
    # and "14 usable photos ... add 1 or more" beside "none is usable" contradicted the refusal
    # (8 are left once the other person's go). They are judged again on the set sent without.
    several = any(f.code == "several_people" for f in set_findings)
    if not several:
        if count < policy.min_photos:
            set_findings.append(Finding(
                "reject", "too_few_photos",
                f"{_usable(count)}; at least {policy.min_photos} "
                f"{'is' if policy.min_photos == 1 else 'are'} needed",
                # A number to act on, as few_photos gives: "add more" left the user to work
                # out how many the minimum still needs.
                f"add {policy.min_photos - count} or more clear photos of your face "
                f"({policy.recommended_min}-{policy.recommended_max} work best)"))
        elif count < policy.recommended_min:
            set_findings.append(Finding(
                "warn", "few_photos",
                f"{_usable(count)}; {policy.recommended_min}-{policy.recommended_max} work best",
                f"add {policy.recommended_min - count} or more photos in different places, "
                "light and poses"))
        if count > policy.max_photos:
            set_findings.append(Finding(
                "reject", "too_many_photos",
                f"{count} usable photos; at most {policy.max_photos} are accepted",
                f"keep your best {policy.recommended_max}"))
        elif count > policy.recommended_max:
            set_findings.append(Finding(
                "info", "many_photos",
                f"{count} usable photos; more than {policy.recommended_max} rarely helps",
                f"keep your {policy.recommended_max} best and most varied photos"))
    variety, stats = _variety(kept, policy=policy)
    if not several:
        set_findings.extend(variety)
        # With several people there is no one person to compare: the refusal says so first.
        other = _trained_person(kept, trained, policy=policy) if trained is not None else None
        if other is not None:
            set_findings.append(other)
    findings.extend(set_findings)
    trainable = not any(f.severity == "reject" for f in set_findings)
    warned = sum(1 for p in kept if any(f.severity == "warn" and f.photo == p.name
                                        for f in findings))
    quality, score, reasons = _verdict(kept=count, total=len(photos) + unreadable, several=several,
                                       photo_warned=warned,
                                       set_findings=set_findings, trainable=trainable,
                                       policy=policy)
    logger.info("set of %d photo(s): %d kept, %s (%d)", len(photos), count, quality, score)
    return SetReport(
        trainable=trainable, quality=quality, score=score, reasons=reasons,
        findings=tuple(findings), accepted=tuple(p.name for p in kept),
        rejected=tuple(p.name for p in photos if p.name in rejected_names), stats=stats,
    )


def describe(report: SetReport) -> str:
    """A few lines for logs and the command line."""
    lines = [f"{report.quality} ({report.score}/100), "
             f"{'trainable' if report.trainable else 'not trainable'}: "
             f"{len(report.accepted)} kept, {len(report.rejected)} left out"]
    lines.extend(f"  - {reason}" for reason in report.reasons)
    return "\n".join(lines)
