"""Likeness tracking, the pure part: probe sets, identity scores and the gate.

Every version of a model is judged on the same probes (prompt + seed, chosen at the model's first
training), and every comparison scores both sides against the same reference photos, so two
numbers are only ever compared when they measure the same thing.

Identity similarity. dlib's 128-d face embeddings put two photos of one person about 0.2-0.5
apart and two people more than 0.6 apart (its documented threshold). A distance ``d`` becomes a
similarity in 0..1 with ``max(0, 1 - d / 1.2)``: identical faces score 1, dlib's threshold 0.6
scores 0.5, and anything 1.2 or more apart scores 0.

A version's scores (``score_probes``):

- ``identity``: the mean, over its probes, of the similarity of the probe image's face to the
  *mean* embedding of the training photos' faces. A probe in which no face was found counts 0:
  a portrait prompt that yields no face has no likeness at all.
- ``identity_nearest``: the same with the *nearest* training photo instead of the mean.
- ``face_share``: the share of probes in which a face was found.
- ``sane_share``: the share of probe images that are neither blank, saturated nor broken (NaN);
  ``sharpness``: the median Laplacian variance of the probe images (see ``quality.images``).

``identity`` is None when the reference photos have no face at all (nothing to measure against);
the gate then falls back to ``face_share``.
"""

from __future__ import annotations

import enum
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from selfie_lora.domain.entities import GateStatus, Probe, Version
from selfie_lora.domain.faces import SAME_PERSON_DISTANCE
from selfie_lora.domain.lease import ROOM_WAIT_KEY, STORAGE_WAIT_KEY
from selfie_lora.errors import ErrorCode, InvalidInputError

Embedding = tuple[float, ...]

# The distance at which similarity reaches 0 (see the module docstring).
SIMILARITY_SCALE = 1.2
DEFAULT_PROBE_COUNT = 4
DEFAULT_GATE_TOLERANCE = 0.02

# Portrait prompts: the face must be visible for an identity score to mean anything.
PROBE_PROMPTS: tuple[str, ...] = (
    "a close-up portrait photo of {trigger}, looking at the camera, soft daylight",
    "a photo of {trigger} smiling, head and shoulders, plain background",
    "a portrait photo of {trigger} outdoors in a park, natural light",
    "a studio portrait of {trigger}, neutral expression, even lighting",
    "a photo of {trigger} wearing a dark jacket, face in focus",
    "a candid photo of {trigger} at a cafe table, looking at the camera",
    "a passport-style photo of {trigger}, facing forward",
    "a photo of {trigger} in warm evening light, head and shoulders",
)
MAX_PROBES = len(PROBE_PROMPTS)
_SEED_RANGE = 2**31


# --------------------------------------------------------------------------- probes


def choose_probes(*, trigger_word: str, rng: random.Random, count: int) -> tuple[Probe, ...]:
    """``count`` probes: distinct prompts from ``PROBE_PROMPTS`` with the trigger word, each with
    its own seed. Called once per model, when it is made; the result is stored."""
    if not 1 <= count <= MAX_PROBES:
        raise InvalidInputError(f"the probe count must be 1 to {MAX_PROBES}, not {count}",
                                code=ErrorCode.INVALID_PROBE_COUNT)
    templates = rng.sample(PROBE_PROMPTS, count)
    return tuple(
        Probe(index=i, prompt=t.format(trigger=trigger_word), seed=rng.randrange(_SEED_RANGE))
        for i, t in enumerate(templates)
    )


def probes_for_existing_model(*, model_id: str, trigger_word: str, count: int) -> tuple[Probe, ...]:
    """The probe set of a model created before likeness tracking. Derived from the model id, so
    two workers that both fill it in choose the same set."""
    return choose_probes(trigger_word=trigger_word, rng=random.Random(f"probes:{model_id}"),
                         count=count)


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class ImageSanity:
    """Plain image statistics of one probe image (computed by ``quality.images``)."""

    mean: float  # mean luminance, 0..255
    std: float  # luminance standard deviation
    saturated_share: float  # share of channel values at 0 or 255
    sharpness: float  # variance of the Laplacian of the luminance, at a fixed size
    blank: bool  # (nearly) one flat colour
    saturated: bool  # mostly clipped to black or white
    nan: bool  # the generator produced non-finite values, or the image cannot be decoded

    @property
    def ok(self) -> bool:
        return not (self.blank or self.saturated or self.nan)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean, "std": self.std, "saturated_share": self.saturated_share,
            "sharpness": self.sharpness, "blank": self.blank, "saturated": self.saturated,
            "nan": self.nan,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSanity:
        return cls(
            mean=float(data["mean"]), std=float(data["std"]),
            saturated_share=float(data["saturated_share"]), sharpness=float(data["sharpness"]),
            blank=bool(data["blank"]), saturated=bool(data["saturated"]), nan=bool(data["nan"]),
        )


