"""The signed-in user's own account: ``DELETE /api/me`` deletes it and everything it owns
(``services.erasure``), as ``selfie-lora users delete`` does for the operator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from selfie_lora.api.deps import ServicesDep, UserDep
from selfie_lora.api.json_body import JsonBodyRoute
from selfie_lora.api.schemas import DeleteAccountBody, E, errors
from selfie_lora.errors import ConflictError, InvalidInputError
from selfie_lora.services.erasure import ErasureBlockedError

router = APIRouter(prefix="/api/me", tags=["account"], route_class=JsonBodyRoute)


@router.delete("", responses=errors({409: (E.TRAINING_IN_PROGRESS,),
                                     422: (E.INVALID_INPUT,),
                                     503: (E.DEPLOYMENT_MISMATCH, E.DELETION_PENDING)},
                                    body=True))
def delete_me(user: UserDep, svc: ServicesDep, body: DeleteAccountBody) -> dict[str, Any]:
    """Delete this account and everything it owns, for good: model, versions, trainings,
    photos, weights, generated pictures, likeness records, API keys and sessions."""
    if not svc.erasure.confirmed(name=user.name, typed=body.confirm):
        raise InvalidInputError("confirm must be this account's name: nothing was deleted")
    try:
        return {"deleted": svc.erasure.erase_by_id(user_id=user.id, force=body.force).as_json()}
    except ErasureBlockedError as error:
        # How to go on in this API's words (the service's message says what happened): once
        # the account is disabled its key is refused, and the deletion is finished by the
        # service's periodic collection (AccountEraser.finish_pending), forced.
        raise ConflictError(error.message + _REMEDY[error.stage].format(name=user.name),
                            code=error.code) from error


_REMEDY = {
    "active": '; cancel it first (POST /api/training/cancel), or send "force": true to '
              "cancel it and delete",
    "started": ": the deletion finishes on its own within minutes (nothing more to do)",
    "stopping": "; the account stays disabled and the deletion finishes on its own within "
                "minutes (nothing more to do)",
}
