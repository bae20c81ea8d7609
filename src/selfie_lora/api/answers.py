"""The success answers of the most used routes, as the OpenAPI document declares them.

Documentation only: routes name them in ``responses={200: {"model": ...}}``, never as
``response_model`` (which would filter the answer to these fields). The routes answer what
``api.serializers`` builds; a test holds the two to the same field names."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Withheld(BaseModel):
    picture: int = Field(description="The picture's place in the batch, from 1.")
    seed: int = Field(description="The seed it was to be made with.")


class GenerationAnswer(BaseModel):
    id: str
    prompt: str
    lora_scale: float
    version_id: str
    seed: int = Field(description="The seed of the first picture; picture i is made with seed + i.")
    images: list[str] = Field(description="The URLs of the pictures that came, in batch order.")
    withheld: list[Withheld] = Field(
        description="The pictures the generator withheld (Replicate's safety checker).")
    created_at: str


class Generated(BaseModel):
    generation: GenerationAnswer


class GenerationsPage(BaseModel):
    generations: list[GenerationAnswer] = Field(description="Newest first.")
    older: str | None = Field(
        description="The cursor to send as ``before`` for the next (older) page (the last "
                    "one's position, opaque: it holds even if that generation is deleted); "
                    "null: none.")


class VersionAnswer(BaseModel):
    id: str
    number: int
    training_id: str | None
    trainer_version: str
    weights_url: str
    weights_sha256: str
    weights_method: str | None
    remote_version: str | None
    version_mismatch: bool
    created_at: str
    gate: dict[str, Any] = Field(
        description="The likeness gate's state, reason and scores; in the versions list, "
                    "``waiting``: why a pending version a database lock left waits.")
    quality: dict[str, Any] | None = Field(description="The headline likeness scores.")
    quality_url: str
    alert: dict[str, Any] | None
    recipe: dict[str, Any] | None


class ModelAnswer(BaseModel):
    id: str
    backend: str = Field(description="The backend the next training uses.")
    trigger_word: str
    destination: str = Field(description="The destination the next training trains into.")
    trainer_version: str = Field(description="The trainer version the next training uses.")
    pin_fixed: bool = Field(
        description="Whether backend, destination and trainer_version are the model's own: "
                    "true once it has had a training (they never change on their own again) "
                    "or its user re-pinned it; false before, while they follow the server's "
                    "configuration, which the first training takes.")
    lora_scale: float
    lora_scale_is_custom: bool
    active_version: VersionAnswer | None
    created_at: str
    probes: list[dict[str, Any]]


class PatchedModelAnswer(ModelAnswer):
    photos_need_upload_again: bool = Field(
        description="The new trainer version trains at more pixels than the stored photos were "
                    "prepared at: upload them again before the next training.")
    notice: str | None = Field(description="That sentence, else null.")


class Sample(BaseModel):
    step: int
    url: str


class TrainingAnswer(BaseModel):
    id: str
    status: str
    is_retraining: bool
    progress: float = Field(description="0..1")
    step: int
    total_steps: int
    trigger_word: str
    destination: str
    trainer_version: str
    backend: str
    recipe: dict[str, Any]
    preserved: dict[str, Any]
    dataset_id: str | None
    version_id: str | None = Field(description="Set on success only.")
    stored_version_id: str | None = Field(description="Set as soon as the version is stored.")
    remote_id: str | None
    loss: float | None
    weights_method: str | None
    error: str | None
    created_at: str
    started_at: str | None
    completed_at: str | None
    phase: str
    gate: dict[str, Any] | None
    attempt: int
    recoveries: int
    lease_owner: str | None
    heartbeat_at: str | None
    lease_expires_at: str | None
    cancel_requested: bool
    samples: list[Sample]


class Progress(BaseModel):
    training: TrainingAnswer
    model: ModelAnswer


class FindingAnswer(BaseModel):
    severity: str = Field(description="reject, warn or info.")
    code: str
    message: str = Field(description="What is wrong or weak.")
    advice: str = Field(description="What to do about it.")
    photo: str | None = Field(description="The photo it is about; null: about the whole set.")


class DatasetAnswer(BaseModel):
    id: str
    images_total: int
    images_accepted: int
    accepted: bool = Field(description="Whether the set is trainable.")
    sha256: str
    findings: list[FindingAnswer] = Field(
        description="Per photo and for the set: what is wrong or weak and what to do about it.")
    verdict: dict[str, Any] = Field(
        description="The set's verdict, with the training it was judged for (target, "
                    "resolution).")
    created_at: str


class Uploaded(BaseModel):
    dataset: DatasetAnswer
    training: TrainingAnswer | None = Field(description="Null for an upload with start=false.")
    model: ModelAnswer | None = Field(description="The user's model (made by the first upload).")


class Started(BaseModel):
    training: TrainingAnswer
    model: ModelAnswer


class Canceled(Started):
    already_ended: bool = Field(
        description="True when the training had ended (succeeded, failed, or canceled by an "
                    "earlier request) before this cancel could act: nothing was canceled.")
    message: str = Field(
        description="What the cancel did, the sentence the Train page says: \"Training "
                    "canceled.\", \"Canceling the training: it stops within a few seconds.\" "
                    "or \"The training had already ended (succeeded): nothing to cancel.\"")


class Versions(BaseModel):
    versions: list[VersionAnswer] = Field(
        description="Newest first: every version, or with ``limit`` a page of them.")
    older: str | None = Field(
        default=None,
        description="With ``limit``: the ``before`` of the next (older) page (the last "
                    "version's number); null: this page holds the oldest, or no ``limit``.")


class ComparedSide(BaseModel):
    image_url: str
    face_found: bool
    similarity: float | None
    similarity_nearest: float | None
    sane: bool


class ComparedProbe(BaseModel):
    index: int
    prompt: str
    seed: int
    a: ComparedSide | None
    b: ComparedSide | None
    delta: float | None


class ComparedScores(BaseModel):
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    delta_identity: float | None
    stale_a: str | None = Field(description="Why a's scores are null although it was scored "
                                            "(another probe size or face model), else null.")
    stale_b: str | None = Field(description="The same for b.")


class Comparison(BaseModel):
    a: VersionAnswer
    b: VersionAnswer
    reference_dataset_id: str | None
    # The version whose training photos both sides' identity is measured on (the newer one's):
    # its id and number; null when they could not be read (no scores then).
    reference_version_id: str | None
    reference_version_number: int | None
    scores: ComparedScores
    probes: list[ComparedProbe]
    compare_url: str
    grid_url: str
    chart_url: str


def answers(model: type[BaseModel], status: int = 200) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry of a route whose ``status`` (200, or 202 for a route that
    queues work) answers ``model``'s fields (and may answer more: it is not a
    ``response_model``)."""
    return {status: {"model": model, "description": "Successful Response"}}