@dataclass(frozen=True)
class ProbeResult:
    """What was measured on one probe image of one version. The face embedding is kept, so the
    version can be scored against any reference photos later without looking at it again."""

    index: int
    prompt: str
    seed: int
    image_key: str | None
    faces: int = 0
    face_box: tuple[int, int, int, int] | None = None
    embedding: Embedding | None = None  # the largest face's
    sanity: ImageSanity | None = None
    error: str | None = None
    # The LoRA scale the image was rendered at (None: before the scale was fixed, the model's).
    lora_scale: float | None = None

    @property
    def face_found(self) -> bool:
        return self.embedding is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "prompt": self.prompt, "seed": self.seed,
            "image_key": self.image_key, "faces": self.faces,
            "face_box": list(self.face_box) if self.face_box else None,
            "embedding": list(self.embedding) if self.embedding is not None else None,
            "sanity": self.sanity.as_dict() if self.sanity else None, "error": self.error,
            "lora_scale": self.lora_scale,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        box = data.get("face_box")
        emb = data.get("embedding")
        sanity = data.get("sanity")
        return cls(
            index=int(data["index"]), prompt=str(data["prompt"]), seed=int(data["seed"]),
            image_key=data.get("image_key"), faces=int(data.get("faces", 0)),
            face_box=(int(box[0]), int(box[1]), int(box[2]), int(box[3])) if box else None,
            embedding=tuple(float(v) for v in emb) if emb is not None else None,
            sanity=ImageSanity.from_dict(sanity) if sanity else None, error=data.get("error"),
            lora_scale=(float(data["lora_scale"]) if data.get("lora_scale") is not None
                        else None),
        )


# --------------------------------------------------------------------------- scores


def embedding_distance(a: Embedding, b: Embedding) -> float:
    """Euclidean distance, as dlib's own ``face_distance``."""
    return math.dist(a, b)


def similarity(distance: float) -> float:
    """0..1 from an embedding distance (see the module docstring)."""
    if not math.isfinite(distance):
        return 0.0
    return max(0.0, min(1.0, 1.0 - distance / SIMILARITY_SCALE))


# "Still the same person", in the gate's similarity units: the photo checks' "someone else" line
# (``SAME_PERSON_DISTANCE``, 0.52 from the centre of the set's faces) as a similarity, 1 - 0.52 /
# 1.2 = 0.5667. The gate's identity is the same measure, a probe face's distance to the centre
# (mean) of the training photos' faces. (A probe without a face counts 0 in the mean, so a
# version that draws faces half the time falls under it too: it does not show that person
# either.)
SAME_PERSON_IDENTITY = round(similarity(SAME_PERSON_DISTANCE), 4)


def stored_embeddings(stored: Mapping[str, Any]) -> tuple[Embedding, ...]:
    """The face embeddings of a dataset's stored faces file (``layout.reference_key``, written
    by the intake or the likeness scoring), photos without a face left out. Raises KeyError,
    TypeError or ValueError for a file that is not one."""
    return tuple(tuple(float(v) for v in p["embedding"]) for p in stored["photos"]
                 if p.get("embedding"))


def centroid(embeddings: Sequence[Embedding]) -> Embedding:
    if not embeddings:
        raise ValueError("the centroid of no embeddings")
    size = len(embeddings[0])
    return tuple(sum(e[i] for e in embeddings) / len(embeddings) for i in range(size))


@dataclass(frozen=True)
class ProbeScore:
    index: int
    face_found: bool
    similarity: float | None  # to the reference's mean face; None without a face or reference
    similarity_nearest: float | None  # to the nearest reference face
    sane: bool

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "face_found": self.face_found, "similarity": self.similarity,
                "similarity_nearest": self.similarity_nearest, "sane": self.sane}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeScore:
        return cls(
            index=int(data["index"]), face_found=bool(data["face_found"]),
            similarity=_opt_float(data.get("similarity")),
            similarity_nearest=_opt_float(data.get("similarity_nearest")),
            sane=bool(data.get("sane", True)),
        )


