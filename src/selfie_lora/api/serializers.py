"""Domain objects as the contract's JSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from selfie_lora.domain.entities import ApiKey, Dataset, Generation, Model, Training, TrainingStatus, Version
from selfie_lora.domain.likeness import (
    UNDECIDED_WORDS,
    LikenessFacts,
    ProbeResult,
    Undecided,
    VersionLikeness,
)
from selfie_lora.services.generation import withheld_pictures
from selfie_lora.services.likeness import Comparison
from selfie_lora.services.models import ModelOverview

CHART_URL = "/api/model/quality/chart.png"


# Any URL in a stored delivery error. Records written before the alerter named only the host kept
# httpx's text, which quotes the operator's alert URL (for a chat hook, its credential).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*")


def alert_json(v: Version) -> dict[str, Any] | None:
    """A held version's alert as its owner sees it: a delivery error never quotes a URL."""
    if v.alert is None:
        return None
    delivery = v.alert.get("delivery")
    if not isinstance(delivery, dict) or not isinstance(delivery.get("error"), str):
        return v.alert
    error = _URL_IN_TEXT.sub("<alert endpoint>", delivery["error"])
    return {**v.alert, "delivery": {**delivery, "error": error}}


def gate_json(v: Version, *, waiting: Undecided | None = None) -> dict[str, Any]:
    """The likeness gate's decision on a version; ``waiting``: why a pending one waits when a
    database lock stopped its scoring or its judging (``TrainingService.undecided_of``)."""
    details = v.gate_details
    override = details.get("override")
    return {
        "status": str(v.gate_status),
        "reason": v.gate_reason,
        # The Versions page's words for it, and which case: null when no lock is why (or the
        # answer is not the versions list, which reads it).
        "waiting": ({"why": str(waiting), "words": UNDECIDED_WORDS[waiting]}
                    if waiting is not None else None),
        "baseline_version_id": details.get("baseline_version_id"),
        "tolerance": details.get("tolerance"),
        "before": details.get("before"),
        "after": details.get("after"),
        # Whose training photos "before"/"after" are on (the new version's); a drop on the
        # active version's own photos, when they are others, is in "on_baseline_photos".
        "measured_on": details.get("measured_on"),
        "on_baseline_photos": details.get("on_baseline_photos"),
        # Why that second comparison was not made (the active version's photos are gone).
        "baseline_photos_unmeasured": details.get("baseline_photos_unmeasured"),
        "decided_at": details.get("decided_at"),
        "overridden": override is not None,
        "override": override,
    }


def likeness_summary_json(q: LikenessFacts | None) -> dict[str, Any] | None:
    """A version's headline likeness scores (against its own training photos)."""
    if q is None:
        return None
    headline = q.scores.headline() if q.scores else {}
    return {
        "status": str(q.status),
        "embedding_model": q.embedding_model,
        "identity": headline.get("identity"),
        "identity_nearest": headline.get("identity_nearest"),
        "face_share": headline.get("face_share"),
        "sane_share": headline.get("sane_share"),
        "sharpness": headline.get("sharpness"),
        "error": q.error,
        "scored_at": q.scored_at.isoformat() if q.scored_at else None,
    }


def version_json(v: Version, quality: LikenessFacts | None = None, *,
                 base: str = "", waiting: Undecided | None = None) -> dict[str, Any]:
    """A version; its URLs start with ``base`` (``Settings.public_url_base``); ``waiting``: see
    ``gate_json``."""
    return {
        "id": v.id,
        "number": v.number,
        "training_id": v.training_id,
        "trainer_version": v.trainer_version,
        "weights_url": f"{base}/api/model/versions/{v.id}/weights",
        "weights_sha256": v.weights_sha256,
        "weights_method": v.weights_method,
        "remote_version": v.remote_version,
        "version_mismatch": v.version_mismatch,
        "created_at": v.created_at.isoformat(),
        "gate": gate_json(v, waiting=waiting),
        "quality": likeness_summary_json(quality),
        "quality_url": f"{base}/api/model/versions/{v.id}/quality",
        "alert": alert_json(v),
        # Every value of the recipe the version was trained with (kept in its likeness record;
        # null for a version recorded before recipes were).
        "recipe": quality.training.get("recipe") if quality is not None else None,
    }


def compare_urls(a_id: str, b_id: str, *, base: str = "") -> dict[str, str]:
    query = urlencode({"a": a_id, "b": b_id})
    return {"compare_url": f"{base}/api/model/compare?{query}",
            "grid_url": f"{base}/api/model/compare/grid.png?{query}",
            "chart_url": f"{base}{CHART_URL}"}


