"""Routes of the user's API keys: list, create, revoke, rotate. A key's secret is shown once; a
rotated key keeps working for the rotation's grace, so a client that lost the rotation's answer
asks again with it (``UserService.rotate_key``, told the key the request came with)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from selfie_lora.api.deps import ApiKeyDep, ServicesDep, UserDep
from selfie_lora.api.json_body import JsonBodyRoute
from selfie_lora.api.schemas import NOT_FOUND, E, KeyBody, errors
from selfie_lora.api.serializers import api_key_json
from selfie_lora.services.common import utcnow

router = APIRouter(prefix="/api/keys", tags=["keys"], route_class=JsonBodyRoute)


@router.get("", responses=errors())
def list_keys(user: UserDep, svc: ServicesDep) -> dict[str, Any]:
    now = utcnow()
    return {"keys": [api_key_json(k, now=now) for k in svc.users.keys(user=user)]}


@router.post("", status_code=201, responses=errors(
    {422: (E.INVALID_NAME, E.INVALID_REQUEST)}, body=True))
def create_key(user: UserDep, svc: ServicesDep, body: KeyBody | None = None) -> dict[str, Any]:
    key, secret = svc.users.create_key(user=user, name=body.name if body else "api")
    return {"key": api_key_json(key, now=utcnow()), "secret": secret}


@router.delete("/{key_id}", responses=errors(NOT_FOUND, body=True))
def revoke_key(user: UserDep, svc: ServicesDep, key_id: str) -> dict[str, Any]:
    return {"key": api_key_json(svc.users.revoke_key(user=user, key_id=key_id), now=utcnow())}


@router.post("/{key_id}/rotate", status_code=201, responses=errors(
    {**NOT_FOUND, 422: (E.INVALID_INPUT,)}, body=True))
def rotate_key(user: UserDep, svc: ServicesDep, api_key: ApiKeyDep,
               key_id: str) -> dict[str, Any]:
    key, secret = svc.users.rotate_key(user=user, key_id=key_id, api_key=api_key)
    return {"key": api_key_json(key, now=utcnow()), "secret": secret}