@dataclass(frozen=True)
class IdentityScores:
    """A version's headline scores against one set of reference photos."""

    identity: float | None
    identity_nearest: float | None
    face_share: float
    sane_share: float
    sharpness: float | None
    probes: int
    faces: int
    reference_faces: int
    per_probe: tuple[ProbeScore, ...] = ()

    def headline(self) -> dict[str, Any]:
        return {
            "identity": _round(self.identity), "identity_nearest": _round(self.identity_nearest),
            "face_share": _round(self.face_share), "sane_share": _round(self.sane_share),
            "sharpness": _round(self.sharpness), "probes": self.probes, "faces": self.faces,
            "reference_faces": self.reference_faces,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.headline(), "per_probe": [p.as_dict() for p in self.per_probe]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentityScores:
        return cls(
            identity=_opt_float(data.get("identity")),
            identity_nearest=_opt_float(data.get("identity_nearest")),
            face_share=float(data.get("face_share", 0.0)),
            sane_share=float(data.get("sane_share", 0.0)),
            sharpness=_opt_float(data.get("sharpness")),
            probes=int(data.get("probes", 0)), faces=int(data.get("faces", 0)),
            reference_faces=int(data.get("reference_faces", 0)),
            per_probe=tuple(ProbeScore.from_dict(p) for p in data.get("per_probe", [])),
        )


def score_probes(results: Sequence[ProbeResult], reference: Sequence[Embedding]) -> IdentityScores:
    """Score one version's probe results against the reference photos' face embeddings."""
    if not results:
        raise ValueError("a version is scored on at least one probe")
    mean_face = centroid(reference) if reference else None
    per_probe: list[ProbeScore] = []
    for r in sorted(results, key=lambda r: r.index):
        sim: float | None = None
        nearest: float | None = None
        if r.embedding is not None and mean_face is not None:
            sim = similarity(embedding_distance(r.embedding, mean_face))
            nearest = max(similarity(embedding_distance(r.embedding, e)) for e in reference)
        per_probe.append(ProbeScore(index=r.index, face_found=r.face_found, similarity=sim,
                                    similarity_nearest=nearest,
                                    sane=r.sanity.ok if r.sanity else False))
    n = len(per_probe)
    faces = sum(p.face_found for p in per_probe)
    identity = identity_nearest = None
    if mean_face is not None:
        # A probe without a face counts 0: see the module docstring.
        identity = sum(p.similarity or 0.0 for p in per_probe) / n
        identity_nearest = sum(p.similarity_nearest or 0.0 for p in per_probe) / n
    sharp = [r.sanity.sharpness for r in results if r.sanity is not None and not r.sanity.nan]
    return IdentityScores(
        identity=identity, identity_nearest=identity_nearest, face_share=faces / n,
        sane_share=sum(p.sane for p in per_probe) / n,
        sharpness=statistics.median(sharp) if sharp else None, probes=n, faces=faces,
        reference_faces=len(reference), per_probe=tuple(per_probe),
    )


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateDecision:
    status: GateStatus
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


FIRST_VERSION_REASON = "the first version has nothing to beat: it is active"


def nothing_to_beat_reason(version_number: int) -> str:
    """Why a version passed with no active version to compare it with: a first version, or a
    later one whose model has none active (every earlier version held, its training canceled
    while it was scored, say), which must not read as a first version beside its held ones."""
    if version_number == 1:
        return FIRST_VERSION_REASON
    return f"version {version_number} has no active version to compare with: it is active"


# Every probe of every version is rendered at this LoRA scale, whatever scale the user chose for
# their own pictures: the gate compares versions, so it must compare like with like.
PROBE_LORA_SCALE = 1.0
GATE_OFF_REASON = "the likeness gate is off (SELFIE_LORA_QUALITY_GATE=false): it is active"
# How every held reason ends (after ", so ", ": " or "; "), some with the hint after it.
KEPT_NOT_ACTIVATED = "it is kept but not activated"
ACTIVATE_HINT = "; activate it yourself if you want it"
USER_ACTIVATED = "you activated it yourself, so it stays active"


def held_but_user_activated(reason: str) -> str:
    """The reason of a held version that its user activated while the gate judged it: the
    gate held it, but it is active (the user's choice stands), so "kept but not activated" and
    the hint to activate it would say the opposite of what the user sees."""
    body = reason.removesuffix(ACTIVATE_HINT)
    for joint in (", so ", ": ", "; "):
        if body.endswith(joint + KEPT_NOT_ACTIVATED):
            return f"{body.removesuffix(joint + KEPT_NOT_ACTIVATED)}; {USER_ACTIVATED}"
    return f"{body}; {USER_ACTIVATED}"  # worded otherwise: what happened is said after it


def baseline_no_longer_active(reason: str, *, baseline_number: int, active_number: int) -> str:
    """``decide_gate``'s reason, which calls the baseline "the active version N", for a version
    whose user made another version active while it was scored (tried it early, then rolled back
    to an older one): the gate judged it against the version active when it was stored, and the
    reason (and the operator's alert) must not call that one the active version."""
    return reason.replace(
        f"the active version {baseline_number}",
        f"version {baseline_number}, active when this one was stored (version {active_number} "
        "is active now: you chose it meanwhile)")


def gate_reason_now(reason: str, *, active: bool, active_number: int | None) -> str:
    """A stored gate reason as a page or command shows it today: the reason is the gate's
    verdict when it judged the version, so one that says the version is (or stays) active reads
    as now once another version is active (a rollback) or none; it then says so after it. The
    stored reason itself is kept as the record of the decision."""
    if active or not reason.endswith(("it is active", "stays active")):
        return reason
    now = ("no version is active now" if active_number is None
           else f"version {active_number} is active now")
    return f"{reason} (when it was judged; {now})"


def decide_gate(
    *,
    candidate: IdentityScores | None,
    baseline: IdentityScores | None,
    tolerance: float,
    candidate_number: int,
    baseline_number: int | None,
    candidate_error: str | None = None,
    baseline_error: str | None = None,
    on_baseline_photos: tuple[IdentityScores, IdentityScores] | None = None,
    baseline_photos_unmeasured: str | None = None,
) -> GateDecision:
    """Whether a new version replaces the active one. Both scores must have been computed against
    the same reference photos (the service sees to it).

    ``baseline_number`` None: there is no active version (nothing to beat), and a scored
    candidate passes. A baseline that exists (``baseline_number`` set) but has no scores
    (``baseline`` None: its re-scoring failed, ``baseline_error`` says why) holds the candidate:
    a drop cannot be ruled out, and passing would replace the active version unjudged.

    Held when the candidate could not be scored, when its identity is lower than the
    baseline's by more than ``tolerance``, or when its share of sane probe images (not blank,
    saturated or broken: ``sane_share``) is. When the reference has no face (``identity`` None on
    either side) the face share is compared instead, with the same tolerance; when neither
    version shows any face (the offline tiny model) and its images are as sane, there is nothing
    to lose and it passes.

    ``on_baseline_photos``: the candidate's and the baseline's scores (in that order) against the
    *baseline's* training photos, when those are not the candidate's. Measured only on the new
    photos, the yardstick moves with the person: a retraining on someone else's photos beats the
    active version at resembling that someone. So a candidate that passes on its own photos is
    also held when, on the baseline's photos, it no longer shows the person the baseline shows:
    its identity there is under ``SAME_PERSON_IDENTITY`` while the baseline's is not, and lower
    by more than ``tolerance``. A smaller drift there (a change of look, new photos of the same
    person) does not hold it: those photos are no longer what the user trains on.
    ``details["measured_on"]`` says which photos decided (``NEW_PHOTOS`` or
    ``BASELINE_PHOTOS``), ``details["on_baseline_photos"]`` holds that second comparison.
    ``baseline_photos_unmeasured``: why that second comparison could not be made (the
    baseline's photos are gone for good); the candidate is judged on its own photos alone and
    the reason and ``details["baseline_photos_unmeasured"]`` say so.
    """
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError("the gate tolerance is a similarity difference, 0..1")
    details: dict[str, Any] = {
        "tolerance": tolerance,
        "after": candidate.headline() if candidate else None,
        "before": baseline.headline() if baseline else None,
    }
    v = f"version {candidate_number}"
    if candidate is None:
        why = candidate_error or "no score"
        return GateDecision(GateStatus.HELD, f"{v} could not be scored ({why}), so "
                            f"{KEPT_NOT_ACTIVATED}{ACTIVATE_HINT}", details)
    if baseline_number is None:
        return GateDecision(GateStatus.PASSED, nothing_to_beat_reason(candidate_number), details)
    active = f"the active version {baseline_number}"
    if baseline is None:
        why = baseline_error or "no score"
        return GateDecision(GateStatus.HELD, (
            f"{active} could not be scored ({why}), so {v} could not be compared with it: "
            f"{KEPT_NOT_ACTIVATED}{ACTIVATE_HINT}"), details)
    details["measured_on"] = NEW_PHOTOS
    first = _compare(candidate=candidate, baseline=baseline, tolerance=tolerance, v=v,
                     active=active, details=details)
    if first.status is GateStatus.HELD:
        return first
    # Images that went bad are a loss whatever the faces say: with no face on either side (the
    # tiny model) the identity cannot tell all-black or blank probes from sane ones.
    sane_drop = details["sane_drop"] = stored_drop(baseline.sane_share, candidate.sane_share)
    if sane_drop > tolerance:
        return GateDecision(GateStatus.HELD, (
            f"the probe images got worse: {candidate.sane_share:.0%} of {v}'s are sane (not "
            f"blank, saturated or broken) against {baseline.sane_share:.0%} for {active}, a drop "
            f"of more than the tolerance {tolerance:g}; {KEPT_NOT_ACTIVATED}"), details)
    if baseline_photos_unmeasured is not None:
        details["baseline_photos_unmeasured"] = baseline_photos_unmeasured
        return GateDecision(GateStatus.PASSED, (
            f"{first.reason}; not measured on the training photos of {active}: "
            f"{baseline_photos_unmeasured}, so judged on {v}'s own training photos alone"
            f"{IT_IS_ACTIVE}"), details)
    if on_baseline_photos is None:
        return GateDecision(GateStatus.PASSED, f"{first.reason}{IT_IS_ACTIVE}", details)
    cand_there, base_there = on_baseline_photos
    if cand_there.identity is None or base_there.identity is None:
        # No face in the active version's photos: nothing more to measure there.
        return GateDecision(GateStatus.PASSED, f"{first.reason}{IT_IS_ACTIVE}", details)
    drop = stored_drop(base_there.identity, cand_there.identity)
    after_text, before_text = shown_scores(cand_there.identity, base_there.identity,
                                           tolerance=tolerance)
    details["on_baseline_photos"] = {"after": cand_there.headline(),
                                     "before": base_there.headline(), "drop": drop,
                                     "same_person_identity": SAME_PERSON_IDENTITY}
    theirs = f"the training photos of {active}"
    if (drop > tolerance and round(cand_there.identity, 4) < SAME_PERSON_IDENTITY
            <= round(base_there.identity, 4)):
        details["measured_on"] = BASELINE_PHOTOS
        ours = ""
        if candidate.identity is not None and baseline.identity is not None:
            ours_after, ours_before = shown_scores(candidate.identity, baseline.identity,
                                                   tolerance=tolerance)
            ours = f"; on its own training photos {v} has {ours_after} against {ours_before}"
        # Neither set is said to be the wrong one: the user may have activated a version
        # trained on someone else's photos by hand, and be back on their own now.
        return GateDecision(GateStatus.HELD, (
            f"likeness dropped on {theirs}: identity {after_text} against {before_text} for "
            f"{active} there, under {SAME_PERSON_IDENTITY:.3f}, where the photo checks call a "
            f"face someone else's, while {active} is at or above it{ours}: the two photo sets "
            f"seem to show different people; {KEPT_NOT_ACTIVATED}"), details)
    if drop > tolerance:
        return GateDecision(GateStatus.PASSED, (
            f"{first.reason}; on {theirs}, identity {after_text} against {before_text}, lower "
            f"by more than the tolerance {tolerance:g} but still the same person "
            f"({SAME_PERSON_IDENTITY:.3f} or more){IT_IS_ACTIVE}"), details)
    return GateDecision(GateStatus.PASSED, (
        f"{first.reason}; on {theirs}, identity {after_text} against {before_text}, within the "
        f"tolerance {tolerance:g}{IT_IS_ACTIVE}"), details)


# How a passed reason ends. Said once, after every comparison made: ``_compare``'s passed
# reasons leave it out, so that ``decide_gate`` can add the comparison on the baseline's photos.
IT_IS_ACTIVE = ": it is active"

# Which training photos a gate's drop was measured on (``details["measured_on"]``).
NEW_PHOTOS = "new_photos"
BASELINE_PHOTOS = "baseline_photos"


def decided_on_baseline_photos(details: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A gate record's comparison on the baseline's own training photos when the gate decided on
    it (``measured_on`` ``BASELINE_PHOTOS``): its "before", "after" and "drop" are what decided.
    None when the decision was on the new version's photos (the record's own "before" and
    "after"), and for records from before ``measured_on`` existed. The one reading of it for
    the alert and the Versions page."""
    there = details.get("on_baseline_photos")
    return (there if details.get("measured_on") == BASELINE_PHOTOS and isinstance(there, Mapping)
            else None)


def _compare(*, candidate: IdentityScores, baseline: IdentityScores, tolerance: float, v: str,
             active: str, details: dict[str, Any]) -> GateDecision:
    """``decide_gate`` on the candidate's own training photos: held, or passed with a reason
    that does not say yet that it is active (``IT_IS_ACTIVE``: ``decide_gate`` ends it)."""
    ours = f"the training photos of {v}"
    if candidate.identity is not None and baseline.identity is not None:
        # Decided on the scores as stored (4 decimals): 0.52 against 0.50 is a drop of 0.02, not
        # of 0.020000000000000018, and is within a tolerance of 0.02 (stored_drop).
        drop = details["drop"] = stored_drop(baseline.identity, candidate.identity)
        after_text, before_text = shown_scores(candidate.identity, baseline.identity,
                                               tolerance=tolerance)
        if drop > tolerance:
            if candidate.faces == 0 and baseline.faces > 0:
                return GateDecision(GateStatus.HELD, (
                    f"likeness dropped: no face was found in any of {v}'s {candidate.probes} "
                    f"probe images ({active} had faces in {baseline.faces} of {baseline.probes}); "
                    f"{KEPT_NOT_ACTIVATED}"), details)
            return GateDecision(GateStatus.HELD, (
                f"likeness dropped: identity {after_text} against "
                f"{before_text} for {active} on {ours}, more than the tolerance "
                f"{tolerance:g}; {KEPT_NOT_ACTIVATED}"),
                details)
        if candidate.faces == 0 and baseline.faces == 0:
            return GateDecision(GateStatus.PASSED, (
                f"no face in the probe images of {v} or {active} (expected with an untrained or "
                "tiny model), nothing to lose"), details)
        return GateDecision(GateStatus.PASSED, (
            f"identity {after_text} against {before_text} for {active} on "
            f"{ours}, within the tolerance {tolerance:g}"), details)
    # No reference face to measure identity against: fall back to whether faces appear at all.
    drop = details["drop"] = stored_drop(baseline.face_share, candidate.face_share)
    if drop > tolerance:
        return GateDecision(GateStatus.HELD, (
            f"faces appear in {candidate.face_share:.0%} of {v}'s probe images against "
            f"{baseline.face_share:.0%} for {active} (the training photos have no face to measure "
            f"identity against); {KEPT_NOT_ACTIVATED}"), details)
    return GateDecision(GateStatus.PASSED, (
        f"the training photos have no face to measure identity against; faces appear in "
        f"{candidate.face_share:.0%} of {v}'s probe images against {baseline.face_share:.0%} for "
        f"{active}"), details)


def stored_drop(before: float, after: float) -> float:
    """How much lower ``after`` is than ``before``, from the scores as stored and shown (4
    decimals, ``IdentityScores.headline``): the gate decides on what the user reads, so 0.80004
    against 0.77996 is 0.8 against 0.78, a drop of 0.02, within a tolerance of 0.02."""
    return round(round(before, 4) - round(after, 4), 4)


def shown_scores(after: float, before: float, *, tolerance: float) -> tuple[str, str]:
    """``after`` and ``before`` as a reason or an alert writes them: 3 decimals, or the 4 that
    are stored where 3 would make the drop look on the other side of the tolerance (0.8004
    against 0.7802 is held, but "0.780 against 0.800" reads as a drop of exactly 0.02)."""
    drop = stored_drop(before, after)
    a3, b3 = round(round(after, 4), 3), round(round(before, 4), 3)
    if (round(b3 - a3, 4) > tolerance) == (drop > tolerance):
        return f"{a3:.3f}", f"{b3:.3f}"
    return f"{round(after, 4):.4f}", f"{round(before, 4):.4f}"


def shown_change(before: float, after: float, *, tolerance: float) -> str:
    """``after``'s change from ``before`` as the Versions page writes it ("+0.015"): the drop the
    gate decided on (``stored_drop``) with 3 decimals, or 4 where 3 would put it on the other
    side of the tolerance, as ``shown_scores`` does for the two scores (a held drop of 0.0202 is
    "-0.0202", never "-0.020")."""
    drop = stored_drop(before, after)
    places = 3 if (round(drop, 3) > tolerance) == (drop > tolerance) else 4
    return f"{0.0 - drop:+.{places}f}"  # 0.0 - 0.0: "+0.000", not "-0.000"


class GateMeasure(enum.StrEnum):
    """The score the gate compares, named as in ``IdentityScores.headline``."""

    IDENTITY = "identity"
    FACE_SHARE = "face_share"


def gate_measure(*scores: Mapping[str, Any] | None) -> GateMeasure:
    """Which score the gate compared for versions with these headline scores (one version's,
    or the two sides of a verdict): the identity, or the face share when none has an identity
    and one has a face share (training photos without a face, as ``decide_gate`` falls back).
    The one rule for everything that shows the gate's measure (the alert, the chart, the
    Versions page), so that none keys on the identity alone and calls a scored version "not
    scored"."""
    def has(score: Mapping[str, Any] | None, name: str) -> bool:
        return headline_score(score, name) is not None

    if (not any(has(score, GateMeasure.IDENTITY) for score in scores)
            and any(has(score, GateMeasure.FACE_SHARE) for score in scores)):
        return GateMeasure.FACE_SHARE
    return GateMeasure.IDENTITY


