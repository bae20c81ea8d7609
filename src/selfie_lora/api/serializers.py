"""Domain objects as the contract's JSON."""

from __future__ import annotations

from typing import Any

from selfie_lora.domain.entities import Dataset, Generation, Model, Training, Version


def version_json(v: Version) -> dict[str, Any]:
    return {
        "id": v.id,
        "number": v.number,
        "training_id": v.training_id,
        "trainer_version": v.trainer_version,
        "weights_url": f"/api/model/versions/{v.id}/weights",
        "weights_sha256": v.weights_sha256,
        "weights_method": v.weights_method,
        "remote_version": v.remote_version,
        "version_mismatch": v.version_mismatch,
        "created_at": v.created_at.isoformat(),
    }


def model_json(m: Model, active: Version | None) -> dict[str, Any]:
    return {
        "id": m.id,
        "backend": m.backend,
        "trigger_word": m.trigger_word,
        "destination": m.destination,
        "trainer_version": m.trainer_version,
        "lora_scale": m.lora_scale,
        "lora_scale_is_custom": m.lora_scale_is_custom,
        "active_version": version_json(active) if active else None,
        "created_at": m.created_at.isoformat(),
    }


def training_json(t: Training) -> dict[str, Any]:
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
        "version_id": t.version_id,
        "remote_id": t.remote_id,
        "loss": t.loss,
        "weights_method": t.weights_method,
        "error": t.error,
        "created_at": t.created_at.isoformat(),
        "started_at": t.started_at.isoformat() if t.started_at else None,
        "completed_at": t.completed_at.isoformat() if t.completed_at else None,
    }


def dataset_json(d: Dataset) -> dict[str, Any]:
    return {
        "id": d.id,
        "images_total": d.images_total,
        "images_accepted": d.images_accepted,
        "accepted": d.accepted,
        "sha256": d.sha256,
        "findings": [f.as_dict() for f in d.findings],
        "created_at": d.created_at.isoformat(),
    }


def generation_json(g: Generation) -> dict[str, Any]:
    return {
        "id": g.id,
        "prompt": g.prompt,
        "lora_scale": g.lora_scale,
        "version_id": g.version_id,
        "seed": g.seed,
        "images": [f"/api/generations/{g.id}/images/{i}" for i in range(len(g.image_keys))],
        "created_at": g.created_at.isoformat(),
    }
