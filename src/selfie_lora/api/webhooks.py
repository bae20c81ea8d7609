"""Routes of webhooks from training backends (signed, not by API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from selfie_lora.api.deps import ServicesDep, in_thread
from selfie_lora.api.schemas import ErrorAnswer

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])


@router.post("/replicate", responses={
    401: {"model": ErrorAnswer, "description": "not a valid Standard Webhooks signature"},
    413: {"model": ErrorAnswer, "description": "the body is larger than 2 MiB"},
    422: {"model": ErrorAnswer, "description": "signed, but not a training event"},
})
async def replicate_webhook(request: Request, svc: ServicesDep) -> dict[str, Any]:
    """200 for a delivery applied before too (nothing changes): Replicate retries anything else."""
    body = await request.body()  # capped by the guard before it is read
    headers = dict(request.headers)
    # Only the signed body says which training this is about; the URL is not signed.
    training = await in_thread(lambda: svc.training.receive_webhook(headers=headers, body=body))
    return {"ok": True, "training_id": training.id if training else None}