def headline_score(scores: object, name: str) -> float | None:
    """The ``name`` score of a version's headline ``scores`` (``IdentityScores.headline``, as
    stored in a verdict); None where there is none: not scored, or not a number (a bool is not
    one)."""
    value = scores.get(name) if isinstance(scores, Mapping) else None
    return (float(value) if isinstance(value, int | float) and not isinstance(value, bool)
            else None)


# --------------------------------------------------------------------------- the record


class LikenessStatus(enum.StrEnum):
    PENDING = "pending"
    SCORED = "scored"
    FAILED = "failed"


@dataclass(frozen=True)
class VersionLikeness:
    """A version's likeness record: what its probes showed, its scores against its own training
    photos, the training's own figures, and the embedding model that made the scores."""

    version_id: str
    model_id: str
    status: LikenessStatus
    created_at: datetime
    embedding_model: str | None = None
    reference_dataset_id: str | None = None
    scores: IdentityScores | None = None
    probes: tuple[ProbeResult, ...] = ()
    # final_loss, steps, steps_run (the steps ``seconds`` timed), seconds, cost (where the
    # backend reports it), and the trainer's metrics.
    training: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    scored_at: datetime | None = None

    @property
    def probe_marks(self) -> tuple[ProbeMark, ...]:
        return tuple(ProbeMark(index=p.index, lora_scale=p.lora_scale, image_key=p.image_key)
                     for p in self.probes)


