"""The signed-in user's own account: ``DELETE /api/me`` deletes it and everything it owns
(``services.erasure``), as ``selfie-lora users delete`` does for the operator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from selfie_lora.api.deps import ServicesDep, UserDep
from selfie_lora.api.schemas import DeleteAccountBody, E, errors
from selfie_lora.errors import InvalidInputError

router = APIRouter(prefix="/api/me", tags=["account"])


@router.delete("", responses=errors({409: (E.TRAINING_IN_PROGRESS,),
                                     422: (E.INVALID_INPUT,)}, body=True))
def delete_me(user: UserDep, svc: ServicesDep, body: DeleteAccountBody) -> dict[str, Any]:
    """Delete this account and everything it owns, for good: model, versions, trainings,
    photos, weights, generated pictures, likeness records, API keys and sessions."""
    if body.confirm != user.name:
        raise InvalidInputError("confirm must be this account's name: nothing was deleted")
    return {"deleted": svc.erasure.erase(name=user.name, force=body.force).as_json()}
