"""Request bodies, and the error answer as the OpenAPI document declares it.

Every field is bounded: a value out of range is a 422, never a 500 deeper down. Numbers are
strict (``strict=True``): pydantic's lax mode took ``true`` for 1 and ``"0.8"`` for 0.8, and
``2.0`` for the integer 2; an integer is still a number where a float is asked for.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfie_lora.domain.plan import LORA_SCALE_MAX, LORA_SCALE_MIN
from selfie_lora.services.generation import MAX_OUTPUTS, MAX_PROMPT_CHARS
from selfie_lora.services.ports import MAX_SEED

# Ids are uuids (a version may also be named by its number); anything longer is not ours, nor
# is a control character: PostgreSQL refuses a NUL in any text it is asked to compare.
Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
# A version's number as a JSON number ("version_id": 2): strict, so true is not version 1.
VersionNumber = Annotated[int, Field(ge=1, le=10**9, strict=True)]


class _Body(BaseModel):
    # An unknown field is a mistake worth a 422, not something to ignore silently.
    model_config = ConfigDict(extra="forbid")


class StartBody(_Body):
    dataset_id: Id | None = None


class CancelBody(_Body):
    training_id: Id


class ResumeBody(_Body):
    training_id: Id


class ModelPatch(_Body):
    lora_scale: float | None = Field(
        default=None, ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX, allow_inf_nan=False, strict=True,
        description="Set the LoRA scale (kept through retraining); null: back to the default.")
    trainer_version: str | None = Field(
        default=None, min_length=1, max_length=300,
        description="Re-pin the trainer version (explicit and logged; needs a reason).",
    )
    reason: str | None = Field(default=None, min_length=1, max_length=500)

    @model_validator(mode="after")
    def _reason_for_repin(self) -> ModelPatch:
        if self.trainer_version is not None and not (self.reason or "").strip():
            raise ValueError("re-pinning the trainer version needs a reason")
        return self


class GenerateBody(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    num_outputs: int = Field(default=1, ge=1, le=MAX_OUTPUTS, strict=True)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    lora_scale: float | None = Field(default=None, ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX,
                                     allow_inf_nan=False, strict=True)
    version_id: Id | VersionNumber | None = Field(
        default=None, description='An id, or a number: 2, "2" or "v2".')


class KeyBody(_Body):
    name: str = Field(default="api", min_length=1, max_length=100)


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable code (see selfie_lora.errors.ErrorCode).")
    message: str = Field(description="A sentence a user can act on.")
    details: list[Any] = Field(default_factory=list)


class ErrorAnswer(BaseModel):
    """Every error answer of the API."""

    error: ErrorDetail


_WHY = {
    401: "no API key, or not a valid one (the answer carries WWW-Authenticate: Bearer)",
    403: "not allowed: a trainer version of a Replicate model the operator has not allowed",
    404: "no such object for this user (another user's objects are never shown)",
    408: "the request body came too slowly",
    409: "a conflict: a training is queued or running, an upload is starting one, the user "
         "exists, a webhook was received before, the version's weights are missing from the "
         "storage (weights_missing)",
    413: "the request body is larger than allowed",
    422: "the request or its photos are not valid",
    429: "too_many_generations: the user already has SELFIE_LORA_MAX_GENERATIONS_PER_USER "
         "generations in flight; retry after the Retry-After header's seconds",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer ``statuses`` besides 401 (every ``/api``
    route but the webhook)."""
    return {status: {"model": ErrorAnswer, "description": _WHY[status]}
            for status in sorted({401, *statuses})}