@dataclass(frozen=True)
class ProbeMark:
    """How one probe image was made (its LoRA scale and stored key): whether a record is
    current, without the face embeddings measured on it."""

    index: int
    lora_scale: float | None
    image_key: str | None


@dataclass(frozen=True)
class LikenessSummary:
    """A version's likeness record without its probes' results (their embeddings, about 3 KB a
    probe): what a list of versions, the training log and the chart show of it. A page that read
    every version's whole record read ~12 KB of JSON per version per view; the probes are read
    only for the version(s) whose probes a view scores again (``VersionLikeness``)."""

    version_id: str
    model_id: str
    status: LikenessStatus
    created_at: datetime
    embedding_model: str | None = None
    reference_dataset_id: str | None = None
    scores: IdentityScores | None = None
    training: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    scored_at: datetime | None = None
    probe_marks: tuple[ProbeMark, ...] = ()


# What a view of a version's likeness reads: the whole record or its summary.
LikenessFacts = VersionLikeness | LikenessSummary


def likeness_cell(version: Version, record: LikenessFacts | None) -> str:
    """A version's Likeness as the Versions page and ``selfie-lora versions`` both show it: its
    identity against its own training photos, its face share when those have no face (the
    gate's measure then), else its scoring's state: ``pending`` for a version stored and not
    scored yet (no record, its gate pending: its training was stopped in phase scoring), ``-``
    for one never scored (from before likeness tracking). One function, so that the page and
    the command line cannot word one history two ways."""
    headline = (record.scores.headline()
                if record is not None and record.scores is not None else None)
    identity = headline_score(headline, GateMeasure.IDENTITY)
    if identity is not None:
        return f"{identity:.3f}"
    faces = headline_score(headline, GateMeasure.FACE_SHARE)
    if faces is not None and headline is not None and (
            gate_measure(headline) is GateMeasure.FACE_SHARE):
        return f"{faces:.0%} faces"
    if record is not None:
        return str(record.status)
    return str(LikenessStatus.PENDING) if version.gate_status is GateStatus.PENDING else "-"