def likeness_json(
    v: Version, q: VersionLikeness | None, baseline: Version | None, *, base: str = ""
) -> dict[str, Any]:
    """``GET /api/model/versions/{id}/quality``: every score, every probe, and where the images are."""
    per_probe = {p.index: p for p in (q.scores.per_probe if q and q.scores else ())}
    probes = []
    for r in q.probes if q else ():
        score = per_probe.get(r.index)
        probes.append({
            "index": r.index, "prompt": r.prompt, "seed": r.seed,
            "image_url": f"{base}/api/model/versions/{v.id}/quality/probes/{r.index}",
            "faces": r.faces, "face_found": r.face_found, "face_box": r.face_box,
            "similarity": score.similarity if score else None,
            "similarity_nearest": score.similarity_nearest if score else None,
            "sanity": r.sanity.as_dict() if r.sanity else None, "error": r.error,
        })
    body: dict[str, Any] = {
        "version": version_json(v, q, base=base),
        "gate": gate_json(v),
        "alert": alert_json(v),
        "quality": likeness_summary_json(q),
        "scores": q.scores.headline() if q and q.scores else None,
        "reference_dataset_id": q.reference_dataset_id if q else None,
        "training": q.training if q else None,
        "probes": probes,
        "compared_with": baseline.id if baseline else None,
        "chart_url": f"{base}{CHART_URL}",
        "grid_url": None,
        "compare_url": None,
    }
    if baseline is not None:
        body.update(compare_urls(baseline.id, v.id, base=base))
    return body


def model_json(m: Model, active: Version | None,
               active_quality: VersionLikeness | None = None, *, pin_fixed: bool = True,
               base: str = "") -> dict[str, Any]:
    """The model; ``m`` pinned as its next training will be, and ``pin_fixed`` false while that
    pin still follows the configuration (no training yet, no re-pin by its user)."""
    return {
        "id": m.id,
        "backend": m.backend,
        "trigger_word": m.trigger_word,
        "destination": m.destination,
        "trainer_version": m.trainer_version,
        "pin_fixed": pin_fixed,
        "lora_scale": m.lora_scale,
        "lora_scale_is_custom": m.lora_scale_is_custom,
        "active_version": version_json(active, active_quality, base=base) if active else None,
        "created_at": m.created_at.isoformat(),
        "probes": [p.as_dict() for p in m.probes],
    }


def overview_json(o: ModelOverview, *, base: str = "") -> dict[str, Any]:
    return model_json(o.model, o.active, o.active_record, pin_fixed=o.pin_fixed, base=base)


def training_phase(t: Training) -> str:
    """Where a training is: queued, training, scoring (its version awaits the likeness gate) or
    done."""
    if t.status.is_terminal:
        return "done"
    if t.is_scoring:
        return "scoring"
    return "queued" if str(t.status) == "queued" else "training"


def sample_url(training_id: str, step: int, *, base: str = "") -> str:
    return f"{base}/api/training/{training_id}/samples/{step}"


def training_json(t: Training, version: Version | None = None,
                  samples: Sequence[int] = (), *, base: str = "") -> dict[str, Any]:
    """A training; with its version (once stored), the gate's state and reason: ``pending``
    while it is scored, then ``passed`` (the version is active) or ``held`` (it is not, and
    ``gate.reason`` says why); and its sample images so far (steps in order)."""
    return {
        "id": t.id,
        "status": str(t.status),
        "is_retraining": t.is_retraining,
        "progress": round(t.progress, 4),
        "step": t.step,
        "total_steps": t.total_steps,
        "trigger_word": t.trigger_word,
        "destination": t.destination,
        "trainer_version": t.trainer_version,
        "backend": t.backend,
        "recipe": t.recipe.as_dict(),
        "preserved": t.preserved,
        "dataset_id": t.dataset_id,
        # The contract's version_id is set on success; the version is stored before that, while
        # it is scored, and stays on a training canceled then (kept, never activated): a client
        # that reads version_id as "done" must not see it early. stored_version_id says it.
        "version_id": t.version_id if t.status is TrainingStatus.SUCCEEDED else None,
        "stored_version_id": t.version_id,
        "remote_id": t.remote_id,
        "loss": t.loss,
        "weights_method": t.weights_method,
        "error": t.error,
        "created_at": t.created_at.isoformat(),
        "started_at": t.started_at.isoformat() if t.started_at else None,
        "completed_at": t.completed_at.isoformat() if t.completed_at else None,
        "phase": training_phase(t),
        "gate": gate_json(version) if version is not None else None,
        # Who runs it: the attempt (1 for the first worker to take it), the worker holding it
        # (null while queued or ended), its last heartbeat and when its lease runs out.
        "attempt": t.attempt,
        "recoveries": t.recoveries,
        "lease_owner": t.lease_owner,
        "heartbeat_at": t.heartbeat_at.isoformat() if t.heartbeat_at else None,
        "lease_expires_at": t.lease_expires_at.isoformat() if t.lease_expires_at else None,
        "cancel_requested": t.cancel_requested,
        "samples": [{"step": step, "url": sample_url(t.id, step, base=base)} for step in samples],
    }


