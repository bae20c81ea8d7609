"""Request bodies, and the error answer as the OpenAPI document declares it.

Every field is bounded: a value out of range is a 422, never a 500 deeper down. Numbers and
booleans are strict (``strict=True``): pydantic's lax mode took ``true`` for 1 and ``"0.8"`` for
0.8, ``2.0`` for the integer 2, and ``"yes"``, 1 or ``"on"`` for true; an integer is still a
number where a float is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field

from selfie_lora.domain.plan import LORA_SCALE_MAX, LORA_SCALE_MIN
from selfie_lora.errors import ErrorCode
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
    # No length caps here: ModelService.change refuses a trainer version over 300 characters
    # and a reason over 500 (domain.plan.check_repin_lengths) with the same message for the
    # API, the Model page and the CLI; capped only here, the CLI took a 5000-character reason.
    trainer_version: str | None = Field(
        default=None, min_length=1,
        description="Re-pin the trainer version (explicit and logged; needs a reason; at most "
                    "300 characters).",
    )
    # No "needs a reason" rule here: the service's 422 reason_required (with its message) is
    # the answer as documented; a validator here answered invalid_request first, with
    # pydantic's "Value error, ..." text.
    reason: str | None = Field(default=None, description="At most 500 characters.")


class GenerateBody(_Body):
    # Unbounded here: the service's rules (a line break counted as one character, as the
    # Generate page's text area counts it) are the answer, with its codes, as the CLI and the
    # page get them; bounds here answered an empty or a 2001-character prompt invalid_request
    # where "   " was empty_prompt. The guard's body cap still bounds it.
    prompt: str = Field(description=f"1 to {MAX_PROMPT_CHARS} characters, a line break (LF, "
                        "CRLF or CR) counted as one (422 empty_prompt when empty or only spaces, "
                        "prompt_too_long when longer).")
    num_outputs: int = Field(default=1, ge=1, le=MAX_OUTPUTS, strict=True)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    lora_scale: float | None = Field(default=None, ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX,
                                     allow_inf_nan=False, strict=True)
    version_id: Id | VersionNumber | None = Field(
        default=None, description='An id, or a number: 2, "2" or "v2".')


class KeyBody(_Body):
    # Unbounded here: the name's rule is the service's (``UserService``), whose 422 is
    # ``invalid_name`` as documented; bounds here answered an empty or a 101-character name
    # ``invalid_request`` first. The guard's body cap still bounds it.
    name: str = Field(default="api", description="1-100 printable characters, not only spaces "
                      "(422 invalid_name otherwise).")


class DeleteAccountBody(_Body):
    confirm: str = Field(description="The account's name, typed again (in any case): without it "
                         "nothing is deleted (422 invalid_input).")
    # Strict: lax, "yes", 1 or "on" read as true deleted an account and canceled its training.
    force: bool = Field(default=False, strict=True, description="Cancel a queued or running "
                        "training first (without it: 409 training_in_progress, nothing "
                        "deleted); JSON true or false only.")


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable code (see selfie_lora.errors.ErrorCode).")
    message: str = Field(description="A sentence a user can act on.")
    details: list[Any] = Field(
        default_factory=list,
        description='More about it; for a 5xx, [{"reference": "..."}]: the log line\'s reference.')


class ErrorAnswer(BaseModel):
    """Every error answer of the API."""

    error: ErrorDetail


E = ErrorCode
# What each status means, whichever route answers it; the codes are each route's own.
_WHY = {
    401: "no API key, or not a valid one (the answer carries WWW-Authenticate: Bearer)",
    403: "not allowed",
    404: "no such object for this user (another user's objects are never shown)",
    408: "the request body came too slowly",
    409: "a conflict",
    413: "the request body is larger than allowed",
    422: "the request is not valid",
    429: "too many requests in flight; retry after the Retry-After header's seconds",
    500: "a server-side error: a fixed sentence, and details [{\"reference\"}] that the "
         "server's log line carries",
    502: "the generator or the training backend failed",
    503: "the server cannot take it now; ask again after the Retry-After header's seconds when "
         "it sends one",
    507: "the server's disk is full (or a disk quota of it used up): nothing is wrong with the "
         "request, which works again once the operator has freed space (or raised the quota) "
         "(a fixed sentence and a reference, as for a 500)",
}
# What every /api route but the webhook can answer, whatever it does: the guard's answers
# (before any route runs) and the server's own.
_EVERY_ROUTE: dict[int, tuple[ErrorCode, ...]] = {
    401: (E.UNAUTHORIZED,),
    403: (E.FORBIDDEN,),  # the key's account is disabled
    500: (E.INTERNAL_ERROR, E.STORAGE_ERROR, E.CONFIG_ERROR),
    503: (E.SERVER_STOPPING, E.STORAGE_UNAVAILABLE),  # the storage or database away
    507: (E.STORAGE_FULL,),  # any write (a row, a file) can find the disk full
}
# What a route that reads a body (every POST, PATCH and DELETE) can answer besides: the guard
# caps and times the body, and a write can meet another one.
_WITH_BODY: dict[int, tuple[ErrorCode, ...]] = {
    408: (E.REQUEST_TIMEOUT,),
    413: (E.BODY_TOO_LARGE,),
    409: (E.WRITE_CONFLICT,),
}
# The routes' own codes that several routes share.
NOT_FOUND: dict[int, tuple[ErrorCode, ...]] = {404: (E.NOT_FOUND,)}
# A route with a number in its path (an image's index, a sample's step): "abc" is a 422.
NOT_FOUND_OR_INVALID = {**NOT_FOUND, 422: (E.INVALID_REQUEST,)}
# What starts a training (start, resume, an upload that starts one) can meet.
STARTS_CONFLICTS = (E.TRAINING_IN_PROGRESS, E.UPLOAD_IN_PROGRESS, E.BASE_MODEL_MISMATCH,
                    E.PHOTOS_NEED_UPLOAD_AGAIN)
# An upload's body is capped at SELFIE_LORA_MAX_UPLOAD_BYTES, not at the JSON bodies' cap.
UPLOAD_ERRORS: dict[int, tuple[ErrorCode, ...]] = {
    408: (E.REQUEST_TIMEOUT,), 409: (*STARTS_CONFLICTS, E.WRITE_CONFLICT),
    413: (E.UPLOAD_TOO_LARGE,), 503: (E.SERVER_SHORT_OF_MEMORY,)}
# A zip refused as a whole before any photo is read (dataset.archive). A file too large for
# a photo, a member with a password or an unknown compression, or an archive inside the upload,
# is that file's finding instead (``file_too_large``, ``password_protected``,
# ``unsupported_compression``, ``nested_archive``), among those of a ``dataset_rejected`` or a
# stored set.
ARCHIVE_CODES = (E.ARCHIVE_TOO_LARGE, E.BAD_ARCHIVE, E.COMPRESSION_RATIO, E.DUPLICATE_MEMBER,
                 E.NAME_TOO_LONG, E.OVERLAPPING_ENTRIES, E.SIZE_MISMATCH, E.SPECIAL_FILE,
                 E.SYMLINK_IN_ARCHIVE, E.TOO_MANY_MEMBERS, E.UNSAFE_PATH)
# Photos sent one by one (dataset.archive.read_uploaded_files) refused as a whole: the same
# refusals as a zip's members that apply to separate files (an archive among them, or a file
# too large for a photo, is that file's finding).
SENT_FILES_CODES = (E.DUPLICATE_MEMBER, E.NAME_TOO_LONG, E.TOO_MANY_MEMBERS)
_SAYS = {E.FORBIDDEN: "forbidden (this account is disabled)"}


def errors(codes: Mapping[int, Sequence[ErrorCode]] | None = None, *,
           body: bool = False) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of an ``/api`` route (but the webhook's): ``codes`` are the route's
    own error codes by status; those every route can answer (``_EVERY_ROUTE``), and with
    ``body`` those of a route that reads one, are added. Each description lists its codes."""
    merged: dict[int, list[ErrorCode]] = {}
    for table in (_EVERY_ROUTE, _WITH_BODY if body else {}, codes or {}):
        for status, listed in table.items():
            merged.setdefault(status, [])
            merged[status] += [c for c in listed if c not in merged[status]]
    answers: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorAnswer, "description": f"{_WHY[status]} (codes: "
                 f"{', '.join(_SAYS.get(c, c.value) for c in merged[status])})"}
        for status in sorted(merged)}
    if E.DELETION_PENDING in merged.get(503, ()):
        # Not "ask again": the account is disabled, a retry refused, and it finishes by itself.
        answers[503]["description"] += (
            "; deletion_pending: no Retry-After, do not ask again: the deletion finishes by "
            "itself")
    if 503 in answers:
        answers[503]["headers"] = _RETRY_AFTER
    return answers


