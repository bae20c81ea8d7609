"""Routes of the user's model: the model, its LoRA scale and trainer version, its versions
(named by id or number), rollback, weights, and the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from selfie_lora.api.answers import ModelAnswer, PatchedModelAnswer, Versions, answers
from selfie_lora.api.deps import ServicesDep, UrlBaseDep, UserDep, in_thread
from selfie_lora.api.downloads import reads_a_part, weights_response
from selfie_lora.api.json_body import JsonBodyRoute
from selfie_lora.api.schemas import NOT_FOUND, WEIGHTS_ANSWERS, E, ModelPatch, errors
from selfie_lora.api.serializers import overview_json, version_json
from selfie_lora.domain.weights import WeightsFormat
from selfie_lora.errors import ErrorCode, InvalidInputError
from selfie_lora.services.likeness import LOG_PAGE
from selfie_lora.wiring import Services

router = APIRouter(prefix="/api/model", tags=["model"], route_class=JsonBodyRoute)
WEIGHTS_ERRORS = errors({**NOT_FOUND, 409: (E.WEIGHTS_MISSING,),
                         422: (E.INVALID_REQUEST, E.UNSUPPORTED_WEIGHTS)}) | WEIGHTS_ANSWERS


def model_of(svc: Services, user: Any, *, base: str) -> dict[str, Any]:
    return overview_json(svc.models.overview(user=user), base=base)


@router.get("", responses=errors(NOT_FOUND) | answers(ModelAnswer))
async def get_model(user: UserDep, svc: ServicesDep, base: UrlBaseDep) -> dict[str, Any]:
    # async with one trip to the thread pool: a plain ``def`` route makes two (FastAPI checks
    # the answer of a sync route in the pool too), and this is the API's most frequent read.
    return await in_thread(lambda: model_of(svc, user, base=base))


@router.patch("", responses=errors({
    **NOT_FOUND, 403: (E.TRAINER_NOT_ALLOWED,),
    422: (E.INVALID_REQUEST, E.EMPTY_PATCH, E.INVALID_LORA_SCALE, E.INVALID_TRAINER_VERSION,
          E.REASON_REQUIRED)}, body=True) | answers(PatchedModelAnswer))
def patch_model(user: UserDep, svc: ServicesDep, base: UrlBaseDep, body: ModelPatch) -> dict[str, Any]:
    """Change the LoRA scale (null: back to the default, no longer custom) or (with a reason)
    the trainer version. The answer is the model, with ``photos_need_upload_again`` (and
    ``notice``, the sentence) true when the new trainer version trains at more pixels than the
    stored photos were prepared at: they must be uploaded again before the next training."""
    # {"lora_scale": null} is sent, and means the default scale; an absent one changes nothing.
    to_default = "lora_scale" in body.model_fields_set and body.lora_scale is None
    if body.lora_scale is None and not to_default and body.trainer_version is None:
        raise InvalidInputError("nothing to change: send lora_scale (a number, or null for the "
                                "default) or trainer_version", code=ErrorCode.EMPTY_PATCH)
    # Both in one transaction: a PATCH is applied whole or not at all. The answer is the model
    # as that transaction left it: read again here, it showed another request's change
    # committed meanwhile (the same user's scale reset) as this one's.
    changed = svc.models.change(user=user, lora_scale=body.lora_scale,
                                lora_scale_to_default=to_default,
                                trainer_version=body.trainer_version, reason=body.reason or "")
    # A recipe of more pixels than the stored photos were prepared at: said now, not only
    # when the next start is refused.
    notice = (svc.training.photos_to_upload_again(user=user)
              if body.trainer_version is not None else None)
    return {**overview_json(changed, base=base),
            "photos_need_upload_again": notice is not None, "notice": notice}


@router.get("/versions", responses=errors({422: (E.INVALID_REQUEST, E.INVALID_INPUT)})
            | answers(Versions))
def versions(user: UserDep, svc: ServicesDep, base: UrlBaseDep, limit: int | None = None,
             before: str | None = None) -> dict[str, Any]:
    """Every version, newest first; ``limit`` (optional, 1 to 200): a page of them, those
    numbered below ``before`` (the ``older`` of the page before)."""
    # A ``before`` of any length, as GET /api/generations' (and this route's CLI and page):
    # a number of any size past every version's is the newest page, as README says.
    page = svc.models.versions_page(user=user, limit=limit, before=before)
    # Why a pending one waits, where a database lock is why (the Versions page's words).
    waiting = svc.training.undecided_of(versions=[v for v, _ in page.versions])
    return {"versions": [version_json(v, record, base=base, waiting=waiting.get(v.id))
                         for v, record in page.versions],
            "older": page.older}


@router.post("/versions/{version_id}/activate", responses=errors(
    {**NOT_FOUND, 409: (E.WEIGHTS_MISSING, E.BASE_MODEL_MISMATCH, E.VERSION_MISMATCH)},
    body=True)
    | answers(ModelAnswer))
def activate(user: UserDep, svc: ServicesDep, base: UrlBaseDep, version_id: str) -> dict[str, Any]:
    """Rollback or roll forward; ``version_id`` is an id or a number (``2``, ``v2``)."""
    # The model as the activation left it, not read again (another activation may follow).
    return overview_json(svc.models.activate(user=user, version_id=version_id),
                         base=base)


@router.get("/versions/{version_id}/weights", responses=WEIGHTS_ERRORS,
            response_class=Response)
@router.head("/versions/{version_id}/weights", responses=WEIGHTS_ERRORS,
             response_class=Response)
def weights(user: UserDep, svc: ServicesDep, version_id: str, http: Request,
            format: WeightsFormat = WeightsFormat.DIFFUSERS) -> Response:
    """The LoRA file, streamed; or a 307 to a short-lived presigned URL of the object storage
    when the server is set up for it (``SELFIE_LORA_DOWNLOAD_URLS``). ``format=kohya``: the
    file in kohya sd-scripts' FLUX layout, converted on request (422 for weights it cannot
    convert). A streamed file answers one ``Range`` with 206 (ETag: its SHA-256, honoured in
    ``If-Range``) and HEAD with the headers GET would send."""
    return weights_response(
        svc.models.download_weights(user=user, version_id=version_id, weights_format=format,
                                    for_range=reads_a_part(http)),
        range_header=http.headers.get("range"), if_range=http.headers.get("if-range"),
        if_none_match=http.headers.get("if-none-match"), head=http.method == "HEAD")


@router.get("/log", responses=errors({**NOT_FOUND, 422: (E.INVALID_REQUEST, E.INVALID_INPUT)}))
def model_log(user: UserDep, svc: ServicesDep, limit: int = LOG_PAGE,
              before: str | None = None) -> dict[str, Any]:
    """The retraining log, a page at a time: the ``limit`` (1 to 200, default 50) newest
    trainings older than training ``before`` (the ``older`` of the page before), each with
    what it kept, the gate's decision and the likeness scores before and after, and the audit
    events of the same stretch of time, oldest first; ``older``: null on the page reaching back
    to the first upload."""
    # A ``before`` of any length, as GET /api/generations': one naming no training, the 404.
    page = svc.likeness.log_page(user=user, limit=limit, before=before)
    return {"events": list(page.events), "trainings": page.trainings, "older": page.older}