def unscored_words(version: Version, record: LikenessFacts | None) -> str:
    """What a comparison says of a version's probe that has no result: "not scored" alone was
    said of a version whose scoring failed (which will not be scored by itself) and of one its
    worker is scoring now (which will) alike, as of one from before likeness tracking."""
    if record is not None and record.status is LikenessStatus.FAILED:
        return "scoring failed"
    if version.gate_status is GateStatus.PENDING:
        return "not scored yet"
    return "not scored"


def gate_cell(version: Version) -> str:
    """The gate's decision on a version as the Versions page and ``selfie-lora versions`` show
    it, and whether its user's activation overrode it: "held, activated anyway" (held alone read
    as if it were not in use)."""
    overridden = version.gate_details.get("override") is not None
    return f"{version.gate_status}, activated anyway" if overridden else str(version.gate_status)


# A key of ``Training.metrics`` the workers keep for themselves: the attempt that last stepped
# away on a database lock (``TrainingService._step_away``), which the next claim's line names.
LOCKED_AWAY_KEY = "stepped_away_on_lock"


class Undecided(enum.StrEnum):
    """Why the likeness gate has not decided on a pending version, where "its likeness is still
    being scored" would not be true: no worker is at it, as a database lock made the attempt
    that held it step away, and the next attempt goes on after a wait
    (``TrainingService.undecided``). Every place that says a pending version (the Versions
    page, its use dialog, the Generate page's version list, ``selfie-lora activate``,
    ``selfie-lora versions`` and ``compare``) words it from this one fact, so that none says
    "still being scored" where another says the database was busy."""

    # Its scoring was stopped before its likeness was scored: scored again shortly.
    SCORING_KEPT_WAITING = "scoring_kept_waiting"
    # Its likeness was scored, and then the lock met the judging: on the gate's verdict write,
    # or before the gate decided (the baseline's reference or scores, its photos), which leave
    # the same record. So "the gate could not decide yet", never "its decision could not be
    # saved": the next attempt judges it from those scores, not scoring it again.
    JUDGING_KEPT_WAITING = "judging_kept_waiting"
    # Not scored, its scoring's attempts spent: the next attempt judges it without scores.
    JUDGED_WITHOUT_SCORES_NEXT = "judged_without_scores_next"
    # Its stops spent twice over (scored or not): the next attempt holds it back unjudged.
    HELD_UNJUDGED_NEXT = "held_unjudged_next"
    # Its training's cancel was asked while its worker was at it: the next attempt cancels,
    # the gate never decides.
    CANCELED_NEXT = "canceled_next"