# Sent with storage_unavailable (30) and server_stopping; not with deletion_pending.
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                                "description": "seconds to wait before asking again"}}


def picture(data: bytes, *, media_type: str) -> Response:
    """A picture the API answers (a generated one, a probe, a sample, a chart, a grid): one
    user's, so no shared cache keeps it, and never sniffed as another type than it says."""
    return Response(content=data, media_type=media_type,
                    headers={"Cache-Control": "private", "X-Content-Type-Options": "nosniff"})


def binary(media_type: str) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry of a route whose 200 is a file of ``media_type``, not JSON."""
    return {200: {"description": f"the file ({media_type})",
                  "content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}}


# The weights' download: a file, a part of it, or a redirect to the object storage.
WEIGHTS_ANSWERS: dict[int | str, dict[str, Any]] = {
    **binary("application/octet-stream"),
    206: {"description": "the one byte range a Range header asked for (Content-Range)",
          "content": {"application/octet-stream": {
              "schema": {"type": "string", "format": "binary"}}}},
    307: {"description": "a short-lived presigned URL of the object storage "
                         "(SELFIE_LORA_DOWNLOAD_URLS), which serves ranges itself",
          "headers": {"Location": {"schema": {"type": "string"},
                                   "description": "the presigned URL"}}},
    416: {"description": "the Range starts past the end of the file (Content-Range: bytes */size); "
                         "no body"},
}