def dataset_json(d: Dataset) -> dict[str, Any]:
    return {
        "id": d.id,
        "images_total": d.images_total,
        "images_accepted": d.images_accepted,
        "accepted": d.accepted,
        "sha256": d.sha256,
        "findings": [f.as_dict() for f in d.findings],
        "verdict": d.verdict,
        "created_at": d.created_at.isoformat(),
    }


def generation_json(g: Generation, *, base: str = "") -> dict[str, Any]:
    return {
        "id": g.id,
        "prompt": g.prompt,
        "lora_scale": g.lora_scale,
        "version_id": g.version_id,
        "seed": g.seed,
        "images": [f"{base}/api/generations/{g.id}/images/{i}" for i in range(len(g.image_keys))],
        # The pictures of the batch the generator withheld (Replicate's safety checker): the
        # images are the others, in the batch's order.
        "withheld": [{"picture": p.number, "seed": p.seed} for p in withheld_pictures(g)],
        "created_at": g.created_at.isoformat(),
    }


def comparison_json(c: Comparison, *, base: str = "") -> dict[str, Any]:
    """``GET /api/model/compare``: both versions' scores against the same training photos (the
    newer version's), probe by probe, and the grid and chart URLs."""

    def side(version: Version, result: ProbeResult | None,
             score: dict[str, Any] | None) -> dict[str, Any] | None:
        if result is None:
            return None
        return {
            "image_url": f"{base}/api/model/versions/{version.id}/quality/probes/{result.index}",
            "face_found": result.face_found,
            "similarity": score.get("similarity") if score else None,
            "similarity_nearest": score.get("similarity_nearest") if score else None,
            "sane": result.sanity.ok if result.sanity else False,
        }

    probes = []
    for row in c.probes:
        a = side(c.a, row.a, row.a_score)
        b = side(c.b, row.b, row.b_score)
        delta = None
        if a and b and a["similarity"] is not None and b["similarity"] is not None:
            delta = round(b["similarity"] - a["similarity"], 4)
        probes.append({"index": row.probe.index, "prompt": row.probe.prompt,
                       "seed": row.probe.seed, "a": a, "b": b, "delta": delta})
    sa = c.scores_a.headline() if c.scores_a else None
    sb = c.scores_b.headline() if c.scores_b else None
    delta_identity = None
    if sa and sb and sa["identity"] is not None and sb["identity"] is not None:
        delta_identity = round(sb["identity"] - sa["identity"], 4)
    return {
        "a": version_json(c.a, c.record_a, base=base),
        "b": version_json(c.b, c.record_b, base=base),
        "reference_dataset_id": c.reference_dataset_id,
        # Which version's photos those are, A's or B's: the dataset id alone did not say, and a
        # version's scores here are not its quality answer's (on its own photos) when the two
        # were trained on other photos.
        "reference_version_id": c.reference_version.id if c.reference_version else None,
        "reference_version_number": (c.reference_version.number if c.reference_version
                                     else None),
        # ``stale_a``/``stale_b``: why that side's scores are null although it was scored (at
        # another probe size, or with another face model: ``selfie-lora compare`` scores it again).
        "scores": {"a": sa, "b": sb, "delta_identity": delta_identity,
                   "stale_a": c.stale_a, "stale_b": c.stale_b},
        "probes": probes,
        **compare_urls(c.a.id, c.b.id, base=base),
    }


def api_key_json(k: ApiKey, *, now: datetime) -> dict[str, Any]:
    """An API key as its owner sees it: never its secret nor its hash. ``active``: it works at
    ``now``; a rotated key's ``revoked_at`` (when it stops) may lie ahead, ``replaced_by`` naming
    the key that replaced it."""
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": k.created_at.isoformat(),
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        "replaced_by": k.replaced_by,
        "active": k.works_at(now),
    }