# Why such a version is pending, after "pending: " in the Versions page's Gate cell and below
# ``selfie-lora versions``' table: one wording for both (and ``compare``).
UNDECIDED_WORDS = {
    Undecided.SCORING_KEPT_WAITING: ("its likeness could not be scored yet: the database was "
                                     "busy; it is scored again shortly"),
    Undecided.JUDGING_KEPT_WAITING: ("its likeness is scored, but the gate could not decide "
                                     "yet: the database was busy; it is tried again shortly"),
    Undecided.JUDGED_WITHOUT_SCORES_NEXT: ("its likeness could not be scored: the database was "
                                           "busy; the gate decides without its scores next"),
    Undecided.HELD_UNJUDGED_NEXT: ("the gate could not decide on it: the database was busy; it "
                                   "is held back unjudged next"),
    Undecided.CANCELED_NEXT: ("its training is being canceled: the gate will not decide on it "
                              "(the database was busy; the cancel is done shortly)"),
}
# The same, in the Generate page's version list, in brackets after "vN".
UNDECIDED_NOTES = {
    Undecided.SCORING_KEPT_WAITING: "its likeness could not be scored yet: the database was busy",
    Undecided.JUDGING_KEPT_WAITING: ("the likeness gate could not decide yet: the database was "
                                     "busy"),
    Undecided.JUDGED_WITHOUT_SCORES_NEXT: ("its likeness could not be scored: the database was "
                                           "busy; the gate decides without its scores"),
    Undecided.HELD_UNJUDGED_NEXT: ("the likeness gate could not decide: the database was busy; "
                                   "it is held back unjudged"),
    Undecided.CANCELED_NEXT: "its training is being canceled: the gate will not decide on it",
}
# The same, where a version is used against the gate: after "Use version N from now on? New
# pictures will use it" in the Versions page's dialog and after "version N of U's model is
# active" from ``selfie-lora activate``.
UNDECIDED_AGAINST = {
    Undecided.SCORING_KEPT_WAITING: (", although its likeness could not be scored yet (the "
                                     "database was busy): the gate has not decided yet"),
    Undecided.JUDGING_KEPT_WAITING: (", although the likeness gate could not decide on it yet "
                                     "(the database was busy; its likeness is scored)"),
    Undecided.JUDGED_WITHOUT_SCORES_NEXT: (", although its likeness could not be scored (the "
                                           "database was busy): the gate has not decided yet"),
    Undecided.HELD_UNJUDGED_NEXT: (", although the likeness gate could not decide on it (the "
                                   "database was busy): it is held back unjudged next"),
    Undecided.CANCELED_NEXT: (", although its training is being canceled: the gate will not "
                              "decide on it"),
}
# The same, on the no-script box's "Yes, use version N" (short).
UNDECIDED_BOX = {
    Undecided.SCORING_KEPT_WAITING: " although its likeness could not be scored yet",
    Undecided.JUDGING_KEPT_WAITING: " although the gate has not decided yet",
    Undecided.JUDGED_WITHOUT_SCORES_NEXT: " although its likeness could not be scored",
    Undecided.HELD_UNJUDGED_NEXT: " although the gate has not decided",
    Undecided.CANCELED_NEXT: " although its training is being canceled",
}


