"""Routes of trainings: upload photos (and start), start, progress, cancel, resume."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from selfie_lora.api.answers import Canceled, Progress, Started, Uploaded, answers
from selfie_lora.api.deps import (
    ServicesDep,
    UrlBaseDep,
    UserDep,
    in_intake,
    in_thread,
    upload_slot,
)
from selfie_lora.api.json_body import JsonBodyRoute
from selfie_lora.api.model import model_of
from selfie_lora.api.schemas import (
    ARCHIVE_CODES,
    NOT_FOUND,
    NOT_FOUND_OR_INVALID,
    SENT_FILES_CODES,
    STARTS_CONFLICTS,
    UPLOAD_ERRORS,
    CancelBody,
    E,
    ResumeBody,
    StartBody,
    binary,
    errors,
    picture,
)
from selfie_lora.api.serializers import dataset_json, overview_json, training_json
from selfie_lora.dataset.limits import SentFile, byte_size
from selfie_lora.errors import PayloadTooLargeError
from selfie_lora.services.training import StartResult, TrainingView, UploadResult
from selfie_lora.wiring import Services

router = APIRouter(prefix="/api/training", tags=["training"], route_class=JsonBodyRoute)


def view_json(view: TrainingView, *, base: str) -> dict[str, Any]:
    # With its version once stored: the answer carries the likeness gate's state and reason.
    return training_json(view.training, view.version, view.samples,
                         base=base)


def upload_json(svc: Services, result: UploadResult, *, base: str) -> dict[str, Any]:
    """Blocking: the model's and the training's state (the database, the samples' listing)."""
    overview = svc.models.overview_of(result.model) if result.model else None
    return {
        "dataset": dataset_json(result.dataset),
        "training": (view_json(svc.training.view(result.training), base=base) if result.training
                     else None),
        "model": (overview_json(overview, base=base)
                  if overview else None),
    }


def nameless_part(path: str, part: str) -> str:
    """What an upload route answers for a part sent without a filename, which the form parser
    takes for a text field (httpx and requests leave out a filename that is empty): FastAPI
    then refused it as "Expected UploadFile, received: <class 'str'>", and over 1 MB the parser
    refused it before any route ran ("Part exceeded maximum size of 1024KB"). Its bytes arrive
    decoded as text, which cannot be turned back into the photo for sure, so it is refused in
    words (``api.app``'s handlers), with the curl line that sends it right."""
    example = "file=@selfies.zip" if path.endswith("/upload-zip") else "files=@photo.jpg"
    return (f"{part} was sent without a filename, so it arrived as text, not as a file; send "
            f"it as a file part with its name (curl: -F {example})")


async def read_capped(file: UploadFile, *, limit: int, allowed: int) -> bytes:
    """``file`` read whole, refused past ``limit`` (what is left of the upload's ``allowed``,
    SELFIE_LORA_MAX_UPLOAD_BYTES, which the refusal states) before any of it is read.

    In one piece, of the size the form parser counted as it spooled the part: read as 1 MB
    chunks then joined, a file was held twice at once (a 45 MB photo sent alone peaked at
    2x the upload)."""
    size = await spooled_size(file)
    if size > max(limit, 0):
        raise PayloadTooLargeError(f"the upload is larger than {byte_size(allowed)}")
    return await file.read(size) if size else b""


async def spooled_size(file: UploadFile) -> int:
    """The bytes of ``file`` left to read: the size the form parser counted, or else (an
    UploadFile made another way) where its end is."""
    if file.size is not None:
        return file.size
    at = file.file.tell()
    end = file.file.seek(0, 2)
    await file.seek(at)
    return end - at


@router.post("/upload-zip", status_code=202, responses=errors(
    {**UPLOAD_ERRORS, 422: (E.INVALID_REQUEST, E.DATASET_REJECTED, *ARCHIVE_CODES)})
    | answers(Uploaded, 202))
async def upload_zip(
    user: UserDep, svc: ServicesDep, request: Request, base: UrlBaseDep,
    file: Annotated[UploadFile, File(description="A zip of photos.")],
    start: Annotated[bool, Form(description="Also start a training on them.")] = True,
) -> dict[str, Any]:
    with upload_slot(request, user):  # before the spooled body is read into memory
        allowed = svc.settings.max_upload_bytes
        data = await read_capped(file, limit=allowed, allowed=allowed)
        # The answer in the same trip off the event loop: it reads the database and the storage.
        return await in_intake(request, lambda: upload_json(
            svc, svc.training.upload_zip(user=user, data=data, start=start), base=base))


@router.post("/upload", status_code=202, responses=errors(
    {**UPLOAD_ERRORS, 422: (E.INVALID_REQUEST, E.DATASET_REJECTED, *SENT_FILES_CODES)})
    | answers(Uploaded, 202))
async def upload_files(
    user: UserDep, svc: ServicesDep, request: Request, base: UrlBaseDep,
    files: Annotated[list[UploadFile], File(description="Photos, one part each.")],
    start: Annotated[bool, Form(description="Also start a training on them.")] = True,
    names: Annotated[list[str] | None, Form(description=(
        "Optional: each file's own name, one field per file in their order, taken where each "
        "is what its filename says (a '\"' written %22): a filename leaves a '%' as it is, "
        "so only this tells a file named 100%22off.jpg from one named 100\"off.jpg."))] = None,
) -> dict[str, Any]:
    """The same as upload-zip, for photos sent as several multipart ``files``."""
    limit = svc.settings.max_upload_bytes
    total = 0
    with upload_slot(request, user):  # before the spooled bodies are read into memory
        for upload in files:
            total += await spooled_size(upload)
            if total > limit:
                raise PayloadTooLargeError(f"the upload is larger than {byte_size(limit)}")
        # The spooled files themselves: the intake reads each once, and not at all one larger
        # than a photo may be (its finding, file_too_large). An empty filename (filename="",
        # as curl and browsers send it): the intake names the photo by its place ("photo3").
        # The names sent beside the files, as the web page's are: the same rule.
        raw_names, escaped = svc.intake.upload_names(
            [upload.filename or "" for upload in files], names or [])
        named: list[SentFile] = [(name, upload.file)
                                 for name, upload in zip(raw_names, files, strict=True)]
        return await in_intake(request, lambda: upload_json(
            svc, svc.training.upload_files(user=user, files=named, start=start,
                                           form_escaped=escaped), base=base))


def started_json(svc: Services, user: Any, result: StartResult, *,
                 base: str) -> dict[str, Any]:
    return {"training": view_json(svc.training.view(result.training), base=base),
            "model": model_of(svc, user, base=base)}


@router.post("/start", status_code=202, responses=errors(
    {**NOT_FOUND, 409: STARTS_CONFLICTS, 422: (E.INVALID_REQUEST, E.NO_DATASET)}, body=True)
    | answers(Started, 202))
def start_training(user: UserDep, svc: ServicesDep, base: UrlBaseDep,
                   body: StartBody | None = None) -> dict[str, Any]:
    result = svc.training.start(user=user, dataset_id=body.dataset_id if body else None)
    return started_json(svc, user, result, base=base)


@router.post("/resume", status_code=202, responses=errors(
    {**NOT_FOUND, 409: (E.NOT_RESUMABLE, *STARTS_CONFLICTS), 422: (E.INVALID_REQUEST,)},
    body=True) | answers(Started, 202))
def resume_training(user: UserDep, svc: ServicesDep, base: UrlBaseDep, body: ResumeBody) -> dict[str, Any]:
    """A canceled training continues from its last checkpoint, as a new training."""
    result = svc.training.resume(user=user, training_id=body.training_id)
    return started_json(svc, user, result, base=base)


@router.get("/progress", responses=errors(NOT_FOUND) | answers(Progress))
async def progress(user: UserDep, svc: ServicesDep, base: UrlBaseDep,
                   training_id: str | None = None) -> dict[str, Any]:
    # Polled by every client that waits for a training: one trip to the thread pool, as
    # GET /api/model (api/model.py). An empty value (`?training_id=`, as a form or a template
    # leaves it) is the default, the latest training, not a training with no id.
    wanted = training_id or None
    return await in_thread(lambda: {
        "training": view_json(svc.training.progress(user=user, training_id=wanted), base=base),
        "model": model_of(svc, user, base=base)})


@router.post("/cancel", responses=errors(
    {**NOT_FOUND, 422: (E.INVALID_REQUEST,)}, body=True) | answers(Canceled))
def cancel(user: UserDep, svc: ServicesDep, base: UrlBaseDep, body: CancelBody) -> dict[str, Any]:
    outcome = svc.training.cancel_with_outcome(user=user, training_id=body.training_id)
    return {"training": view_json(svc.training.view(outcome.training), base=base),
            "model": model_of(svc, user, base=base),
            "already_ended": outcome.already_ended, "message": outcome.message}


@router.get("/{training_id}/samples/{step}",
            responses=errors(NOT_FOUND_OR_INVALID) | binary("image/jpeg"),
            response_class=Response)
def sample_image(user: UserDep, svc: ServicesDep, training_id: str, step: int) -> Response:
    """A sample image the training made with its LoRA after ``step`` steps (JPEG)."""
    data = svc.training.sample_image(user=user, training_id=training_id, step=step)
    return picture(data, media_type="image/jpeg")