# The workers' own keys (that lock's, and the storage's and a full disk's waits, noted while
# a version is scored too): not the trainer's figures, so never copied into what a version's
# record (``training_figures``) or the retraining log (``succeeded_event``) shows its owner.
BOOKKEEPING_METRIC_KEYS = frozenset({LOCKED_AWAY_KEY, STORAGE_WAIT_KEY, ROOM_WAIT_KEY})


def trainer_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without the workers' own keys (``BOOKKEEPING_METRIC_KEYS``)."""
    return {k: v for k, v in metrics.items() if k not in BOOKKEEPING_METRIC_KEYS}


def training_figures(
    metrics: dict[str, Any], *, loss: float | None, steps: int, seconds: float | None,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training's own figures from its trainer's metrics (whatever the backend reports), and
    every value of the recipe it trained with (``Recipe.values``): part of what made the version."""
    final_loss = _opt_float(metrics.get("final_loss"))
    if final_loss is None:
        final_loss = loss
    reported_seconds = _opt_float(metrics.get("seconds"))
    if reported_seconds is None:
        reported_seconds = _opt_float(metrics.get("predict_time"))
    reported_steps = metrics.get("steps")
    all_steps = int(reported_steps) if isinstance(reported_steps, int | float) else steps
    # The steps the time is for: a local training resumed (a canceled one's resume, a take-over,
    # a restarted child) reports its last run's steps and seconds, not the whole training's.
    steps_run = metrics.get("steps_run")
    return {
        "final_loss": final_loss,
        "steps": all_steps,
        "steps_run": int(steps_run) if isinstance(steps_run, int | float) else all_steps,
        "seconds": reported_seconds if reported_seconds is not None else seconds,
        "cost": _opt_float(metrics.get("cost")),
        "recipe": recipe,
        "metrics": {k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
                    for k, v in trainer_metrics(metrics).items()},
    }


def _opt_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
